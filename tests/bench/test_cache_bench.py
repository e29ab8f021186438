"""``bench cache``: every policy replayed next to Belady; reported values are consistent.

Small synthetic traces and the small Mixtral trace; assertions are on values (hit rates,
fractions, JSON fields), never timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from moeserve.bench.cache import (
    REFERENCE_POLICY,
    CacheBenchResult,
    default_capacities,
    render_table,
    run_cache_bench,
)
from moeserve.errors import TraceError
from moeserve.memory.policies import EVICTION_POLICIES
from moeserve.traces.format import Trace, TraceMeta, load_trace, save_trace

SHARED_TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    """E=8, top-2, 3 layers, 400 tokens in 4 sequences, skewed routing."""
    rng = np.random.default_rng(0)
    popularity = 1.0 / np.arange(1, 9) ** 1.1
    popularity /= popularity.sum()
    experts = np.array(
        [[rng.choice(8, size=2, replace=False, p=popularity) for _ in range(3)] for _ in range(400)],
        dtype=np.int16,
    )  # [T, L, K]
    meta = TraceMeta(model="test/skewed", num_experts=8, top_k=2, phase="decode", source="unit test")
    trace = Trace(experts=experts, offsets=np.array([0, 90, 200, 310, 400], dtype=np.int64), meta=meta)
    return save_trace(trace, tmp_path / "skewed.npz")


def check_result(result: CacheBenchResult, capacities: list[int], policies: list[str]) -> None:
    expected_order = [REFERENCE_POLICY] + [name for name in policies if name != REFERENCE_POLICY]
    assert [(row.capacity, row.policy) for row in result.rows] == [
        (capacity, name) for capacity in sorted(capacities) for name in expected_order
    ]
    for row in result.rows:
        belady = result.row(REFERENCE_POLICY, row.capacity)
        assert row.belady.hits.sum() == belady.sim.hits.sum()
        assert row.fraction_of_belady == pytest.approx(row.sim.hits.sum() / belady.sim.hits.sum())
        assert row.fraction_of_belady <= 1.0
        assert 0.0 <= row.overall_hit_rate <= belady.overall_hit_rate
        assert row.online == (row.policy != REFERENCE_POLICY)


def test_every_policy_next_to_belady(trace_file: Path) -> None:
    result = run_cache_bench(trace_file, [4, 2])
    check_result(result, [2, 4], EVICTION_POLICIES.names())
    assert result.row("belady", 2).fraction_of_belady == 1.0
    # More room never hurts these stack policies.
    assert result.row("lru", 4).overall_hit_rate > result.row("lru", 2).overall_hit_rate
    assert result.row("belady", 4).overall_hit_rate > result.row("belady", 2).overall_hit_rate
    # capacity 2 = top_k: every policy keeps exactly the previous token's experts.
    rates = {row.overall_hit_rate for row in result.rows if row.capacity == 2}
    assert len(rates) == 1


def test_to_dict_is_json_with_one_object_per_policy_and_capacity(trace_file: Path) -> None:
    result = run_cache_bench(trace_file, [3, 8], policies=["lru", "lifo"], warmup_sequences=1)
    document = json.loads(json.dumps(result.to_dict()))
    assert document["scope"] == "per-layer"
    assert document["warmup_sequences"] == 1 and document["warmup_tokens"] == 90
    assert document["evaluated_tokens"] == 310
    entries = document["results"]
    assert [(entry["policy"], entry["capacity"]) for entry in entries] == [
        ("belady", 3),
        ("lru", 3),
        ("lifo", 3),
        ("belady", 8),
        ("lru", 8),
        ("lifo", 8),
    ]
    for entry in entries:
        assert len(entry["layer_hit_rate"]) == 3 and len(entry["layer_fraction_of_belady"]) == 3
        assert entry["hits"] + entry["misses"] == 310 * 3 * 2
        assert entry["loads"] == entry["misses"]
        assert entry["overall_hit_rate"] == pytest.approx(entry["hits"] / (310 * 6))
    # All experts resident: only first requests miss, whatever the policy.
    for entry in entries[3:]:
        assert entry["warm_hit_rate"] == 1.0 and entry["fraction_of_belady"] == 1.0


def test_global_scope(trace_file: Path) -> None:
    result = run_cache_bench(trace_file, [2, 4], scope="global")
    check_result(result, [2, 4], EVICTION_POLICIES.names())
    assert result.to_dict()["scope"] == "global"


def test_render_table_has_a_row_per_result(trace_file: Path) -> None:
    result = run_cache_bench(trace_file, [2, 3], policies=["lru", "lfu", "fifo"], warmup_sequences=2)
    table = render_table(result)
    assert table.row_count == len(result.rows) == 8
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "belady (offline)" in text and "first 2 sequences" in text


def test_bad_capacities_policies_and_files_are_rejected(trace_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="below the minimum 2"):
        run_cache_bench(trace_file, [1, 4])
    with pytest.raises(ValueError, match="maximum is 8"):
        run_cache_bench(trace_file, [4, 9])
    with pytest.raises(ValueError, match="no capacity"):
        run_cache_bench(trace_file, [])
    with pytest.raises(KeyError, match="known: belady, fifo"):
        run_cache_bench(trace_file, [4], policies=["lru", "clock"])
    with pytest.raises(ValueError, match="known: per-layer, global"):
        run_cache_bench(trace_file, [4], scope="node")
    with pytest.raises(ValueError, match="warmup_sequences 4"):
        run_cache_bench(trace_file, [4], warmup_sequences=4)
    with pytest.raises(TraceError, match="no such trace file"):
        run_cache_bench(tmp_path / "missing.npz", [4])


def test_default_capacities() -> None:
    assert default_capacities(64, 6) == [6, 8, 16, 32]
    assert default_capacities(8, 2) == [2, 4]
    assert default_capacities(4, 4) == [4]


def test_mixtral_trace_with_unknown_routing() -> None:
    path = SHARED_TRACES / "mixtral-8x7b-gsm8k.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared exists in the project's CI, not in a user's clone)")
    known_ids = int((load_trace(path).experts >= 0).sum())
    result = run_cache_bench(path, [2, 4, 8])
    check_result(result, [2, 4, 8], EVICTION_POLICIES.names())
    for row in result.rows:
        if row.capacity == 8:
            assert row.sim.warm_hit_rate == 1.0
        # -1 entries (dropped by the recorder) are not requests.
        assert row.sim.requests.sum() == known_ids
