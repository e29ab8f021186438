"""The expert-parallelism simulator: hand-made cases with known answers, and the real trace."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from moeserve.sim.ep import (
    EPSimConfig,
    SimCosts,
    calibrate_costs,
    simulate_ep,
    simulate_trace,
    synthetic_routing,
)
from moeserve.sim.schedulers import LAYER_SCHEDULERS, QueueSnapshot, defrag, defrag_scores

SHARED = Path(__file__).resolve().parents[3] / "shared"
DEEPSEEK_TRACE = SHARED / "traces" / "deepseek-v2-lite-puffin-a.npz"


def _two_worker_sync(costs: SimCosts, passes: int):
    """One layer, two experts on two workers, top-1: 3 tokens to expert 0, 1 token to expert 1."""
    routing = np.array([0, 0, 0, 1], dtype=np.int16).reshape(4, 1, 1)  # [T, L, K]
    config = EPSimConfig(
        attention_workers=1,
        expert_workers=2,
        mode="sync",
        tokens_per_attention_worker=4,
        micro_batches_per_worker=1,
        passes=passes,
    )
    return simulate_ep(routing, num_experts=2, config=config, costs=costs, expert2rank=np.array([[0, 1]]))


def test_sync_barrier_waits_for_the_slowest_expert_worker() -> None:
    costs = SimCosts(
        expert_overhead_s=5.0,
        expert_per_token_s=1.0,
        attention_overhead_s=0.0,
        attention_per_token_s=0.0,
        message_latency_s=0.0,
        bytes_per_token=0,
    )
    result = _two_worker_sync(costs, passes=3)
    slowest, other = 5.0 + 3 * 1.0, 5.0 + 1 * 1.0
    assert result.makespan_s == pytest.approx(3 * slowest)
    assert result.mean_barrier_wait_s == pytest.approx((slowest - other) / 2)
    assert result.expert_utilisation == pytest.approx((1.0, other / slowest))
    assert result.latency_p99_s == pytest.approx(slowest)
    assert result.tokens == 12


def test_sync_layer_time_is_attention_dispatch_slowest_combine() -> None:
    costs = SimCosts(
        expert_overhead_s=5.0,
        expert_per_token_s=1.0,
        attention_overhead_s=2.0,
        attention_per_token_s=0.5,
        message_latency_s=1.0,
        bandwidth_bytes_per_s=10.0,
        bytes_per_token=10,
    )
    result = _two_worker_sync(costs, passes=1)
    attention = 2.0 + 4 * 0.5
    dispatch = 1.0 + 4 * 10 / 10.0  # one sender, 4 assignments on its link
    combine = 1.0 + 3 * 10 / 10.0  # worker 0 sends back 3 assignments
    assert result.makespan_s == pytest.approx(attention + dispatch + 8.0 + combine)


def test_async_beats_sync_on_skewed_routing() -> None:
    routing = synthetic_routing(num_tokens=512, num_layers=4, num_experts=16, top_k=2, skew=1.2, seed=1)
    results = {
        mode: simulate_ep(
            routing,
            16,
            EPSimConfig(
                attention_workers=2, expert_workers=4, mode=mode, tokens_per_attention_worker=64, passes=2
            ),
        )
        for mode in ("sync", "async")
    }
    assert results["sync"].tokens == results["async"].tokens == 2 * 64 * 2
    assert results["async"].throughput_tokens_per_s >= results["sync"].throughput_tokens_per_s
    assert results["sync"].mean_barrier_wait_s > 0
    assert results["async"].mean_queue_depth > 0


def test_async_is_deterministic_and_schedulers_all_finish() -> None:
    routing = synthetic_routing(num_tokens=128, num_layers=3, num_experts=8, top_k=2, skew=1.0, seed=2)
    for name in LAYER_SCHEDULERS:
        config = EPSimConfig(
            attention_workers=2,
            expert_workers=2,
            mode="async",
            scheduler=name,
            tokens_per_attention_worker=16,
            micro_batches_per_worker=4,
            passes=2,
        )
        first, second = simulate_ep(routing, 8, config), simulate_ep(routing, 8, config)
        assert first == second
        assert first.tokens == 2 * 16 * 2
        assert all(0 < share <= 1 + 1e-9 for share in first.expert_utilisation)


def test_defrag_score_matches_the_formula() -> None:
    tokens = np.array([1.0, 2.0, 0.0, 4.0, 5.0])  # [L]
    history = np.array([[0.0, 2.0, 2.0, 0.0, 1.0], [2.0, 0.0, 4.0, 2.0, 3.0]])  # [H, L]
    snapshot = QueueSnapshot(
        tokens=tokens, history=history, eligible=np.array([True, True, False, True, True])
    )
    hist = np.array([1.0, 1.0, 3.0, 1.0, 2.0])
    d = 0.8
    expected = [
        tokens[i] + sum(d**k * (tokens[i + k] + hist[i + k]) for k in range(1, 4) if i + k < 5)
        for i in range(5)
    ]
    # Layer 0 by hand: 1 + 0.8 * (2 + 1) + 0.64 * (0 + 3) + 0.512 * (4 + 1) = 7.88
    assert expected[0] == pytest.approx(7.88)
    np.testing.assert_allclose(defrag_scores(snapshot), expected)
    assert defrag(snapshot) == int(np.argmax(expected))


def test_scheduler_registry_rejects_unknown_names() -> None:
    with pytest.raises(KeyError, match="known: defrag, flfs, max-batch"):
        LAYER_SCHEDULERS.get("round-robin")
    with pytest.raises(KeyError, match="round-robin"):
        EPSimConfig(attention_workers=1, expert_workers=1, scheduler="round-robin")


def test_flfs_and_max_batch_choose_by_their_rule() -> None:
    snapshot = QueueSnapshot(
        tokens=np.array([0.0, 1.0, 9.0]), history=np.zeros((0, 3)), eligible=np.array([False, True, True])
    )
    assert LAYER_SCHEDULERS.get("flfs")(snapshot) == 1
    assert LAYER_SCHEDULERS.get("max-batch")(snapshot) == 2


def test_bad_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        EPSimConfig(attention_workers=1, expert_workers=1, mode="pipelined")
    with pytest.raises(ValueError, match="expert_workers"):
        EPSimConfig(attention_workers=1, expert_workers=0)
    with pytest.raises(ValueError, match="message_latency_s"):
        SimCosts(message_latency_s=-1.0)
    with pytest.raises(ValueError, match="exceeds"):
        simulate_ep(
            np.zeros((4, 1, 1), dtype=np.int16), 2, EPSimConfig(attention_workers=1, expert_workers=3)
        )


def test_result_dict_carries_throughput_and_latency() -> None:
    routing = synthetic_routing(num_tokens=64, num_layers=2, num_experts=4, top_k=2, seed=3)
    result = simulate_ep(
        routing,
        4,
        EPSimConfig(
            attention_workers=1, expert_workers=2, mode="sync", tokens_per_attention_worker=8, passes=1
        ),
    )
    document = result.to_dict()
    for key in ("throughput_tokens_per_s", "latency_p50_s", "latency_p90_s", "latency_p99_s"):
        assert math.isfinite(document[key]) and document[key] > 0
    assert document["throughput_tokens_per_s"] == pytest.approx(result.tokens / result.makespan_s)
    assert len(result.render_table().splitlines()) == 10


def test_calibrate_costs_measures_positive_numbers() -> None:
    costs = calibrate_costs(batch_sizes=(1, 16, 64), repeats=5)
    assert "expert_per_token_s" in costs.measured and "message_latency_s" in costs.measured
    assert "bytes_per_token" not in costs.measured
    assert costs.expert_per_token_s > 0 and costs.message_latency_s > 0 and costs.bandwidth_bytes_per_s > 0


@pytest.mark.skipif(
    not DEEPSEEK_TRACE.exists(), reason=f"real trace {DEEPSEEK_TRACE} is absent (needs /work/shared)"
)
def test_deepseek_trace_async_beats_sync_at_8_plus_8() -> None:
    from moeserve.traces.format import load_trace

    trace = load_trace(DEEPSEEK_TRACE)
    results = {
        mode: simulate_trace(
            trace,
            EPSimConfig(
                attention_workers=8, expert_workers=8, mode=mode, tokens_per_attention_worker=64, passes=1
            ),
        )
        for mode in ("sync", "async")
    }
    assert results["async"].throughput_tokens_per_s > results["sync"].throughput_tokens_per_s
    assert results["sync"].mean_barrier_wait_s > 0
