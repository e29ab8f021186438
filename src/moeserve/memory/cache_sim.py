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

from moeserve.memory.policies import EVICTION_POLICIES, EvictionPolicy
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
        raise ValueError(f"capacity {capacity} exceeds num_experts {num_experts}; the maximum is {num_experts}")


def replay(
    steps: Sequence[Sequence[int]], policy: EvictionPolicy, capacity: int
) -> list[int]:
    """Run ``steps`` (each a sequence of distinct non-negative keys) through one cache.

    The cache starts empty and holds at most ``capacity`` keys; ``policy`` is prepared with
    ``steps`` first (only ``belady`` reads them). Returns the hits of every step (list of len
    ``len(steps)``); the misses of a step are ``len(steps[time]) - hits[time]``. Raises
    ``ValueError`` for a step wider than ``capacity`` and :class:`PolicyContractError` when the
    policy evicts a key that is not resident or that the current step needs.
    """
    policy.prepare(steps)
    resident: set[int] = set()
    hits_per_step = [0] * len(steps)
    on_hit, on_insert, evict = policy.on_hit, policy.on_insert, policy.evict
    for time, keys in enumerate(steps):
        hits = 0
        for key in keys:
            if key in resident:
                hits += 1
                on_hit(key, time)
        if hits < len(keys):
            if len(keys) > capacity:
                raise ValueError(f"step {time} needs {len(keys)} keys at once, more than capacity {capacity}")
            for key in keys:
                if key in resident:
                    continue
                if len(resident) >= capacity:
                    victim = evict(keys, time)
                    if victim not in resident or victim in keys:
                        state = "is needed by the current step" if victim in keys else "is not resident"
                        raise PolicyContractError(
                            f"{type(policy).__name__} evicted key {victim} at step {time}, which {state}"
                        )
                    resident.remove(victim)
                resident.add(key)
                on_insert(key, time)
        hits_per_step[time] = hits
    return hits_per_step


def _layer_steps(layer_experts: np.ndarray, offset: int = 0) -> list[list[int]]:
    """Rows of ``layer_experts`` [T, K] as key lists (+ ``offset``), -1 and repeated ids dropped."""
    if layer_experts.size == 0:
        return [[] for _ in range(layer_experts.shape[0])]
    ordered = np.sort(layer_experts, axis=1)  # [T, K]
    clean = (ordered[:, 0] != UNKNOWN_EXPERT).all() and not (ordered[:, 1:] == ordered[:, :-1]).any()
    keys = layer_experts.astype(np.int64) + offset  # [T, K]
    if clean:
        return keys.tolist()
    return [
        [key for key in dict.fromkeys(row) if key != UNKNOWN_EXPERT + offset] for row in keys.tolist()
    ]


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

    offsets = [layer * num_experts if scope == "global" else 0 for layer in range(num_layers)]
    per_layer = [_layer_steps(experts[:, layer, :], offsets[layer]) for layer in range(num_layers)]
    requests_per_step = np.array([[len(keys) for keys in steps] for steps in per_layer], dtype=np.int64).T  # [T, L]
    if scope == "per-layer":
        hits_per_step = np.zeros((num_tokens, num_layers), dtype=np.int64)  # [T, L]
        for layer, steps in enumerate(per_layer):
            hits_per_step[:, layer] = replay(steps, policy_class(capacity), capacity)
    else:
        # One stream of T*L steps, token-major; key = layer * E + expert.
        stream = [layer_steps[token] for token in range(num_tokens) for layer_steps in per_layer]
        flat_hits = replay(stream, policy_class(capacity * num_layers), capacity * num_layers)
        hits_per_step = np.asarray(flat_hits, dtype=np.int64).reshape(num_tokens, num_layers)

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
