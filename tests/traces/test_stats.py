"""Routing statistics on hand-made traces with known answers, and on the real traces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from moeserve.traces.format import Trace, TraceMeta, load_trace
from moeserve.traces.stats import ExpertPair, TraceStats, render_stats_table, trace_stats

SHARED_TRACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces"


def make_trace(experts: list, offsets: list[int], num_experts: int, top_k: int) -> Trace:
    meta = TraceMeta(
        model="test/tiny", num_experts=num_experts, top_k=top_k, phase="decode", source="unit test"
    )
    return Trace(
        experts=np.array(experts, dtype=np.int16), offsets=np.array(offsets, dtype=np.int64), meta=meta
    )


def hand_made_trace() -> Trace:
    """E=4, K=2, L=2; sequence A has 3 tokens, sequence B has 2.

    Layer 0 (no unknowns):  A: {0,1} {1,2} {2,3}   B: {0,1} {0,1}
    Layer 1 (with -1):      A: {3}   {3}   {}      B: {2,1} {1,2}
    """
    return make_trace(
        experts=[
            [[0, 1], [3, -1]],
            [[1, 2], [3, -1]],
            [[2, 3], [-1, -1]],
            [[0, 1], [2, 1]],
            [[0, 1], [1, 2]],
        ],
        offsets=[0, 3, 5],
        num_experts=4,
        top_k=2,
    )


@pytest.fixture(scope="module")
def hand_made_stats() -> TraceStats:
    return trace_stats(hand_made_trace(), top_pairs=2)


def test_load_skew_and_entropy(hand_made_stats: TraceStats) -> None:
    layer0, layer1 = hand_made_stats.layers
    # Layer 0 loads: expert 0 -> 3, 1 -> 4, 2 -> 2, 3 -> 1; total 10, mean 2.5.
    assert layer0.load_skew == pytest.approx(4 / 2.5)
    expected_entropy = -sum(p * math.log2(p) for p in (0.3, 0.4, 0.2, 0.1))
    assert layer0.entropy_bits == pytest.approx(expected_entropy)
    assert layer0.normalized_entropy == pytest.approx(expected_entropy / 2)
    # Layer 1 loads (unknowns left out): 0 -> 0, 1 -> 2, 2 -> 2, 3 -> 2; total 6, mean 1.5.
    assert layer1.load_skew == pytest.approx(2 / 1.5)
    assert layer1.entropy_bits == pytest.approx(math.log2(3))
    assert layer1.normalized_entropy == pytest.approx(math.log2(3) / 2)


def test_temporal_locality_stays_within_sequences_and_skips_unknowns(hand_made_stats: TraceStats) -> None:
    layer0, layer1 = hand_made_stats.layers
    # Layer 0 pairs: A0->A1 reuses 1 of 2, A1->A2 1 of 2, B0->B1 2 of 2; A2->B0 crosses sequences.
    assert layer0.temporal_locality == pytest.approx(4 / 6)
    # Layer 1 pairs: A0->A1 1 of 1, B0->B1 2 of 2; A1->A2 is skipped because A2 is wholly unknown.
    assert layer1.temporal_locality == pytest.approx(3 / 3)
    assert hand_made_stats.mean_temporal_locality == pytest.approx((4 / 6 + 1) / 2)
    assert hand_made_stats.random_temporal_locality == pytest.approx(2 / 4)


def test_co_activated_pairs(hand_made_stats: TraceStats) -> None:
    layer0, layer1 = hand_made_stats.layers
    # Layer 0: {0,1} x3, {1,2} x1, {2,3} x1; the tie is broken by ascending ids.
    assert layer0.top_pairs == (ExpertPair(0, 1, 3), ExpertPair(1, 2, 1))
    # Layer 1: only B0 and B1 chose two known experts.
    assert layer1.top_pairs == (ExpertPair(1, 2, 2),)


def test_trace_level_figures(hand_made_stats: TraceStats) -> None:
    stats = hand_made_stats
    assert (stats.num_tokens, stats.num_layers, stats.num_sequences) == (5, 2, 2)
    assert (stats.num_experts, stats.top_k, stats.model) == (4, 2, "test/tiny")
    assert [layer.routed_tokens for layer in stats.layers] == [5, 4]
    assert stats.unknown_fraction == pytest.approx(4 / 20)
    assert stats.mean_load_skew == pytest.approx((1.6 + 4 / 3) / 2)


def test_even_routing_has_unit_skew_and_full_entropy() -> None:
    # Every expert of 4 chosen exactly twice; consecutive tokens share nothing.
    stats = trace_stats(make_trace([[[0, 1]], [[2, 3]], [[0, 1]], [[2, 3]]], [0, 4], num_experts=4, top_k=2))
    (layer,) = stats.layers
    assert layer.load_skew == pytest.approx(1.0)
    assert layer.entropy_bits == pytest.approx(2.0)
    assert layer.normalized_entropy == pytest.approx(1.0)
    assert layer.temporal_locality == 0.0


def test_one_hot_expert_has_maximal_skew_and_zero_entropy() -> None:
    stats = trace_stats(make_trace([[[5]], [[5]], [[5]]], [0, 3], num_experts=8, top_k=1))
    (layer,) = stats.layers
    assert layer.load_skew == pytest.approx(8.0)
    assert layer.entropy_bits == 0.0
    assert layer.normalized_entropy == 0.0
    assert layer.temporal_locality == 1.0
    assert layer.top_pairs == ()  # top-1 routing has no pairs


def test_random_routing_matches_the_random_baseline() -> None:
    rng = np.random.default_rng(1)
    num_tokens, num_experts, top_k = 4000, 16, 4
    experts = np.argsort(rng.random((num_tokens, 1, num_experts)), axis=2)[:, :, :top_k]  # [T, 1, K] distinct
    stats = trace_stats(make_trace(experts.tolist(), [0, num_tokens], num_experts, top_k))
    assert stats.mean_temporal_locality == pytest.approx(stats.random_temporal_locality, abs=0.02)
    assert stats.mean_normalized_entropy == pytest.approx(1.0, abs=0.01)


def test_wholly_unknown_layer_gives_undefined_figures_that_serialise_as_null() -> None:
    trace = make_trace([[[0, 1], [-1, -1]], [[0, 2], [-1, -1]]], [0, 2], num_experts=4, top_k=2)
    stats = trace_stats(trace)
    known, unknown = stats.layers
    assert math.isnan(unknown.load_skew) and math.isnan(unknown.temporal_locality)
    assert unknown.routed_tokens == 0 and unknown.top_pairs == ()
    assert stats.mean_temporal_locality == pytest.approx(known.temporal_locality)  # undefined layer skipped
    assert known.temporal_locality == pytest.approx(0.5)

    document = json.loads(json.dumps(stats.to_dict(), allow_nan=False))

    assert document["layers"][1]["load_skew"] is None
    assert document["layers"][0]["top_pairs"][0] == {"first": 0, "second": 1, "count": 1}
    assert document["mean_temporal_locality"] == pytest.approx(0.5)


def test_top_pairs_argument() -> None:
    assert all(layer.top_pairs == () for layer in trace_stats(hand_made_trace(), top_pairs=0).layers)
    assert len(trace_stats(hand_made_trace(), top_pairs=10).layers[0].top_pairs) == 3  # only non-zero counts
    with pytest.raises(ValueError, match="top_pairs must be >= 0, got -1"):
        trace_stats(hand_made_trace(), top_pairs=-1)


def test_render_stats_table(hand_made_stats: TraceStats) -> None:
    table = render_stats_table(hand_made_stats)
    assert table.row_count == 3  # two layers and the mean
    assert [column.header.split("\n")[0] for column in table.columns][:2] == ["layer", "tokens"]
    locality_column = next(column for column in table.columns if str(column.header).startswith("temporal"))
    assert list(locality_column.cells) == ["0.667", "1.000", "0.833"]
    pairs_column = table.columns[-1]
    assert list(pairs_column.cells)[0] == "0+1 (3), 1+2 (1)"


# --- the real traces ----------------------------------------------------------------------------


def real_trace(name: str) -> Trace:
    path = SHARED_TRACES / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real traces live in ../shared beside the checkout")
    return load_trace(path)


@pytest.fixture(scope="module")
def deepseek_stats() -> TraceStats:
    return trace_stats(real_trace("deepseek-v2-lite-puffin-a.npz"))


def test_deepseek_matches_the_published_figures(deepseek_stats: TraceStats) -> None:
    # traces/README.md: a token shares 0.267 of its experts with the previous one (0.094 random).
    assert deepseek_stats.mean_temporal_locality == pytest.approx(0.267, abs=0.0005)
    assert deepseek_stats.random_temporal_locality == pytest.approx(6 / 64)
    assert deepseek_stats.num_layers == 26 and deepseek_stats.unknown_fraction == 0.0
    # Real routing is skewed but far from collapsed: every layer has a hot expert, none dominates.
    assert all(1.2 < layer.load_skew < 4.0 for layer in deepseek_stats.layers)
    assert all(0.9 < layer.normalized_entropy < 1.0 for layer in deepseek_stats.layers)
    assert all(len(layer.top_pairs) == 5 for layer in deepseek_stats.layers)
    json.dumps(deepseek_stats.to_dict(), allow_nan=False)


def test_mixtral_trace_with_unknown_entries() -> None:
    stats = trace_stats(real_trace("mixtral-8x7b-gsm8k.npz"))
    assert stats.unknown_fraction == pytest.approx(30 / (247 * 32 * 2))
    assert stats.random_temporal_locality == pytest.approx(2 / 8)
    assert stats.mean_temporal_locality > stats.random_temporal_locality
    assert all(244 <= layer.routed_tokens <= 247 for layer in stats.layers)
