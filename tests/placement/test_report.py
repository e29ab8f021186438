"""The placement report: JSON-able values that match the plan, and the table's shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.table import Table

from moeserve.placement.balance import plan_placement
from moeserve.placement.report import placement_report, render_placement_table
from moeserve.traces.format import Trace, TraceMeta, load_trace


def small_trace(num_tokens: int = 80, num_experts: int = 8, top_k: int = 2, num_layers: int = 2) -> Trace:
    generator = np.random.default_rng(3)
    popularity = 1.0 / np.arange(1, num_experts + 1)
    experts = np.array(
        [
            generator.choice(num_experts, top_k, replace=False, p=popularity / popularity.sum())
            for _ in range(num_tokens * num_layers)
        ]
    ).reshape(num_tokens, num_layers, top_k)  # Zipf-like skewed routing
    meta = TraceMeta(
        model="test/tiny", num_experts=num_experts, top_k=top_k, phase="decode", source="unit test"
    )
    offsets = np.arange(0, num_tokens + 1, 8, dtype=np.int64)
    return Trace(experts=experts.astype(np.int16), offsets=offsets, meta=meta)


def test_report_is_json_and_matches_the_plan():
    plan = plan_placement(small_trace(), num_ranks=2, num_replicas=2)
    report = json.loads(json.dumps(placement_report(plan), allow_nan=False))
    assert report["num_ranks"] == 2 and report["num_replicas"] == 2
    assert report["held_out_tokens"] == plan.held_out_tokens == 40
    assert report["mean"]["held_out_balancedness_replicated"] == pytest.approx(
        plan.mean_held_out_balancedness_replicated
    )
    assert len(report["layers"]) == 2
    for layer, entry in zip(plan.layers, report["layers"], strict=True):
        assert entry["layer"] == layer.layer
        assert entry["fitted_balancedness"] == pytest.approx(layer.fitted_balancedness)
        assert entry["held_out_balancedness"] == pytest.approx(layer.held_out_balancedness)
        assert entry["rank_loads"]["held_out_replicated"] == list(layer.held_out_rank_loads_replicated)
        assert entry["expert2rank"] == list(layer.expert2rank)
        assert entry["phy2log"] == list(layer.phy2log)
        assert entry["physical2rank"] == list(layer.physical2rank)
        assert sum(entry["logical_replica_count"]) == 8 + 2
    means = [entry["held_out_step_balancedness"] for entry in report["layers"]]
    assert report["mean"]["held_out_step_balancedness"] == pytest.approx(sum(means) / len(means))


def test_report_without_held_out_part_has_none_not_nan():
    plan = plan_placement(small_trace(), num_ranks=2, train_fraction=1.0)
    report = placement_report(plan)
    json.dumps(report, allow_nan=False)
    assert report["mean"]["held_out_balancedness"] is None
    assert report["layers"][0]["held_out_balancedness_replicated"] is None
    assert report["mean"]["fitted_balancedness"] == pytest.approx(plan.mean_fitted_balancedness)


def test_table_has_a_row_per_layer_and_replication_columns_only_with_replicas():
    trace = small_trace(num_layers=3)
    plain = render_placement_table(plan_placement(trace, num_ranks=2))
    replicated = render_placement_table(plan_placement(trace, num_ranks=2, num_replicas=2))
    for table in (plain, replicated):
        assert isinstance(table, Table)
        assert table.row_count == 3 + 1  # layers, then the mean
    assert len(plain.columns) == 5
    assert len(replicated.columns) == 9
    assert "replicated" not in " ".join(str(column.header) for column in plain.columns)


def test_deepseek_report_round_trips_through_json(shared_dir):
    trace = load_trace(shared_dir / "traces" / "deepseek-v2-lite-puffin-a.npz")
    subset = Trace(experts=trace.experts[:, :2], offsets=trace.offsets, meta=trace.meta)
    report = json.loads(json.dumps(placement_report(plan_placement(subset, num_ranks=8, num_replicas=16))))
    assert report["num_experts"] == 64 and report["top_k"] == 6
    for entry in report["layers"]:
        assert len(entry["physical2rank"]) == 64 + 16
        assert np.bincount(entry["physical2rank"], minlength=8).tolist() == [10] * 8
        assert 0.9 <= entry["held_out_balancedness_replicated"] <= 1.0
