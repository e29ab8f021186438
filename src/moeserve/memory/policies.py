"""Eviction policies for an expert cache: which resident expert to drop when a new one must load.

A policy is a small class that sees a stream of *steps* and keeps its own view of which keys are
resident. It knows nothing of models, tensors or bytes: a key is a small non-negative int (an
expert id in a per-layer cache, ``layer * E + expert`` in a cache shared by all layers), and time
is the index of the step in the stream its cache sees (0, 1, 2, ...).

One step is one token at one MoE layer: the distinct keys it is routed to, all needed at once.
The caller (:func:`moeserve.memory.cache_sim.replay`, or a live cache) drives a policy through
this contract, for every step in order::

    on_hit(key, time)           for each requested key already resident
    evict(pinned, time) -> key  only while the cache is full and a requested key is missing
    on_insert(key, time)        for each requested key that was missing, after room was made

``pinned`` is the step's requested keys: they must all be resident together, so ``evict`` must
return a resident key *not* in ``pinned`` (the caller guarantees one exists: capacity >= the
widest step) and forget it. A cache shared by several layers sees their steps interleaved
round-robin: ``num_streams`` streams with disjoint keys, step ``time`` belonging to stream
``time % num_streams`` (a per-layer cache has one stream).

``prepare(steps)`` hands a policy the whole stream before step 0. Online policies (``online``)
use only the past: most ignore ``prepare``; ``predicted-reuse`` computes, from it, scores in
which step t's row depends on steps 0..t only (checked by a test that changes the future).
``belady`` alone reads the future. Policies whose ``needs_stream`` is true cannot run in a live
cache, which does not know the stream in advance; they exist for trace replay.

Registered in :data:`EVICTION_POLICIES` (constructor ``policy_class(capacity, num_streams=1)``):

====================  =====================================================================
``lru``               evict the least recently used
``lfu``               evict the least frequently used over the whole past; ties: least recent
``fifo``              evict the earliest inserted; hits change nothing
``lifo``              evict the latest inserted (expert buffering, Huang et al. 2303.06182)
``belady``            offline optimum MIN: evict the key whose next use is farthest ahead
``lrfu``              evict the lowest exponentially decayed use count (recency and frequency)
``predicted-reuse``   evict the key an online-learned model finds least likely to be reused soon
====================  =====================================================================
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Container, Sequence
from typing import ClassVar

import numpy as np

from moeserve.registry import Registry

Score = tuple[float, float]
"""A :class:`ScoredPolicy` score: ``(value, tie_break)``, the lowest evicted first."""

SCAN_LIMIT = 64
"""Caches up to this many keys find a victim by scanning the residents; larger ones keep a heap."""

EVICTION_POLICIES: Registry[type[EvictionPolicy]] = Registry("eviction policy")
"""Every eviction policy by name; build one cache's with ``EVICTION_POLICIES.get(name)(capacity)``."""


class EvictionPolicy(ABC):
    """Eviction decisions for one cache of ``capacity`` keys; see the module docstring for the protocol."""

    online: ClassVar[bool] = True
    """False for a policy that reads the future (a yardstick, not a usable policy)."""
    needs_stream: ClassVar[bool] = False
    """True for a policy that must be prepared with the whole stream (trace replay only)."""

    def __init__(self, capacity: int, num_streams: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        if num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {num_streams}")
        self.capacity = capacity
        self.num_streams = num_streams

    def prepare(self, steps: Sequence[Sequence[int]]) -> None:  # noqa: B027 (an optional hook)
        """Receive the whole stream (``steps[time]`` = that step's keys) before step 0.

        Policies that do not need it ignore it; one whose ``needs_stream`` is true fails without it.
        """

    @abstractmethod
    def on_hit(self, key: int, time: int) -> None:
        """``key`` was requested at ``time`` and was resident."""

    @abstractmethod
    def on_insert(self, key: int, time: int) -> None:
        """``key`` was requested at ``time``, was missing, and is now resident."""

    @abstractmethod
    def evict(self, pinned: Container[int], time: int) -> int:
        """Forget and return one resident key that is not in ``pinned``."""


def _all_pinned() -> AssertionError:
    return AssertionError("every resident key is pinned; the caller broke capacity >= step width")


# -- order policies: O(1) per call ------------------------------------------------------------


class _OrderPolicy(EvictionPolicy):
    """Keys kept in one order; evict from the front (oldest) or, with ``evict_newest``, the back."""

    refresh_on_hit: ClassVar[bool]
    evict_newest: ClassVar[bool] = False

    def __init__(self, capacity: int, num_streams: int = 1) -> None:
        super().__init__(capacity, num_streams)
        self._order: OrderedDict[int, None] = OrderedDict()

    def on_hit(self, key: int, time: int) -> None:
        if self.refresh_on_hit:
            self._order.move_to_end(key)

    def on_insert(self, key: int, time: int) -> None:
        self._order[key] = None

    def evict(self, pinned: Container[int], time: int) -> int:
        keys = reversed(self._order) if self.evict_newest else iter(self._order)
        for key in keys:
            if key not in pinned:
                del self._order[key]
                return key
        raise _all_pinned()


@EVICTION_POLICIES.register("lru")
class LRUPolicy(_OrderPolicy):
    """Least recently used: evict the key whose last request is oldest."""

    refresh_on_hit = True


@EVICTION_POLICIES.register("fifo")
class FIFOPolicy(_OrderPolicy):
    """First in, first out: evict the key inserted earliest; hits change nothing."""

    refresh_on_hit = False


@EVICTION_POLICIES.register("lifo")
class LIFOPolicy(_OrderPolicy):
    """Last in, first out: evict the key inserted most recently (expert buffering's policy).

    Keys loaded early stay for good, so the cache settles on whatever it held first; the key
    evicted is the newest that the current step does not need.
    """

    refresh_on_hit = False
    evict_newest = True


# -- scored policies: evict the lowest score ---------------------------------------------------


class ScoredPolicy(EvictionPolicy):
    """Evict the resident, unpinned key of lowest score; a subclass says what the score is.

    Scores change only when a key is requested (``score_on_hit`` / ``score_on_insert``); any
    drift with time alone must keep their order, so a stored score stays comparable with a fresh
    one. Up to :data:`SCAN_LIMIT` keys the victim is found by scanning the residents; larger
    caches keep a heap with lazy deletion (O(log n) per call).
    """

    def __init__(self, capacity: int, num_streams: int = 1) -> None:
        super().__init__(capacity, num_streams)
        self._score: dict[int, Score] = {}  # resident key -> its current score
        self._heap: list[tuple[float, float, int]] | None = None if capacity <= SCAN_LIMIT else []

    @abstractmethod
    def score_on_hit(self, key: int, time: int) -> Score:
        """New score of resident ``key`` requested at ``time``."""

    @abstractmethod
    def score_on_insert(self, key: int, time: int) -> Score:
        """Score of ``key`` inserted at ``time``."""

    def on_hit(self, key: int, time: int) -> None:
        score = self.score_on_hit(key, time)
        if score != self._score[key]:
            self._score[key] = score
            if self._heap is not None:
                self._push(score, key)

    def on_insert(self, key: int, time: int) -> None:
        score = self.score_on_insert(key, time)
        self._score[key] = score
        if self._heap is not None:
            self._push(score, key)

    def evict(self, pinned: Container[int], time: int) -> int:
        scores = self._score
        if self._heap is None:
            candidates = [key for key in scores if key not in pinned]
            if not candidates:
                raise _all_pinned()
            victim = min(candidates, key=scores.__getitem__)
            del scores[victim]
            return victim
        heap = self._heap
        skipped: list[tuple[float, float, int]] = []
        while heap:
            entry = heapq.heappop(heap)
            value, tie_break, key = entry
            if scores.get(key) != (value, tie_break):
                continue  # stale: the key was evicted or re-scored since
            if key in pinned:
                skipped.append(entry)
                continue
            del scores[key]
            for kept in skipped:
                heapq.heappush(heap, kept)
            return key
        raise _all_pinned()

    def _push(self, score: Score, key: int) -> None:
        assert self._heap is not None
        heapq.heappush(self._heap, (score[0], score[1], key))
        if len(self._heap) > 8 * len(self._score) + 64:
            # Stale entries pile up under often re-scored keys; rebuild from the live scores.
            self._heap = [(value, tie_break, key) for key, (value, tie_break) in self._score.items()]
            heapq.heapify(self._heap)


@EVICTION_POLICIES.register("lfu")
class LFUPolicy(ScoredPolicy):
    """Least frequently used: evict the key requested fewest times so far, the least recent on ties.

    Counts cover the whole past, including requests made while the key was not resident
    ("perfect" LFU), so an expert popular overall survives a quiet spell.
    """

    def __init__(self, capacity: int, num_streams: int = 1) -> None:
        super().__init__(capacity, num_streams)
        self._count: dict[int, int] = {}

    def _bump(self, key: int, time: int) -> Score:
        count = self._count.get(key, 0) + 1
        self._count[key] = count
        return (count, time)

    score_on_hit = _bump
    score_on_insert = _bump


@EVICTION_POLICIES.register("lrfu")
class LRFUPolicy(ScoredPolicy):
    """Least recently/frequently used (Lee et al. 2001): evict the lowest decayed use count.

    A key's weight is ``sum over its past requests of 2 ** (-age / half_life)``, ages counted in
    steps of its own stream (tokens), over the whole past. A short half-life behaves like LRU, a
    long one like LFU; the default of 32 tokens keeps what a prompt keeps using. Decay scales
    every weight alike, so scores are stored as ``log2(weight) + now / half_life``, which only
    changes when the key is requested.
    """

    def __init__(self, capacity: int, num_streams: int = 1, half_life: float = 32.0) -> None:
        super().__init__(capacity, num_streams)
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self._rate = 1.0 / (half_life * num_streams)
        self._log_weight: dict[int, float] = {}

    def _bump(self, key: int, time: int) -> Score:
        now = time * self._rate
        previous = self._log_weight.get(key)
        # log2(2**previous + 2**now) with previous <= now, without overflow.
        value = now if previous is None else now + math.log2(1.0 + 2.0 ** (previous - now))
        self._log_weight[key] = value
        return (value, time)

    score_on_hit = _bump
    score_on_insert = _bump


@EVICTION_POLICIES.register("belady")
class BeladyPolicy(ScoredPolicy):
    """Belady's MIN, the offline optimum: evict the key whose next request is farthest ahead.

    Needs ``prepare(steps)`` with the exact stream that follows; keys never requested again go
    first. With pinning (a step's keys resident together) it stays optimal among policies that
    load only on demand, so no online policy gets more hits on the same stream.
    """

    online = False
    needs_stream = True

    def __init__(self, capacity: int, num_streams: int = 1) -> None:
        super().__init__(capacity, num_streams)
        self._uses: dict[int, list[int]] | None = None  # key -> its request times, latest first

    def prepare(self, steps: Sequence[Sequence[int]]) -> None:
        uses: dict[int, list[int]] = {}
        for time in range(len(steps) - 1, -1, -1):
            for key in steps[time]:
                uses.setdefault(key, []).append(time)
        self._uses = uses

    def _next_use(self, key: int, time: int) -> Score:
        if self._uses is None:
            raise RuntimeError("belady needs prepare(steps) with the future stream before the first step")
        times = self._uses[key]
        while times and times[-1] <= time:
            times.pop()
        # The farthest next use gets the lowest score; never again is farthest of all.
        return (-(times[-1] if times else math.inf), 0.0)

    score_on_hit = _next_use
    score_on_insert = _next_use


# -- predicted reuse: an online-learned model of which experts come back soon -----------------


@EVICTION_POLICIES.register("predicted-reuse")
class PredictedReusePolicy(EvictionPolicy):
    """Evict the resident key least likely to be requested again within ``horizon`` steps.

    The likelihood is :func:`reuse_scores`: a logistic model of each key's near-future reuse
    from its own history (decayed use counts at several half-lives, age, long-run rate) and from
    what the keys of the latest steps were followed by in the past (transition counts), refitted
    on the stream seen so far. Every figure at step t comes from steps 0..t, so the policy is
    online; it is computed in one vectorised pass by ``prepare`` (hence ``needs_stream``: a live
    cache would need an incremental version of the same features).
    """

    needs_stream = True

    def __init__(self, capacity: int, num_streams: int = 1, horizon: int = 3) -> None:
        super().__init__(capacity, num_streams)
        self.horizon = horizon
        self._rows: list[list[float]] | None = None  # one stream: [time][key] score, as lists
        self._stream_scores: list[np.ndarray] = []  # several streams: float32 [n_s, width_s]
        self._stream_base: list[int] = []  # first key of each stream's score columns
        self._current = np.zeros(0)  # several streams: float64 [keys] latest score of every key
        self._resident = np.zeros(0, dtype=bool)  # several streams: bool [keys]
        self._synced_time = -1
        self._resident_keys: set[int] = set()

    def prepare(self, steps: Sequence[Sequence[int]]) -> None:
        streams = self.num_streams
        flat_max = max((max(keys) for keys in steps if keys), default=-1)
        if streams == 1:
            scores = reuse_scores(_padded(steps), flat_max + 1, horizon=self.horizon)  # [n, keys]
            self._rows = scores.tolist()
            return
        self._stream_scores, self._stream_base = [], []
        for stream in range(streams):
            ids = _padded(steps[stream::streams])  # [n_s, K]
            known = ids[ids >= 0]
            base = int(known.min()) if known.size else 0
            width = int(known.max()) - base + 1 if known.size else 1
            self._stream_base.append(base)
            self._stream_scores.append(reuse_scores(np.where(ids >= 0, ids - base, -1), width, self.horizon))
        self._current = np.zeros(flat_max + 1)
        self._resident = np.zeros(flat_max + 1, dtype=bool)

    def _sync(self, time: int) -> None:
        # Several streams: refresh the columns of the stream whose step this is.
        if time != self._synced_time:
            stream, index = time % self.num_streams, time // self.num_streams
            row = self._stream_scores[stream][index]
            base = self._stream_base[stream]
            self._current[base : base + row.shape[0]] = row
            self._synced_time = time

    def on_hit(self, key: int, time: int) -> None:
        pass

    def on_insert(self, key: int, time: int) -> None:
        if self._rows is None:
            self._resident[key] = True
        else:
            self._resident_keys.add(key)

    def evict(self, pinned: Container[int], time: int) -> int:
        if self._rows is not None:
            row = self._rows[time]
            candidates = [key for key in self._resident_keys if key not in pinned]
            if not candidates:
                raise _all_pinned()
            victim = min(candidates, key=row.__getitem__)
            self._resident_keys.remove(victim)
            return victim
        if not self._stream_scores:
            raise RuntimeError("predicted-reuse needs prepare(steps) before the first step")
        self._sync(time)
        candidates_mask = self._resident.copy()
        for key in pinned:  # type: ignore[attr-defined]  # pinned is the step's key list
            candidates_mask[key] = False
        if not candidates_mask.any():
            raise _all_pinned()
        victim = int(np.where(candidates_mask, self._current, np.inf).argmin())
        self._resident[victim] = False
        return victim


def _padded(steps: Sequence[Sequence[int]]) -> np.ndarray:
    """int64 [n, K] the steps' keys, rows padded with -1 to the widest step."""
    width = max((len(keys) for keys in steps), default=0)
    ids = np.full((len(steps), max(width, 1)), -1, dtype=np.int64)
    for time, keys in enumerate(steps):
        ids[time, : len(keys)] = keys
    return ids
