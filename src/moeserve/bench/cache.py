"""``moeserve bench cache``: eviction policies replayed on a routing trace, next to Belady's optimum.

Every policy runs the same ``moeserve-trace/1`` file through an expert cache of each capacity
(:func:`moeserve.memory.cache_sim.simulate`), and its hit rate is reported as a fraction of
Belady's MIN on the same cache, capacity and evaluated tokens: the share of the achievable hits
it gets. Belady reads the future and is the yardstick, not a usable policy.

With ``warmup_sequences`` > 0 the first sequences are replayed (warming the cache and every
online policy's statistics) but not counted: a train/test split, the same for every policy.

The figures are counts from a simulation, not timings, so they do not depend on the machine.
Shape legend: L MoE layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from moeserve.memory.cache_sim import SCOPES, CacheSimResult, check_capacity, simulate
from moeserve.memory.policies import EVICTION_POLICIES
from moeserve.traces.format import load_trace

REFERENCE_POLICY = "belady"
"""The offline optimum every policy is compared with."""


@dataclass(frozen=True)
class CacheBenchRow:
    """One policy at one capacity."""

    policy: str
    capacity: int
    """Experts resident per layer (``global`` scope: ``capacity * L`` shared slots)."""
    online: bool
    """False for Belady, which reads the future."""
    sim: CacheSimResult
    belady: CacheSimResult
    """Belady's run on the same cache, for the fractions."""

    @property
    def overall_hit_rate(self) -> float:
        return self.sim.overall_hit_rate

    @property
    def fraction_of_belady(self) -> float:
        """Hits / Belady's hits over all layers (1.0 = optimal; NaN when Belady has none)."""
        best = int(self.belady.hits.sum())
        return int(self.sim.hits.sum()) / best if best else float("nan")

    @property
    def layer_fraction_of_belady(self) -> list[float]:
        """[L] hits / Belady's hits per layer (NaN where Belady has none)."""
        return [
            hits / best if best else float("nan")
            for hits, best in zip(self.sim.hits.tolist(), self.belady.hits.tolist(), strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the simulation's figures plus ``online``, Belady's hit rate and the fractions."""
        document = {"policy": self.policy, "capacity": self.capacity, "online": self.online}
        document.update(self.sim.to_dict())
        document["belady_hit_rate"] = _plain(self.belady.overall_hit_rate)
        document["fraction_of_belady"] = _plain(self.fraction_of_belady)
        document["layer_belady_hit_rate"] = [_plain(value) for value in self.belady.hit_rate.tolist()]
        document["layer_fraction_of_belady"] = [_plain(value) for value in self.layer_fraction_of_belady]
        return document


@dataclass(frozen=True)
class CacheBenchResult:
    """A whole ``bench cache`` run; ``to_dict()`` is what ``--json`` prints."""

    trace: str
    """Path of the trace file."""
    model: str
    num_experts: int
    top_k: int
    num_layers: int
    num_tokens: int
    num_sequences: int
    scope: str
    warmup_sequences: int
    """Leading sequences replayed but not counted (0: every token counts)."""
    warmup_tokens: int
    rows: tuple[CacheBenchRow, ...]
    """Per capacity (ascending), Belady first, then the policies in the order asked."""

    @property
    def evaluated_tokens(self) -> int:
        return self.num_tokens - self.warmup_tokens

    def row(self, policy: str, capacity: int) -> CacheBenchRow:
        """The row of ``policy`` at ``capacity``; ``KeyError`` when it was not run."""
        for row in self.rows:
            if row.policy == policy and row.capacity == capacity:
                return row
        raise KeyError(f"no result for policy {policy!r} at capacity {capacity}")

    def to_dict(self) -> dict[str, Any]:
        """The run's setting, and ``results``: one object per (policy, capacity) (see :meth:`CacheBenchRow.to_dict`)."""
        return {
            "benchmark": "cache",
            "trace": self.trace,
            "model": self.model,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_layers": self.num_layers,
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            "scope": self.scope,
            "warmup_sequences": self.warmup_sequences,
            "warmup_tokens": self.warmup_tokens,
            "evaluated_tokens": self.evaluated_tokens,
            "reference": REFERENCE_POLICY,
            "results": [row.to_dict() for row in self.rows],
        }


def _plain(value: float) -> float | None:
    return None if value != value else float(value)


def default_capacities(num_experts: int, top_k: int) -> list[int]:
    """Capacities worth comparing for a trace: top_k and 1/8, 1/4, 1/2 of the experts, within bounds."""
    wanted = {top_k, num_experts // 8, num_experts // 4, num_experts // 2}
    return sorted(capacity for capacity in wanted if top_k <= capacity <= num_experts)


def run_cache_bench(
    trace_path: str | os.PathLike[str],
    capacities: Sequence[int],
    policies: Sequence[str] | None = None,
    scope: str = "per-layer",
    warmup_sequences: int = 0,
    on_row: Callable[[CacheBenchRow], None] | None = None,
) -> CacheBenchResult:
    """Replay the trace at ``trace_path`` through every policy at every capacity, next to Belady.

    ``policies`` None means every registered policy; Belady's row comes first at every capacity
    whether asked for or not. Every name and capacity is checked before
    the first (slow) replay: an unknown policy raises ``KeyError`` listing the known ones; a
    capacity below top_k or above num_experts, an empty capacity list or a bad scope raise
    ``ValueError`` naming the bound; a bad file raises ``TraceError``. ``on_row`` is called with
    each row as soon as it is computed (for progress output).
    """
    trace = load_trace(trace_path)
    meta = trace.meta
    if scope not in SCOPES:
        raise ValueError(f"unknown cache scope {scope!r}; known: {', '.join(SCOPES)}")
    if not capacities:
        raise ValueError("no capacity given; pass at least one (experts resident per layer)")
    for capacity in capacities:
        check_capacity(capacity, meta.num_experts, meta.top_k)
    names = list(EVICTION_POLICIES.names() if policies is None else dict.fromkeys(policies))
    for name in names:
        EVICTION_POLICIES.get(name)
    if not 0 <= warmup_sequences < max(trace.num_sequences, 1):
        raise ValueError(
            f"warmup_sequences {warmup_sequences} must leave a sequence to evaluate: "
            f"use 0 to {trace.num_sequences - 1} for this trace of {trace.num_sequences}"
        )
    order = [REFERENCE_POLICY] + [name for name in names if name != REFERENCE_POLICY]

    rows: list[CacheBenchRow] = []
    for capacity in sorted(dict.fromkeys(capacities)):
        belady = simulate(trace, REFERENCE_POLICY, capacity, scope, warmup_sequences)
        for name in order:
            sim = (
                belady
                if name == REFERENCE_POLICY
                else simulate(trace, name, capacity, scope, warmup_sequences)
            )
            row = CacheBenchRow(
                policy=name,
                capacity=capacity,
                online=EVICTION_POLICIES.get(name).online,
                sim=sim,
                belady=belady,
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return CacheBenchResult(
        trace=str(Path(trace_path)),
        model=meta.model,
        num_experts=meta.num_experts,
        top_k=meta.top_k,
        num_layers=trace.num_layers,
        num_tokens=trace.num_tokens,
        num_sequences=trace.num_sequences,
        scope=scope,
        warmup_sequences=warmup_sequences,
        warmup_tokens=int(trace.offsets[warmup_sequences]),
        rows=tuple(rows),
    )


def render_table(result: CacheBenchResult) -> Table:
    """The human-readable table: one row per (capacity, policy), hit rates and fractions of Belady."""
    if result.warmup_sequences:
        split = (
            f"first {result.warmup_sequences} sequences ({result.warmup_tokens:,} tokens) warm up, "
            f"last {result.num_sequences - result.warmup_sequences} ({result.evaluated_tokens:,} tokens) counted"
        )
    else:
        split = (
            f"all {result.num_sequences} sequences ({result.num_tokens:,} tokens) counted, cache starts empty"
        )
    slots = "per layer" if result.scope == "per-layer" else f"x {result.num_layers} layers, one shared cache"
    table = Table(
        title=(
            f"Expert cache hit rates: {result.model}, E={result.num_experts} top-{result.top_k}, "
            f"{result.num_layers} MoE layers, {result.scope}"
        ),
        caption=(
            f"trace {result.trace}\n{split}\ncapacity = experts resident {slots}; a token's top-k experts "
            f"of a layer are resident together; simulated counts, not timings"
        ),
    )
    columns = (
        "capacity",
        "policy",
        "hit rate",
        "of Belady",
        "warm hit rate",
        "loads/token",
        "layers min-max",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "policy" else "right", no_wrap=True)
    previous_capacity = None
    for row in result.rows:
        if previous_capacity is not None and row.capacity != previous_capacity:
            table.add_section()
        previous_capacity = row.capacity
        layer_rates = [rate for rate in row.sim.hit_rate.tolist() if rate == rate]
        spread = f"{min(layer_rates):.3f}-{max(layer_rates):.3f}" if layer_rates else "-"
        tokens = max(row.sim.evaluated_tokens, 1)
        table.add_row(
            str(row.capacity),
            row.policy if row.online else f"{row.policy} (offline)",
            f"{row.overall_hit_rate:.4f}",
            f"{row.fraction_of_belady:.1%}",
            f"{row.sim.warm_hit_rate:.4f}",
            f"{int(row.sim.loads.sum()) / tokens:.2f}",
            spread,
        )
    return table
