"""A :class:`~moeserve.placement.balance.PlacementPlan` as JSON-able data and as a table for people.

What ``moeserve placement --trace FILE --ranks N [--replicas R] [--json]`` prints. This module
formats; it computes nothing a plan does not already hold. NaN figures (no held-out part)
become None in the dict and "-" in the table. Imports numpy and rich only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich.table import Table

from moeserve.placement.balance import LayerPlacement, PlacementPlan

_FIGURES = (
    "fitted_balancedness",
    "held_out_balancedness",
    "held_out_step_balancedness",
    "fitted_balancedness_replicated",
    "held_out_balancedness_replicated",
    "held_out_step_balancedness_replicated",
    "held_out_same_rank_pair_share",
)
"""Per-layer figures reported, each also as a mean over layers (``mean_<name>`` on the plan)."""


def placement_report(plan: PlacementPlan) -> dict[str, Any]:
    """Plain dicts, lists, numbers, strings and None (``json.dumps``-able) describing ``plan``.

    Keys: the plan's settings and split sizes; ``mean``: each figure averaged over layers;
    ``layers``: per layer its figures, rank loads (``fitted``, ``fitted_replicated``,
    ``held_out``, ``held_out_replicated``, each [R]) and the mappings ``expert2rank`` [E],
    ``phy2log`` [P], ``physical2rank`` [P], ``logical_replica_count`` [E].
    """
    return {
        "model": plan.model,
        "num_experts": plan.num_experts,
        "top_k": plan.top_k,
        "num_ranks": plan.num_ranks,
        "num_replicas": plan.num_replicas,
        "anticorrelation": plan.anticorrelation,
        "train_fraction": plan.train_fraction,
        "step_tokens": plan.step_tokens,
        "train_sequences": plan.train_sequences,
        "train_tokens": plan.train_tokens,
        "held_out_sequences": plan.held_out_sequences,
        "held_out_tokens": plan.held_out_tokens,
        "mean": {name: _number(getattr(plan, f"mean_{name}")) for name in _FIGURES},
        "layers": [_layer_report(layer) for layer in plan.layers],
    }


def _layer_report(layer: LayerPlacement) -> dict[str, Any]:
    report: dict[str, Any] = {"layer": layer.layer}
    report.update({name: _number(getattr(layer, name)) for name in _FIGURES})
    report["rank_loads"] = {
        "fitted": _numbers(layer.fitted_rank_loads),
        "fitted_replicated": _numbers(layer.fitted_rank_loads_replicated),
        "held_out": _numbers(layer.held_out_rank_loads),
        "held_out_replicated": _numbers(layer.held_out_rank_loads_replicated),
    }
    report["expert2rank"] = [int(rank) for rank in layer.expert2rank]
    report["phy2log"] = [int(expert) for expert in layer.phy2log]
    report["physical2rank"] = [int(rank) for rank in layer.physical2rank]
    report["logical_replica_count"] = [int(count) for count in layer.logical_replica_count]
    return report


def render_placement_table(plan: PlacementPlan) -> Table:
    """A rich table: a row per layer, then the means; replication columns only with replicas."""
    replicated = plan.num_replicas > 0
    step = "all held-out tokens" if plan.step_tokens is None else f"{plan.step_tokens} tokens"
    table = Table(
        title=(
            f"{plan.model}: {plan.num_experts} experts, top-{plan.top_k}, {len(plan.layers)} MoE layers "
            f"on {plan.num_ranks} ranks"
            + (f", {plan.num_replicas} extra replicas per layer" if replicated else ", no replication")
            + (", anti-correlated" if plan.anticorrelation else "")
        ),
        caption=(
            f"balancedness = mean / max rank load (1.0 = even). Fitted on the first {plan.train_sequences} "
            f"sequences ({plan.train_tokens:,} tokens), held out: {plan.held_out_sequences} sequences "
            f"({plan.held_out_tokens:,} tokens), replayed in steps of {step}. per step = sum of mean "
            "loads / sum of busiest loads over steps. pairs on one rank: share of a token's expert "
            "pairs sharing a rank, without replication."
        ),
    )
    table.add_column("layer", justify="right")
    table.add_column("fitted", justify="right")
    table.add_column("held-out", justify="right")
    table.add_column("held-out\nper step", justify="right")
    if replicated:
        table.add_column("fitted\nreplicated", justify="right")
        table.add_column("held-out\nreplicated", justify="right")
        table.add_column("held-out per\nstep, replicated", justify="right")
    table.add_column("pairs on\none rank", justify="right")
    if replicated:
        table.add_column("replicated experts\n(expert x copies)")
    for layer in plan.layers:
        cells = [str(layer.layer)] + _cells(layer, replicated)
        if replicated:
            cells.append(_replicas(layer.logical_replica_count))
        table.add_row(*cells, end_section=layer is plan.layers[-1])
    means = [_format(getattr(plan, f"mean_{name}")) for name in _shown(replicated)]
    table.add_row("mean", *means, *([""] if replicated else []), style="bold")
    return table


def _shown(replicated: bool) -> tuple[str, ...]:
    return _FIGURES if replicated else tuple(name for name in _FIGURES if not name.endswith("_replicated"))


def _cells(layer: LayerPlacement, replicated: bool) -> list[str]:
    return [_format(getattr(layer, name)) for name in _shown(replicated)]


def _replicas(logical_replica_count: np.ndarray) -> str:
    """e.g. ``"3x3 17x2 40x2"``: experts with more than one copy, most copies first."""
    experts = np.flatnonzero(logical_replica_count > 1)
    order = experts[np.argsort(-logical_replica_count[experts], kind="stable")]
    return " ".join(f"{expert}x{logical_replica_count[expert]}" for expert in order)


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _numbers(values: np.ndarray) -> list[float]:
    return [float(value) for value in values]


def _format(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"
