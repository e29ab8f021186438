"""Eviction policies for an expert cache: which resident experts to drop when new ones must load.

A policy is a small class that sees a stream of *steps* and keeps its own view of which keys are
resident. It knows nothing of models, tensors or bytes: a key is a small non-negative int (an
expert id in a per-layer cache, ``layer * E + expert`` in a cache shared by all layers), and time
is the index of the step in the stream its cache sees (0, 1, 2, ...).

One step is one token at one MoE layer: the distinct keys it is routed to, all needed at once.
The caller (:func:`moeserve.memory.cache_sim.replay`, or a live cache) drives a policy through
this contract, for every step in order::

    evict(count, pinned, time) -> keys   only when the step's missing keys do not fit
    on_step(keys, loaded, time)          always: the step requested ``keys``; ``loaded`` of
                                         them were missing and are now resident, the rest hit

``pinned`` is the step's requested keys: they must all be resident together, so ``evict`` must
return ``count`` distinct resident keys *not* in ``pinned`` and forget them (the caller
guarantees enough exist: capacity >= the widest step). A cache shared by several layers sees
their steps interleaved round-robin: ``num_streams`` streams with disjoint keys, step ``time``
belonging to stream ``time % num_streams`` (a per-layer cache has one stream).

``prepare(steps, context)`` hands a policy the whole stream before step 0, and optionally a
:class:`StreamContext`: what a server also knows at each step (which steps open a new request,
the same token's experts at the previous MoE layer). Online policies (``online``) use only the
past: most ignore ``prepare``; the ``predicted-reuse`` policies compute from it, in one
vectorised pass, scores whose row for step t depends on steps 0..t (and their context) only (a
test changes the future and checks that nothing before it moves). ``belady`` alone reads the
future. Policies whose ``needs_stream`` is true cannot run in a live cache, which does not know
the stream in advance; they exist for trace replay.

Registered in :data:`EVICTION_POLICIES` (constructor ``policy_class(capacity, num_streams=1)``):

===========================  ======================================================================
``lru``                      evict the least recently used
``lfu``                      evict the least frequently used over the whole past; ties: least recent
``fifo``                     evict the earliest inserted; hits change nothing
``lifo``                     evict the latest inserted (expert buffering, Huang et al. 2303.06182)
``belady``                   offline optimum MIN: evict the key whose next use is farthest ahead
``lrfu``                     evict the lowest exponentially decayed use count (recency and frequency)
``predicted-reuse``          evict the key an online-learned model finds least likely to be reused
                             soon
``predicted-reuse-context``  ``predicted-reuse`` that also reads the stream's context (request
                             starts, the previous layer's experts of the same token)
===========================  ======================================================================
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from moeserve.registry import Registry

Score = tuple[float, float]
"""A :class:`ScoredPolicy` score: ``(value, tie_break)``, the lowest evicted first."""

SCAN_LIMIT = 64
"""Caches up to this many keys find victims by scanning the residents; larger ones keep a heap."""

EVICTION_POLICIES: Registry[type[EvictionPolicy]] = Registry("eviction policy")
"""Every eviction policy by name; build one cache's with ``EVICTION_POLICIES.get(name)(capacity)``."""


@dataclass(frozen=True)
class StreamContext:
    """What a server knows at each step of a one-stream (per-layer) replay besides the step's keys.

    Both are known before the step's experts load: a server knows which request a token belongs
    to, and the token's previous MoE layer ran before this one. Shape legend: n steps, K slots.
    """

    sequence_starts: np.ndarray
    """bool [n]: the step is the first token of a request's sequence."""
    previous_layer: np.ndarray | None = None
    """int [n, K]: the same token's experts at the previous MoE layer, -1 for none; None for the
    first MoE layer. Ids are in that layer's own range (not keys of this stream)."""

    def __post_init__(self) -> None:
        if self.sequence_starts.ndim != 1:
            raise ValueError(f"sequence_starts must be 1-D [n], got shape {self.sequence_starts.shape}")
        previous = self.previous_layer
        if previous is not None and (
            previous.ndim != 2 or previous.shape[0] != self.sequence_starts.shape[0]
        ):
            raise ValueError(
                f"previous_layer must be [n, K] with n = {self.sequence_starts.shape[0]} steps, "
                f"got shape {previous.shape}"
            )


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

    def prepare(  # noqa: B027 (an optional hook)
        self, steps: Sequence[Sequence[int]], context: StreamContext | None = None
    ) -> None:
        """Receive the whole stream (``steps[time]`` = that step's keys) before step 0.

        Policies that do not need it ignore it; one whose ``needs_stream`` is true fails without it.
        ``context`` (one stream only) is what a server also knows at each step; policies that do
        not use it ignore it.
        """

    @abstractmethod
    def evict(self, count: int, pinned: Collection[int], time: int) -> list[int]:
        """Forget and return ``count`` distinct resident keys, none of them in ``pinned``."""

    @abstractmethod
    def on_step(self, keys: Sequence[int], loaded: Collection[int], time: int) -> None:
        """Step ``time`` requested ``keys``; those in ``loaded`` were missing and are now resident."""


def _too_few(count: int, candidates: int) -> AssertionError:
    return AssertionError(
        f"asked to evict {count} keys but only {candidates} unpinned are resident; "
        "the caller broke capacity >= step width"
    )


# -- order policies: O(1) per key ----------------------------------------------------------------


class _OrderPolicy(EvictionPolicy):
    """Resident keys in one order; evict from the front (oldest) or, with ``evict_newest``, the back."""

    refresh_on_hit: ClassVar[bool]
    evict_newest: ClassVar[bool] = False

    def __init__(self, capacity: int, num_streams: int = 1) -> None:
        super().__init__(capacity, num_streams)
        self._order: OrderedDict[int, None] = OrderedDict()

    def evict(self, count: int, pinned: Collection[int], time: int) -> list[int]:
        victims: list[int] = []
        for key in reversed(self._order) if self.evict_newest else self._order:
            if key not in pinned:
                victims.append(key)
                if len(victims) == count:
                    break
        if len(victims) < count:
            raise _too_few(count, len(victims))
        for key in victims:
            del self._order[key]
        return victims

    def on_step(self, keys: Sequence[int], loaded: Collection[int], time: int) -> None:
        order = self._order
        if self.refresh_on_hit:
            for key in keys:
                if key in order:
                    order.move_to_end(key)
                else:
                    order[key] = None
        else:
            for key in loaded:
                order[key] = None


@EVICTION_POLICIES.register("lru")
class LRUPolicy(_OrderPolicy):
    """Least recently used: evict the keys whose last request is oldest."""

    refresh_on_hit = True


@EVICTION_POLICIES.register("fifo")
class FIFOPolicy(_OrderPolicy):
    """First in, first out: evict the keys inserted earliest; hits change nothing."""

    refresh_on_hit = False


@EVICTION_POLICIES.register("lifo")
class LIFOPolicy(_OrderPolicy):
    """Last in, first out: evict the keys inserted most recently (expert buffering's policy).

    Keys loaded early stay for good, so the cache settles on whatever it held first; the keys
    evicted are the newest that the current step does not need.
    """

    refresh_on_hit = False
    evict_newest = True


# -- scored policies: evict the lowest scores ----------------------------------------------------


class ScoredPolicy(EvictionPolicy):
    """Evict the resident, unpinned keys of lowest score; a subclass says what the score is.

    A subclass's ``on_step`` writes the new scores of the step's keys into ``self._score`` (every
    resident key has one) and then calls ``self._scored(keys)``. Scores change only when a key is
    requested; any drift with time alone must keep their order, so a stored score stays
    comparable with a fresh one. Up to :data:`SCAN_LIMIT` keys the victims are found by scanning
    the residents; larger caches keep a heap with lazy deletion (O(log n) per key).
    """

    def __init__(self, capacity: int, num_streams: int = 1) -> None:
        super().__init__(capacity, num_streams)
        self._score: dict[int, Score] = {}  # resident key -> its current score
        self._heap: list[tuple[float, float, int]] | None = None if capacity <= SCAN_LIMIT else []

    def _scored(self, keys: Sequence[int]) -> None:
        """Index the fresh scores of ``keys`` (only needed for the heap)."""
        heap = self._heap
        if heap is None:
            return
        scores = self._score
        for key in keys:
            value, tie_break = scores[key]
            heapq.heappush(heap, (value, tie_break, key))
        if len(heap) > 8 * len(scores) + 64:
            # Stale entries pile up under often re-scored keys; rebuild from the live scores.
            self._heap = [(value, tie_break, key) for key, (value, tie_break) in scores.items()]
            heapq.heapify(self._heap)

    def evict(self, count: int, pinned: Collection[int], time: int) -> list[int]:
        scores = self._score
        if self._heap is None:
            candidates = [key for key in scores if key not in pinned]
            if len(candidates) < count:
                raise _too_few(count, len(candidates))
            if count == 1:
                victims = [min(candidates, key=scores.__getitem__)]
            else:
                victims = sorted(candidates, key=scores.__getitem__)[:count]
        else:
            victims = self._pop_lowest(count, pinned)
        for key in victims:
            del scores[key]
        return victims

    def _pop_lowest(self, count: int, pinned: Collection[int]) -> list[int]:
        assert self._heap is not None
        heap, scores = self._heap, self._score
        victims: list[int] = []
        skipped: list[tuple[float, float, int]] = []
        while heap and len(victims) < count:
            entry = heapq.heappop(heap)
            value, tie_break, key = entry
            if scores.get(key) != (value, tie_break) or key in victims:
                continue  # stale: the key was evicted or re-scored since
            if key in pinned:
                skipped.append(entry)
            else:
                victims.append(key)
        for entry in skipped:
            heapq.heappush(heap, entry)
        if len(victims) < count:
            raise _too_few(count, len(victims))
        return victims


@EVICTION_POLICIES.register("lfu")
class LFUPolicy(ScoredPolicy):
    """Least frequently used: evict the keys requested fewest times so far, the least recent on ties.

    Counts cover the whole past, including requests made while the key was not resident
    ("perfect" LFU), so an expert popular overall survives a quiet spell.
    """

    def __init__(self, capacity: int, num_streams: int = 1) -> None:
        super().__init__(capacity, num_streams)
        self._count: dict[int, int] = {}

    def on_step(self, keys: Sequence[int], loaded: Collection[int], time: int) -> None:
        counts, scores = self._count, self._score
        for key in keys:
            count = counts.get(key, 0) + 1
            counts[key] = count
            scores[key] = (count, time)
        self._scored(keys)


@EVICTION_POLICIES.register("lrfu")
class LRFUPolicy(ScoredPolicy):
    """Least recently/frequently used (Lee et al., 2001): evict the lowest decayed use counts.

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

    def on_step(self, keys: Sequence[int], loaded: Collection[int], time: int) -> None:
        now = time * self._rate
        log_weights, scores = self._log_weight, self._score
        for key in keys:
            previous = log_weights.get(key)
            # log2(2**previous + 2**now) with previous <= now, without overflow.
            value = now if previous is None else now + math.log2(1.0 + 2.0 ** (previous - now))
            log_weights[key] = value
            scores[key] = (value, time)
        self._scored(keys)


@EVICTION_POLICIES.register("belady")
class BeladyPolicy(ScoredPolicy):
    """Belady's MIN, the offline optimum: evict the keys whose next request is farthest ahead.

    Needs ``prepare(steps)`` with the exact stream that follows; keys never requested again go
    first. With pinning (a step's keys resident together) it stays optimal among policies that
    load only on demand, so no online policy gets more hits on the same stream.
    """

    online = False
    needs_stream = True

    def __init__(self, capacity: int, num_streams: int = 1) -> None:
        super().__init__(capacity, num_streams)
        self._uses: dict[int, list[int]] | None = None  # key -> its request times, latest first

    def prepare(self, steps: Sequence[Sequence[int]], context: StreamContext | None = None) -> None:
        uses: dict[int, list[int]] = {}
        for time in range(len(steps) - 1, -1, -1):
            for key in steps[time]:
                uses.setdefault(key, []).append(time)
        self._uses = uses

    def on_step(self, keys: Sequence[int], loaded: Collection[int], time: int) -> None:
        if self._uses is None:
            raise RuntimeError("belady needs prepare(steps) with the future stream before the first step")
        uses, scores = self._uses, self._score
        for key in keys:
            times = uses[key]
            while times and times[-1] <= time:
                times.pop()
            # The farthest next use gets the lowest score; never again is farthest of all.
            scores[key] = (-(times[-1] if times else math.inf), 0.0)
        self._scored(keys)


# -- predicted reuse: an online-learned model of which experts come back soon --------------------


@EVICTION_POLICIES.register("predicted-reuse")
class PredictedReusePolicy(EvictionPolicy):
    """Evict the resident keys least likely to be requested again within a horizon of steps.

    The likelihood is :func:`reuse_scores`: a logistic model of each key's near-future reuse
    from its own history (decayed use counts at several half-lives, age, long-run rate) and from
    what the keys of the latest steps were followed by in the past (transition counts), refitted
    on the stream seen so far. Every figure at step t comes from steps 0..t, so the policy is
    online; ``prepare`` computes them in one vectorised pass (hence ``needs_stream``: a live cache
    would need an incremental version of the same features).
    """

    needs_stream = True

    def __init__(self, capacity: int, num_streams: int = 1, horizon: int | None = None) -> None:
        """``horizon`` in steps of a stream; None picks ``1.5 * capacity / (streams * widest step)``.

        The automatic horizon is about how long a key survives unused in a cache of this size: a
        bigger cache keeps keys for later reuse (on the DeepSeek-V2-Lite trace: 3 steps at 12
        slots per layer, 8 at 32).
        """
        super().__init__(capacity, num_streams)
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon must be >= 1 step, got {horizon}")
        self.horizon = horizon
        # One stream: resident keys and the score rows as Python lists (fast to scan).
        self._resident: set[int] = set()
        self._rows: list[list[float]] | None = None  # [time][key]
        # Several streams: numpy over every key, refreshed one stream per step.
        self._stream_scores: list[np.ndarray] = []  # float32 [n_s, width_s] per stream
        self._stream_base: list[int] = []  # key of column 0 of each stream's scores
        self._latest = np.zeros(0)  # float64 [keys] score of every key at its stream's latest step
        self._resident_mask = np.zeros(0, dtype=bool)  # bool [keys]

    def _horizon(self, steps: Sequence[Sequence[int]]) -> int:
        if self.horizon is not None:
            return self.horizon
        widest = max((len(keys) for keys in steps), default=1)
        return max(1, min(32, round(1.5 * self.capacity / (self.num_streams * max(widest, 1)))))

    def prepare(self, steps: Sequence[Sequence[int]], context: StreamContext | None = None) -> None:
        largest = max((max(keys) for keys in steps if keys), default=-1)
        horizon = self._horizon(steps)
        if self.num_streams == 1:
            if largest < 0:  # nothing is ever requested, so nothing is ever evicted
                self._rows = [[] for _ in steps]
            else:
                self._rows = self._scores(_padded(steps), largest + 1, horizon, context).tolist()
            return
        self._stream_scores, self._stream_base = [], []
        for stream in range(self.num_streams):
            ids = _padded(steps[stream :: self.num_streams])  # [n_s, K]
            known = ids[ids >= 0]
            base = int(known.min()) if known.size else 0
            width = int(known.max()) - base + 1 if known.size else 1
            self._stream_base.append(base)
            self._stream_scores.append(reuse_scores(np.where(ids >= 0, ids - base, -1), width, horizon))
        self._latest = np.zeros(largest + 1)
        self._resident_mask = np.zeros(largest + 1, dtype=bool)

    def _scores(
        self, ids: np.ndarray, num_keys: int, horizon: int, context: StreamContext | None
    ) -> np.ndarray:
        """float32 [n, num_keys] one stream's scores (higher = reused sooner); ``context`` unused here."""
        return reuse_scores(ids, num_keys, horizon)

    def on_step(self, keys: Sequence[int], loaded: Collection[int], time: int) -> None:
        if self._rows is not None:
            self._resident.update(loaded)
            return
        self._refresh(time)
        for key in loaded:
            self._resident_mask[key] = True

    def evict(self, count: int, pinned: Collection[int], time: int) -> list[int]:
        if self._rows is not None:
            by_score = self._rows[time].__getitem__
            candidates = [key for key in self._resident if key not in pinned]
            if len(candidates) < count:
                raise _too_few(count, len(candidates))
            victims = (
                [min(candidates, key=by_score)] if count == 1 else sorted(candidates, key=by_score)[:count]
            )
            self._resident.difference_update(victims)
            return victims
        self._refresh(time)
        allowed = self._resident_mask.copy()  # [keys]
        allowed[list(pinned)] = False
        available = int(allowed.sum())
        if available < count:
            raise _too_few(count, available)
        masked = np.where(allowed, self._latest, np.inf)  # [keys]
        chosen = np.argpartition(masked, count - 1)[:count]  # the count lowest, in any order
        self._resident_mask[chosen] = False
        return chosen.tolist()

    def _refresh(self, time: int) -> None:
        """Several streams: give the keys of step ``time``'s stream their scores at that step."""
        if not self._stream_scores:
            raise RuntimeError("predicted-reuse needs prepare(steps) before the first step")
        stream = time % self.num_streams
        row = self._stream_scores[stream][time // self.num_streams]
        base = self._stream_base[stream]
        self._latest[base : base + row.shape[0]] = row


@EVICTION_POLICIES.register("predicted-reuse-context")
class ContextReusePolicy(PredictedReusePolicy):
    """``predicted-reuse`` whose model also reads the stream's :class:`StreamContext`.

    The extra features (:func:`context_features`) say how much of the current request has used
    each key, and what the same token's experts at the previous MoE layer were followed by, at
    this layer, in the past. Without a context (a cache shared by several layers, or a caller that
    has none) it is ``predicted-reuse``. Online for the same reason: row t of every feature
    depends on steps 0..t and their context.

    On the DeepSeek-V2-Lite trace with 16 of 64 experts per layer it keeps 78.9% of Belady's hits
    (``predicted-reuse`` 78.6%, LRU 70.9%). Most of the gap is information no online policy has:
    told the next token's experts exactly, ``predicted-reuse`` reaches about 83% (an exploratory
    replay, not a registered policy).
    """

    def _scores(
        self, ids: np.ndarray, num_keys: int, horizon: int, context: StreamContext | None
    ) -> np.ndarray:
        if context is None:
            return reuse_scores(ids, num_keys, horizon)
        if context.sequence_starts.shape[0] != ids.shape[0]:
            raise ValueError(
                f"the context covers {context.sequence_starts.shape[0]} steps, the stream has {ids.shape[0]}"
            )
        return reuse_scores(ids, num_keys, horizon, extra_features=context_features(ids, num_keys, context))


def _padded(steps: Sequence[Sequence[int]]) -> np.ndarray:
    """int64 [n, K] the steps' keys, rows padded with -1 to the widest step."""
    width = max((len(keys) for keys in steps), default=0)
    if steps and all(len(keys) == width for keys in steps):
        return np.array(steps, dtype=np.int64).reshape(len(steps), width)
    ids = np.full((len(steps), max(width, 1)), -1, dtype=np.int64)
    for time, keys in enumerate(steps):
        ids[time, : len(keys)] = keys
    return ids


REUSE_HALF_LIVES = (1.0, 4.0, 16.0, 64.0)
"""Half-lives, in steps, of the decayed use counts :func:`reuse_scores` feeds its model."""


def reuse_scores(
    ids: np.ndarray,
    num_keys: int,
    horizon: int = 3,
    chunk: int = 512,
    sample_steps: int = 512,
    candidate_age: int = 32,
    seed: int = 0,
    extra_features: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """Logit that each key is requested within the next ``horizon`` steps, from the past only.

    ``ids``: int [n, K] keys requested per step, in ``[0, num_keys)`` or -1 for none. Returns
    float32 [n, num_keys] scores: row t (the state after step t) depends on ``ids[: t + 1]``
    only, and a higher score means an earlier expected reuse. Deterministic for a given ``seed``.

    1. Features per (step t, key e), all causal:
       decayed use counts ``sum_{s <= t} 2 ** (-(t - s) / h)`` for h in :data:`REUSE_HALF_LIVES`;
       log(1 + steps since the last use); uses / steps so far; the transition score
       ``sum_{j in step t} P(e at s+1 | j at s)`` and its decayed sums (half-lives 4 and 16);
       and the lag-2 transition score. Transition probabilities come from pair counts of the
       steps before the current chunk of ``chunk`` steps. Then ``extra_features`` (float32
       [n, E] each; the caller keeps them causal), e.g. :func:`context_features`.
    2. Targets: whether e is requested in steps t+1..t+horizon.
    3. At chunk starts, whenever the steps with known targets have doubled (or grown by 16
       chunks) since the last fit, refit a logistic regression (a few Newton steps, warm-started)
       on ``sample_steps`` random earlier steps, keeping the keys used within the last
       ``candidate_age`` steps (those a cache could still hold). Before the first fit the score is
       the decayed count of half-life 16 steps.
    4. Score each chunk with the latest weights.

    Shape legend: n steps, K keys per step (padded with -1), E = num_keys, F features.
    """
    num_steps, width = ids.shape
    if num_keys < 1:
        raise ValueError(f"num_keys must be >= 1, got {num_keys}")
    padding = num_keys  # one extra column absorbs the -1 entries
    ids = np.where(ids >= 0, ids, padding)  # [n, K]
    steps_index = np.arange(num_steps)  # [n]
    used = np.zeros((num_steps, num_keys + 1), dtype=np.float32)  # [n, E+1]
    used[np.repeat(steps_index, width), ids.reshape(-1)] = 1.0
    used = used[:, :num_keys]  # [n, E]

    # 1. Features.
    features = [_decayed(used, half_life) for half_life in REUSE_HALF_LIVES]
    last_use = np.maximum.accumulate(np.where(used > 0, steps_index[:, None], -(10**6)), axis=0)  # [n, E]
    log_age = np.log1p((steps_index[:, None] - last_use).astype(np.float32))  # [n, E]
    features.append(log_age)
    features.append((np.cumsum(used, axis=0) / (steps_index[:, None] + 1.0)).astype(np.float32))
    next_step = _transition_scores(ids, num_keys, lag=1, chunk=chunk)  # [n, E]
    features += [next_step, _decayed(next_step, 4.0), _decayed(next_step, 16.0)]
    features.append(_transition_scores(ids, num_keys, lag=2, chunk=chunk))
    for extra in extra_features:
        if extra.shape != (num_steps, num_keys):
            raise ValueError(f"an extra feature has shape {extra.shape}, expected {(num_steps, num_keys)}")
        features.append(extra.astype(np.float32, copy=False))
    num_features = len(features)

    # 2. Targets.
    cumulative = np.concatenate([np.zeros((1, num_keys), dtype=np.float32), np.cumsum(used, axis=0)])
    window_end = np.minimum(steps_index + horizon + 1, num_steps)
    targets = cumulative[window_end] - cumulative[steps_index + 1] > 0  # [n, E]

    # 3-4. Fit and score chunk by chunk.
    rng = np.random.default_rng(seed)
    scores = np.empty((num_steps, num_keys), dtype=np.float32)  # [n, E]
    weights: np.ndarray | None = None  # [F+1] on standardised features, bias last
    coefficients, offset = np.zeros(num_features, dtype=np.float32), np.float32(0.0)
    fitted_on = 0
    for start in range(0, num_steps, chunk):
        stop = min(num_steps, start + chunk)
        known = start - horizon  # steps whose targets lie before this chunk
        refit = weights is None or known >= 2 * fitted_on or known - fitted_on >= 16 * chunk
        if known >= min(256, chunk) and refit:
            rows = rng.integers(0, known, size=sample_steps)  # [m]
            sample = np.stack([feature[rows] for feature in features], axis=-1).reshape(-1, num_features)
            labels = targets[rows].reshape(-1)
            keep = log_age[rows].reshape(-1) <= math.log1p(candidate_age)
            sample, labels = sample[keep].astype(np.float64), labels[keep].astype(np.float64)
            mean, spread = sample.mean(axis=0), sample.std(axis=0) + 1e-6
            start_weights = np.zeros(num_features + 1) if weights is None else weights
            weights = _fit_logistic((sample - mean) / spread, labels, start_weights)
            coefficients = (weights[:-1] / spread).astype(np.float32)
            offset = np.float32(weights[-1] - (mean / spread) @ weights[:-1])
            fitted_on = known
        if weights is None:
            scores[start:stop] = features[2][start:stop]
            continue
        logits = np.full((stop - start, num_keys), offset, dtype=np.float32)
        for coefficient, feature in zip(coefficients, features, strict=True):
            logits += coefficient * feature[start:stop]
        scores[start:stop] = logits
    return scores


def _decayed(values: np.ndarray, half_life: float, block: int = 512) -> np.ndarray:
    """float32 [n, E]: ``out[t] = sum_{s <= t} 2 ** (-(t - s) / half_life) * values[s]``.

    Block-wise cumulative sums in float64, not matrix products (small BLAS calls stall on a
    loaded machine). Within a block the weights ``2 ** (i / half_life)`` must stay below
    float64's 2 ** 1023, so the block is cut for half-lives under one step.
    """
    num_steps, num_keys = values.shape
    decay = 2.0 ** (-1.0 / half_life)
    block = max(1, min(block, int(900 * half_life)))
    position = np.arange(block, dtype=np.float64)
    grow, shrink, carry_weight = decay**-position, decay**position, decay ** (position + 1)  # [B] each
    out = np.empty((num_steps, num_keys), dtype=np.float32)
    carry = np.zeros(num_keys)  # [E] out[start - 1]
    for start in range(0, num_steps, block):
        stop = min(num_steps, start + block)
        size = stop - start
        block_out = np.cumsum(values[start:stop] * grow[:size, None], axis=0) * shrink[:size, None]
        block_out += carry_weight[:size, None] * carry
        out[start:stop] = block_out
        carry = block_out[-1]
    return out


def _transition_scores(
    ids: np.ndarray, num_keys: int, lag: int, chunk: int, sources: np.ndarray | None = None
) -> np.ndarray:
    """float32 [n, E]: ``sum_{j in sources[t]} P(e at step s + lag | j in sources[s])``.

    ``ids`` [n, K] uses ``num_keys`` as padding; ``sources`` [n, K'] (default ``ids``) too, with
    ids below ``num_keys``. P for the steps of one chunk is estimated (with a small uniform prior)
    from the pairs whose later step precedes the chunk (lag 0: the pairs of earlier steps).
    """
    sources = ids if sources is None else sources
    num_steps = ids.shape[0]
    side = num_keys + 1
    pair_counts = np.zeros(side * side)  # [(E+1)*(E+1)] from-key * side + to-key
    probabilities = np.zeros((side, num_keys), dtype=np.float32)  # [E+1, E]; padding row stays 0
    out = np.empty((num_steps, num_keys), dtype=np.float32)
    prior = 0.05
    for start in range(0, num_steps, chunk):
        stop = min(num_steps, start + chunk)
        counts = pair_counts.reshape(side, side)[:num_keys, :num_keys]  # [E, E]
        probabilities[:num_keys] = (counts + prior) / (counts.sum(axis=1, keepdims=True) + prior * num_keys)
        out[start:stop] = probabilities[sources[start:stop]].sum(axis=1)
        first = max(start, lag)
        if first < stop:
            pairs = sources[first - lag : stop - lag, :, None] * side + ids[first:stop, None, :]  # [m, K', K]
            pair_counts += np.bincount(pairs.reshape(-1), minlength=side * side)
    return out


CONTEXT_HALF_LIVES = (4.0, 16.0, 64.0)
"""Half-lives, in steps, of the per-request decayed use counts in :func:`context_features`."""


def context_features(
    ids: np.ndarray, num_keys: int, context: StreamContext, chunk: int = 512
) -> list[np.ndarray]:
    """float32 [n, E] features of one stream's context for :func:`reuse_scores`; row t uses steps 0..t.

    ``ids`` [n, K] as in :func:`reuse_scores` (-1 for none). Shape legend: n steps, K slots, E =
    num_keys, P previous-layer ids.

    1. Per request: decayed use counts that restart at every sequence start (half-lives
       :data:`CONTEXT_HALF_LIVES`) and log(1 + tokens since the request began). A new request
       starts from nothing; the whole-stream counts keep the long-run popularity.
    2. With ``previous_layer``: ``sum_{j at layer l-1, token t} P(e at layer l, token t+1 | j)``
       and its decayed sum (half-life 4), and the same-token score
       ``sum_j P(e at layer l, token t | j at layer l-1, token t)`` decayed (half-life 4): what the
       request's recent tokens looked like one layer earlier. Probabilities come from pair
       counts of earlier chunks, as in the transition scores.
    """
    num_steps = ids.shape[0]
    padding = num_keys
    clean = np.where(ids >= 0, ids, padding)  # [n, K]
    used = np.zeros((num_steps, num_keys + 1), dtype=np.float32)  # [n, E+1]
    used[np.repeat(np.arange(num_steps), clean.shape[1]), clean.reshape(-1)] = 1.0
    used = used[:, :num_keys]  # [n, E]
    # 1. Per-request counts: decayed sums restarted at each start.
    starts = np.flatnonzero(context.sequence_starts[:num_steps])
    bounds = np.unique(np.concatenate([[0], starts, [num_steps]]))  # segment edges
    features = []
    for half_life in CONTEXT_HALF_LIVES:
        per_request = np.empty((num_steps, num_keys), dtype=np.float32)  # [n, E]
        for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
            per_request[begin:end] = _decayed(used[begin:end], half_life)
        features.append(per_request)
    segment = np.searchsorted(bounds, np.arange(num_steps), side="right") - 1  # [n]
    position = np.log1p(np.arange(num_steps) - bounds[segment]).astype(np.float32)  # [n]
    features.append(np.repeat(position[:, None], num_keys, axis=1))
    # 2. The previous layer of the same token.
    if context.previous_layer is not None:
        previous = context.previous_layer.astype(np.int64)  # [n, P]
        width = max(int(previous.max(initial=-1)) + 1, num_keys)
        sources = np.where(previous >= 0, previous, width)  # padding of the wider id range
        targets = np.where(ids >= 0, ids, width)
        next_token = _transition_scores(targets, width, lag=1, chunk=chunk, sources=sources)[:, :num_keys]
        same_token = _transition_scores(targets, width, lag=0, chunk=chunk, sources=sources)[:, :num_keys]
        features += [next_token, _decayed(next_token, 4.0), _decayed(same_token, 4.0)]
    return features


def _fit_logistic(
    features: np.ndarray, labels: np.ndarray, weights: np.ndarray, iterations: int = 5, l2: float = 1e-3
) -> np.ndarray:
    """Newton steps of L2-regularised logistic regression; ``features`` [m, F], ``weights`` [F+1] (bias last).

    einsum rather than ``@``: see ``_decayed``.
    """
    design = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)  # [m, F+1]
    count = max(len(labels), 1)
    for _ in range(iterations):
        probability = 1.0 / (1.0 + np.exp(-np.einsum("ij,j->i", design, weights)))  # [m]
        gradient = np.einsum("ij,i->j", design, probability - labels) / count + l2 * weights
        curvature = (probability * (1.0 - probability))[:, None]
        hessian = np.einsum("ij,ik->jk", design * curvature, design) / count + l2 * np.eye(len(weights))
        weights = weights - np.linalg.solve(hessian, gradient)
    return weights
