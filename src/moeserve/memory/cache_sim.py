"""Replay a routing trace through an expert cache and count hits: how well an eviction policy works.

The cache model: every (token, MoE layer) is one *step* that needs the token's K experts of that
layer resident at the same time. An expert already resident when its step comes is a hit; each
missing one is a miss and one load, which evicts a resident expert the step does not need once
the cache is full. Nothing is prefetched and nothing is skipped (the ``exact`` memory modes), so
the counts measure the eviction policy alone. Tokens are replayed in trace order, sequence after
sequence, through one cache that is never flushed (a server keeps its experts between requests);
within a token, layers come in order 0..L-1.

Scopes:

- ``per-layer``: each layer has its own cache of ``capacity`` experts and its own policy;
- ``global``: one cache of ``capacity * L`` slots and one policy shared by all layers (a busy
  layer may hold more than ``capacity`` of its experts, a quiet one fewer).

Shape legend: T tokens, L MoE layers, K slots per token (top_k), E experts per layer. Entries of
-1 (unknown routing) are skipped: they request nothing. This module knows nothing of models or
bytes; it imports numpy and the policies only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeserve.memory.policies import EVICTION_POLICIES, EvictionPolicy, LRUPolicy, StreamContext
from moeserve.traces.format import UNKNOWN_EXPERT, Trace

SCOPES = ("per-layer", "global")
"""Cache scopes ``simulate`` accepts."""


class PolicyContractError(RuntimeError):
    """A policy evicted a key that was not resident or that the current step needs (a policy bug)."""


@dataclass(frozen=True)
class CacheSimResult:
    """Counts of one replay. Arrays are per layer, over the evaluated tokens only.

    ``hits + misses`` is the number of known expert ids requested per layer; every miss is one
    load. ``cold_misses`` is the part of ``misses`` no policy can avoid: the first request of an
    expert in the whole replay (warm-up included), so ``hits <= requests - cold_misses`` always.
    """

    policy: str
    scope: str
    """``per-layer`` or ``global`` (see the module docstring)."""
    capacity: int
    """Experts resident per layer (``global``: the shared cache holds ``capacity * L``)."""
    num_experts: int
    top_k: int
    warmup_tokens: int
    """Leading tokens replayed through the cache (warming it and the policy) but not counted."""
    evaluated_tokens: int
    """Tokens counted in ``hits`` and ``misses``."""
    hits: np.ndarray = field(repr=False)
    """int64 [L] requests found resident."""
    misses: np.ndarray = field(repr=False)
    """int64 [L] requests that had to be loaded."""
    cold_misses: np.ndarray = field(repr=False)
    """int64 [L] misses on an expert's first request ever (unavoidable)."""

    @property
    def num_layers(self) -> int:
        return int(self.hits.shape[0])

    @property
    def loads(self) -> np.ndarray:
        """int64 [L] experts loaded into the cache (one per miss)."""
        return self.misses

    @property
    def requests(self) -> np.ndarray:
        """int64 [L] expert ids requested (hits + misses)."""
        return self.hits + self.misses

    @property
    def hit_rate(self) -> np.ndarray:
        """float64 [L] hits / requests; NaN for a layer with no requests."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.hits / self.requests

    @property
    def overall_hit_rate(self) -> float:
        """Hits / requests over all layers (NaN when nothing was requested)."""
        requests = int(self.requests.sum())
        return int(self.hits.sum()) / requests if requests else float("nan")

    @property
    def warm_hit_rate(self) -> float:
        """Hits / (requests - cold misses): the hit rate once every expert has been seen."""
        warm_requests = int(self.requests.sum() - self.cold_misses.sum())
        return int(self.hits.sum()) / warm_requests if warm_requests else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; per-layer arrays become lists, NaN becomes None."""
        return {
            "policy": self.policy,
            "scope": self.scope,
            "capacity": self.capacity,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "warmup_tokens": self.warmup_tokens,
            "evaluated_tokens": self.evaluated_tokens,
            "overall_hit_rate": _plain_float(self.overall_hit_rate),
            "warm_hit_rate": _plain_float(self.warm_hit_rate),
            "hits": int(self.hits.sum()),
            "misses": int(self.misses.sum()),
            "loads": int(self.loads.sum()),
            "cold_misses": int(self.cold_misses.sum()),
            "layer_hit_rate": [_plain_float(value) for value in self.hit_rate.tolist()],
            "layer_loads": self.loads.tolist(),
        }


def _plain_float(value: float) -> float | None:
    return None if value != value else float(value)


def check_capacity(capacity: int, num_experts: int, top_k: int) -> None:
    """Raise ``ValueError`` unless ``top_k <= capacity <= num_experts`` (experts per layer).

    A step needs its top_k experts resident together, so fewer slots cannot serve a token; more
    than num_experts slots per layer is never needed.
    """
    if capacity < top_k:
        raise ValueError(
            f"capacity {capacity} is below the minimum {top_k}: each token needs its top_k = {top_k} "
            f"experts of a layer resident at once"
        )
    if capacity > num_experts:
        raise ValueError(
            f"capacity {capacity} exceeds num_experts {num_experts}; the maximum is {num_experts}"
        )


def replay(
    steps: Sequence[Sequence[int]],
    policy: EvictionPolicy,
    capacity: int,
    context: StreamContext | None = None,
) -> list[int]:
    """Run ``steps`` (each a sequence of distinct non-negative keys) through one cache.

    The cache starts empty and holds at most ``capacity`` keys; ``policy`` is prepared with
    ``steps`` and ``context`` first (only policies with ``needs_stream`` read them; the context
    is what a server knows at each step besides its keys). Returns the hits of every
    step (a list of ``len(steps)``); the misses of a step are ``len(steps[time]) - hits[time]``.
    Raises ``ValueError`` for a step wider than ``capacity`` and :class:`PolicyContractError`
    when the policy evicts a key that is not resident, that the step needs, or not as many as
    asked.
    """
    policy.prepare(steps, context)
    resident: set[int] = set()
    hits_per_step = [0] * len(steps)
    evict, on_step = policy.evict, policy.on_step
    for time, keys in enumerate(steps):
        loaded = [key for key in keys if key not in resident]
        if loaded:
            overflow = len(resident) + len(loaded) - capacity
            if overflow > 0:
                if len(keys) > capacity:
                    raise ValueError(
                        f"step {time} needs {len(keys)} keys at once, more than capacity {capacity}"
                    )
                victims = evict(overflow, keys, time)
                if len(victims) != overflow or len(set(victims)) != overflow:
                    raise PolicyContractError(
                        f"{type(policy).__name__} returned {victims} at step {time}; "
                        f"asked for {overflow} distinct keys"
                    )
                for victim in victims:
                    if victim not in resident or victim in keys:
                        state = "is needed by the current step" if victim in keys else "is not resident"
                        raise PolicyContractError(
                            f"{type(policy).__name__} evicted key {victim} at step {time}, which {state}"
                        )
                    resident.remove(victim)
            resident.update(loaded)
        on_step(keys, loaded, time)
        hits_per_step[time] = len(keys) - len(loaded)
    return hits_per_step


NEVER = np.iinfo(np.int64).max
"""Stack distance of a key's first request: no capacity makes it a hit."""


def lru_stack_distances(ids: np.ndarray, num_keys: int) -> np.ndarray:
    """int64 [n, K]: each request's rank in the LRU order at the start of its step.

    ``ids``: int [n, K] distinct keys per step in ``[0, num_keys)``, -1 for none. The rank of
    request (t, j) is how many keys were used more recently than ``ids[t, j]``'s last use: the
    distinct keys of the steps in between, plus the keys after it in the row of that step (the
    order :class:`~moeserve.memory.policies.LRUPolicy` refreshes a step's keys in). First
    requests and -1 entries get :data:`NEVER`.

    LRU with pinned steps is a stack algorithm: after every step its cache holds the
    ``capacity`` most recent keys (the step's own keys are the most recent, and only older ones
    are evicted). So a request hits an LRU cache of capacity C >= K exactly when its rank is
    below C, for every C at once (Mattson et al., 1970).

    Vectorised over requests: steps become bitsets of keys, the keys used between two steps are
    an OR over a range (a sparse table of ORs over power-of-two ranges answers each range with
    two lookups) and the rank is a popcount.

    Shape legend: n steps, K slots per step, E = num_keys, W = ceil(E / 64) bitset words,
    R requests with an earlier use.
    """
    num_steps, width = ids.shape
    words = max(1, -(-num_keys // 64))
    valid = ids >= 0  # [n, K]
    # 1. Each slot's key as a one-bit bitset, and each step's keys as a bitset.
    slot_bits = np.zeros((num_steps, width, words), dtype=np.uint64)  # [n, K, W]
    valid_rows, valid_slots = np.nonzero(valid)  # [V] each, in step order
    keys = ids[valid_rows, valid_slots]  # [V]
    slot_bits[valid_rows, valid_slots, keys // 64] = np.left_shift(
        np.uint64(1), (keys % 64).astype(np.uint64)
    )
    step_bits = np.bitwise_or.reduce(slot_bits, axis=1)  # [n, W]
    # Keys after each slot in its row: refreshed after it by LRUPolicy.on_step.
    later_bits = np.zeros_like(slot_bits)  # [n, K, W]
    for slot in range(width - 2, -1, -1):
        later_bits[:, slot] = later_bits[:, slot + 1] | slot_bits[:, slot + 1]
    # 2. The last earlier use of every request: sort requests by key, stably (so by step).
    rows_by_key = np.argsort(keys, kind="stable")  # [V] V = valid requests, grouped by key
    same_key = keys[rows_by_key[1:]] == keys[rows_by_key[:-1]]  # [V-1]
    previous = np.full((num_steps, width), -1, dtype=np.int64)  # [n, K] last step < t using the key
    later, earlier = rows_by_key[1:][same_key], rows_by_key[:-1][same_key]
    previous[valid_rows[later], valid_slots[later]] = valid_rows[earlier]
    distances = np.full((num_steps, width), NEVER, dtype=np.int64)  # [n, K]
    steps, slots = np.nonzero(previous >= 0)  # [R] each
    if steps.size == 0:
        return distances
    before = previous[steps, slots]  # [R] step p of the last use
    # 3. OR of the bitsets of steps p+1 .. t-1 from a sparse table: level j ORs 2**j steps.
    table = [step_bits]
    while 2 ** len(table) <= num_steps:
        half = 2 ** (len(table) - 1)
        table.append(table[-1][:-half] | table[-1][half:])
    low, high = before + 1, steps - 1  # [R] inclusive range, empty when low > high
    length = np.maximum(high - low + 1, 1)
    level = np.frexp(length)[1].astype(np.int64) - 1  # [R] floor(log2(length)), exactly
    between = np.zeros((steps.size, words), dtype=np.uint64)  # [R, W]
    for value in np.unique(level[high >= low]):
        pick = np.flatnonzero((level == value) & (high >= low))
        span = 2 ** int(value)
        between[pick] = table[value][low[pick]] | table[value][high[pick] - span + 1]
    # 4. Rank = keys used in between, or after it in row p (a key can be both: count it once).
    position = np.argmax(ids[before] == ids[steps, slots][:, None], axis=1)  # [R] its slot in row p
    newer = between | later_bits[before, position]  # [R, W]
    distances[steps, slots] = np.bitwise_count(newer).sum(axis=1)
    return distances


def _clean_ids(layer_experts: np.ndarray) -> np.ndarray:
    """int64 [T, K] copy of ``layer_experts`` with a repeated id in a row set to -1 (kept once)."""
    ids = layer_experts.astype(np.int64)  # [T, K]
    for slot in range(1, ids.shape[1]):
        repeated = (ids[:, :slot] == ids[:, slot : slot + 1]).any(axis=1) & (ids[:, slot] >= 0)
        ids[repeated, slot] = UNKNOWN_EXPERT
    return ids


def _steps(ids: np.ndarray, offset: int = 0) -> list[list[int]]:
    """Rows of clean ``ids`` [T, K] as key lists (+ ``offset``), -1 entries dropped."""
    if (ids >= 0).all():
        return (ids + offset).tolist()
    return [[key + offset for key in row if key >= 0] for row in ids.tolist()]


def _cold_misses(experts: np.ndarray, warmup_tokens: int) -> np.ndarray:
    """int64 [L] experts (per layer) whose first request falls at or after token ``warmup_tokens``."""
    num_tokens, num_layers, top_k = experts.shape
    cold = np.zeros(num_layers, dtype=np.int64)
    for layer in range(num_layers):
        flat = experts[:, layer, :].reshape(-1)  # [T*K]
        ids, first = np.unique(flat, return_index=True)
        first_token = first[ids != UNKNOWN_EXPERT] // top_k
        cold[layer] = int((first_token >= warmup_tokens).sum())
    return cold


def simulate(
    trace: Trace,
    policy_name: str,
    capacity: int,
    scope: str = "per-layer",
    warmup_sequences: int = 0,
) -> CacheSimResult:
    """Replay ``trace`` through an expert cache run by policy ``policy_name``; see the module docstring.

    ``capacity`` is experts per layer (``top_k <= capacity <= num_experts``, else ``ValueError``
    naming the bound). The first ``warmup_sequences`` sequences are replayed but not counted, so
    every policy is scored on the same later tokens; ``belady`` sees the whole stream as its future.
    Unknown policy names raise ``KeyError`` listing the known ones; a bad scope ``ValueError``.
    ``lru`` per layer takes the vectorised :func:`lru_stack_distances` path (same counts).
    Per layer, every policy is offered the same :class:`~moeserve.memory.policies.StreamContext`
    (sequence starts from the trace's offsets, the token's experts at the previous MoE layer);
    the global scope offers none.
    """
    policy_class = EVICTION_POLICIES.get(policy_name)
    if scope not in SCOPES:
        raise ValueError(f"unknown cache scope {scope!r}; known: {', '.join(SCOPES)}")
    num_experts, top_k = trace.meta.num_experts, trace.meta.top_k
    check_capacity(capacity, num_experts, top_k)
    if not 0 <= warmup_sequences <= trace.num_sequences:
        raise ValueError(
            f"warmup_sequences {warmup_sequences} is outside [0, {trace.num_sequences}] (the trace's sequences)"
        )
    experts = trace.experts  # [T, L, K]
    num_tokens, num_layers, _ = experts.shape
    warmup_tokens = int(trace.offsets[warmup_sequences])

    clean = [_clean_ids(experts[:, layer, :]) for layer in range(num_layers)]  # L x [T, K]
    requests_per_step = np.stack([(ids >= 0).sum(axis=1) for ids in clean], axis=1)  # [T, L]
    hits_per_step = np.zeros((num_tokens, num_layers), dtype=np.int64)  # [T, L]
    if scope == "per-layer" and policy_class is LRUPolicy:
        # Fast path, equal to replaying LRUPolicy (tests compare them): one numpy pass per layer.
        for layer, ids in enumerate(clean):
            hits_per_step[:, layer] = (lru_stack_distances(ids, num_experts) < capacity).sum(axis=1)
    elif scope == "per-layer":
        starts = np.zeros(num_tokens, dtype=bool)  # [T]
        starts[trace.offsets[:-1][trace.offsets[:-1] < num_tokens]] = True
        for layer, ids in enumerate(clean):
            context = StreamContext(
                sequence_starts=starts, previous_layer=clean[layer - 1] if layer else None
            )
            hits_per_step[:, layer] = replay(_steps(ids), policy_class(capacity), capacity, context)
    else:
        # One stream of T*L steps, token-major; key = layer * E + expert.
        per_layer = [_steps(ids, layer * num_experts) for layer, ids in enumerate(clean)]
        stream = [layer_steps[token] for token in range(num_tokens) for layer_steps in per_layer]
        slots = capacity * num_layers
        flat_hits = replay(stream, policy_class(slots, num_layers), slots)
        hits_per_step[:] = np.asarray(flat_hits, dtype=np.int64).reshape(num_tokens, num_layers)

    hits = hits_per_step[warmup_tokens:].sum(axis=0)  # [L]
    misses = requests_per_step[warmup_tokens:].sum(axis=0) - hits  # [L]
    return CacheSimResult(
        policy=policy_name,
        scope=scope,
        capacity=capacity,
        num_experts=num_experts,
        top_k=top_k,
        warmup_tokens=warmup_tokens,
        evaluated_tokens=num_tokens - warmup_tokens,
        hits=hits,
        misses=misses,
        cold_misses=_cold_misses(experts, warmup_tokens),
    )
