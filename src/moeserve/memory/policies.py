"""Eviction policies for an expert cache: which resident expert to drop when a new one must load.

A policy is a small class that sees a stream of *steps* and keeps its own view of which keys are
resident. It knows nothing of models, tensors or bytes: a key is a non-negative int (an expert
id in a per-layer cache, ``layer * E + expert`` in a cache shared by all layers), and time is the
index of the step in the stream its cache sees (0, 1, 2, ...).

One step is one token at one MoE layer: the K distinct keys it is routed to, all needed at once.
The caller (:func:`moeserve.memory.cache_sim.simulate`, or a live ``ExpertCache``) drives a policy
through this contract, for every step in order::

    on_hit(key, time)          for each requested key already resident
    evict(pinned, time) -> key  only while the cache is full and a requested key is missing
    on_insert(key, time)       for each requested key that was missing, after room was made

``pinned`` is the step's requested keys: they must all be resident together, so ``evict`` must
return a resident key *not* in ``pinned`` (the caller guarantees one exists: capacity >= K) and
forget it. Online policies use only the past; ``belady`` alone reads the future through
``prepare(steps)``, which the caller invokes once with the whole stream before the first step.

Policies registered in :data:`EVICTION_POLICIES` (constructor: ``policy_class(capacity)``):

- ``lru``: evict the least recently used.
- ``lfu``: evict the least frequently used over the whole past (not only while resident); ties go
  to the least recently used.
- ``fifo``: evict the earliest inserted; hits do not refresh.
- ``lifo``: evict the most recently inserted (the choice of Huang et al., arXiv 2303.06182).
- ``belady``: the offline optimum MIN: evict the key whose next use is farthest in the future.
- ``lrfu``: see :class:`LRFUPolicy`.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Container, Sequence
from typing import ClassVar

from moeserve.registry import Registry

Score = tuple[float, float]
"""A :class:`ScoredPolicy` score: ``(value, tie_break)``, the lowest evicted first."""

EVICTION_POLICIES: Registry[type[EvictionPolicy]] = Registry("eviction policy")
"""Every eviction policy by name; construct one cache's policy with ``EVICTION_POLICIES.get(name)(capacity)``."""


class EvictionPolicy(ABC):
    """Eviction decisions for one cache of ``capacity`` keys; see the module docstring for the protocol."""

    online: ClassVar[bool] = True
    """False for a policy that needs the future (``prepare``) and is only a yardstick."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity

    def prepare(self, steps: Sequence[Sequence[int]]) -> None:  # noqa: B027 (an optional hook)
        """Receive the whole future stream (``steps[time]`` = that step's keys) before step 0.

        Online policies ignore it; an offline policy must be prepared before use.
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


class _OrderPolicy(EvictionPolicy):
    """Keys kept in one order (front = next to evict unless ``evict_newest``); O(1) per call."""

    refresh_on_hit: ClassVar[bool]
    evict_newest: ClassVar[bool] = False

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
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
        raise AssertionError("every resident key is pinned; the caller broke capacity >= top_k")


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

    Keys inserted long ago stay forever, so the cache settles on whatever it loaded first; with
    pinning, the key evicted is the newest that the current step does not need.
    """

    refresh_on_hit = False
    evict_newest = True


class ScoredPolicy(EvictionPolicy):
    """Evict the resident, unpinned key of lowest score; a subclass says what the score is.

    A score is a pair ``(value, tie_break)`` compared in that order. Scores only change when a key
    is requested (``score_on_hit`` / ``score_on_insert``); any drift of scores with time alone
    must keep their order, so that a stored score stays comparable with a fresh one. Kept in a
    heap with lazy deletion: O(log n) per call, however large the cache.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._score: dict[int, Score] = {}  # resident key -> its current score
        self._heap: list[tuple[float, float, int]] = []  # (value, tie_break, key); stale entries allowed

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
            self._push(score, key)

    def on_insert(self, key: int, time: int) -> None:
        score = self.score_on_insert(key, time)
        self._score[key] = score
        self._push(score, key)

    def evict(self, pinned: Container[int], time: int) -> int:
        heap, scores = self._heap, self._score
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
        raise AssertionError("every resident key is pinned; the caller broke capacity >= top_k")

    def _push(self, score: Score, key: int) -> None:
        heap = self._heap
        heapq.heappush(heap, (score[0], score[1], key))
        if len(heap) > 8 * len(self._score) + 64:
            # Stale entries pile up under frequently re-scored keys; rebuild from the live scores.
            self._heap = [(value, tie_break, resident) for resident, (value, tie_break) in self._score.items()]
            heapq.heapify(self._heap)


@EVICTION_POLICIES.register("lfu")
class LFUPolicy(ScoredPolicy):
    """Least frequently used: evict the key requested fewest times so far, the least recent on ties.

    Counts cover the whole past, including requests made while the key was not resident
    ("perfect" LFU), so an expert that is popular overall is kept through a quiet spell.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._count: dict[int, int] = {}

    def _bump(self, key: int, time: int) -> Score:
        count = self._count.get(key, 0) + 1
        self._count[key] = count
        return (count, time)

    def score_on_hit(self, key: int, time: int) -> Score:
        return self._bump(key, time)

    def score_on_insert(self, key: int, time: int) -> Score:
        return self._bump(key, time)


@EVICTION_POLICIES.register("belady")
class BeladyPolicy(ScoredPolicy):
    """Belady's MIN, the offline optimum: evict the key whose next request is farthest ahead.

    Needs ``prepare(steps)`` with the exact stream that follows; keys never requested again go
    first. With pinning (a step's keys all resident at once) it stays optimal among policies that
    load only on demand, so every online policy's hit count is at most its own.
    """

    online = False

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._uses: dict[int, list[int]] | None = None  # key -> times it is requested, latest first
        self._never = math.inf

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
        # Lowest score is evicted, so the farthest next use gets the lowest score.
        return (-(times[-1] if times else self._never), 0)

    def score_on_hit(self, key: int, time: int) -> Score:
        return self._next_use(key, time)

    def score_on_insert(self, key: int, time: int) -> Score:
        return self._next_use(key, time)
