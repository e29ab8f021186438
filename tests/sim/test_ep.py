"""The expert-parallelism simulator: hand-made cases with known answers, and the real trace."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moeserve.sim.calibrate import (
    Calibration,
    CalibrationShape,
    calibrate_costs,
    fit_collective,
    fit_message_cpu,
    fit_message_latency,
    load_calibration,
    measure_gloo,
    save_calibration,
)
from moeserve.sim.ep import (
    EPSimConfig,
    RequestWorkload,
    SimCosts,
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
        collective_latency_s=0.0,
        bytes_per_token=0,
    )
    result = _two_worker_sync(costs, passes=3)
    slowest, other = 5.0 + 3 * 1.0, 5.0 + 1 * 1.0
    assert result.makespan_s == pytest.approx(3 * slowest)  # message latency is 0 here
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
        message_latency_s=100.0,  # async only: sync uses collective_latency_s
        collective_latency_s=1.0,
        bandwidth_bytes_per_s=10.0,
        bytes_per_token=10,
    )
    result = _two_worker_sync(costs, passes=1)
    attention = 2.0 + 4 * 0.5
    split_sizes = 1.0  # the split-size exchange before the variable-size all-to-all
    dispatch = 1.0 + 4 * 10 / 10.0  # one sender, 4 assignments on its link
    combine = 1.0 + 3 * 10 / 10.0  # worker 0 sends back 3 assignments
    assert result.makespan_s == pytest.approx(attention + split_sizes + dispatch + 8.0 + combine)


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


def test_calibration_measures_positive_costs_and_round_trips_through_json(tmp_path: Path) -> None:
    shape = CalibrationShape(
        hidden=32,
        intermediate=48,
        experts_per_worker=8,
        top_k=2,
        row_counts=(4, 16, 64),
        token_counts=(4, 32),
        message_rows=(0, 64),
        repeats=3,
    )
    calibration = calibrate_costs(shape)
    costs = calibration.costs
    assert {
        "expert_per_token_s", "message_latency_s", "message_cpu_s", "collective_latency_s", "attention_switch_s"
    } <= set(costs.measured)
    assert calibration.shape.processes == 2
    assert "bytes_per_token" not in costs.measured
    assert costs.bytes_per_token == 4 * 32 + 8
    assert 1 <= calibration.effective_cores <= (os.cpu_count() or 1)
    assert calibration.samples["parallel_speedup"][0] == [1.0, 1.0]
    for name in ("expert_per_token_s", "attention_per_token_s", "message_cpu_s", "collective_latency_s",
                 "bandwidth_bytes_per_s"):
        assert math.isfinite(getattr(costs, name)) and getattr(costs, name) > 0
    assert len(calibration.samples["expert"]) == 6 and all(len(row) == 3 for row in calibration.samples["expert"])
    assert [row[0] for row in calibration.samples["attention"]] == [4.0, 32.0]
    assert [row[0] for row in calibration.samples["message_round_trip"]] == [0.0, 64.0 * (4 * 32 + 8)]  # body bytes
    assert [row[0] for row in calibration.samples["exchange"]] == [1.0, 64.0]  # rows x 1 expert worker
    path = tmp_path / "costs.json"
    save_calibration(calibration, path)
    assert load_calibration(path) == calibration
    with pytest.raises(ValueError, match="format"):
        Calibration.from_dict({"format": "something-else"})


def _balanced_routing(num_tokens: int, num_experts: int, top_k: int, num_layers: int) -> np.ndarray:
    """int16 [T, L, K]: token t goes to experts t, t+1, ... (mod E): every expert gets T*K/E tokens."""
    experts = (np.arange(num_tokens)[:, None] + np.arange(top_k)[None, :]) % num_experts  # [T, K]
    return np.repeat(experts[:, None, :], num_layers, axis=1).astype(np.int16)


def test_sync_equals_async_on_balanced_routing_with_linear_costs() -> None:
    """One batch per attention worker, nothing held back, no fixed costs: async has nothing to win."""
    routing = _balanced_routing(num_tokens=64, num_experts=4, top_k=2, num_layers=3)
    costs = SimCosts(
        expert_overhead_s=0.0,
        expert_per_token_s=1e-6,
        attention_overhead_s=0.0,
        attention_per_token_s=2e-6,
        message_latency_s=0.0,
        collective_latency_s=0.0,
        bandwidth_bytes_per_s=1e9,
        bytes_per_token=1000,
    )
    for workload in (None, RequestWorkload(requests=8, prompt_tokens=4, new_tokens=3)):
        results = {
            mode: simulate_ep(
                routing,
                4,
                EPSimConfig(
                    attention_workers=1,
                    expert_workers=2,
                    mode=mode,
                    tokens_per_attention_worker=16,
                    micro_batches_per_worker=1,
                    hold_tokens_per_expert=0.0,
                    flush_after_s=0.0,
                    passes=3,
                    workload=workload,
                ),
                costs,
                expert2rank=np.array([[0, 0, 1, 1]] * 3),
            )
            for mode in ("sync", "async")
        }
        sync, async_ = results["sync"], results["async"]
        assert sync.tokens == async_.tokens
        assert async_.makespan_s == pytest.approx(sync.makespan_s, rel=1e-9)
        assert async_.latency_p50_s == pytest.approx(sync.latency_p50_s, rel=1e-9)
        assert sync.mean_barrier_wait_s == pytest.approx(0.0, abs=1e-15)


def test_request_workload_counts_generated_tokens_and_times_decode_steps() -> None:
    routing = synthetic_routing(num_tokens=200, num_layers=2, num_experts=8, top_k=2, seed=4)
    workload = RequestWorkload(requests=6, prompt_tokens=5, new_tokens=4)
    for mode in ("sync", "async"):
        result = simulate_ep(
            routing,
            8,
            EPSimConfig(attention_workers=2, expert_workers=2, mode=mode, micro_batches_per_worker=3, workload=workload),
        )
        assert result.tokens == 6 * 4
        assert result.latency_p50_s > 0 and result.throughput_tokens_per_s == pytest.approx(24 / result.makespan_s)
    with pytest.raises(ValueError, match="requests 4 give 2 per attention worker"):
        EPSimConfig(
            attention_workers=2,
            expert_workers=1,
            mode="async",
            micro_batches_per_worker=3,
            workload=RequestWorkload(requests=4),
        )


def _expert_costs_only(**changes: float) -> SimCosts:
    """5 s per active expert and 1 s per token on experts, nothing else (unless ``changes`` say so)."""
    costs = SimCosts(
        expert_overhead_s=5.0,
        expert_per_token_s=1.0,
        attention_overhead_s=0.0,
        attention_per_token_s=0.0,
        message_latency_s=0.0,
        collective_latency_s=0.0,
        bytes_per_token=0,
    )
    return dataclasses.replace(costs, **changes)


def _three_and_one_makespan(costs: SimCosts, mode: str, **config: float) -> float:
    """Makespan of one layer, top-1, two expert workers: 3 tokens to expert 0 (worker 0), 1 to
    expert 1 (worker 1), one attention worker, one micro-batch, one pass, no hold in async."""
    routing = np.array([0, 0, 0, 1], dtype=np.int16).reshape(4, 1, 1)
    settings = EPSimConfig(attention_workers=1, expert_workers=2, mode=mode, tokens_per_attention_worker=4,
                           micro_batches_per_worker=1, hold_tokens_per_expert=0.0, passes=1, **config)
    return simulate_ep(routing, 2, settings, costs, expert2rank=np.array([[0, 1]])).makespan_s


def test_shared_cores_serialise_expert_workers_in_sync() -> None:
    costs = _expert_costs_only()
    makespans = {cores: _three_and_one_makespan(costs, "sync", cores=cores) for cores in (0, 1, 2)}
    assert makespans[0] == makespans[2] == pytest.approx(8.0)
    assert makespans[1] == pytest.approx(8.0 + 6.0)  # one processor runs both workers in turn
    assert _three_and_one_makespan(costs, "async", cores=1) == pytest.approx(14.0)


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


def test_calibration_shape_covering_adds_the_workloads_call_sizes():
    shape = CalibrationShape(top_k=6)
    wide = shape.covering(requests=2048, prompt_tokens=16, attention_workers=1, expert_workers=1, micro_batches=4)
    # attention calls: 2048 decode tokens (sync), 512 (async); x16 at prefill
    assert {2048, 512, 2048 * 16, 512 * 16} <= set(wide.token_counts)
    assert set(shape.token_counts) <= set(wide.token_counts)
    # expert rows: top_k per token on the one expert worker; messages the same with one attention worker
    assert {2048 * 6, 512 * 6, 2048 * 16 * 6} <= set(wide.row_counts) and set(shape.row_counts) <= set(wide.row_counts)
    assert {2048 * 6, 512 * 6} <= set(wide.message_rows)
    assert list(wide.row_counts) == sorted(set(wide.row_counts))
    assert (wide.hidden, wide.intermediate, wide.repeats) == (shape.hidden, shape.intermediate, shape.repeats)
    spread = shape.covering(requests=64, prompt_tokens=4, attention_workers=2, expert_workers=4, micro_batches=2)
    assert {32, 16, 128, 64} <= set(spread.token_counts)  # 64 requests over 2 attention workers
    assert 32 * 6 * 2 // 4 in spread.row_counts  # every attention worker's rows meet on 4 expert workers
    with pytest.raises(ValueError, match="micro_batches must be an integer >= 1"):
        shape.covering(requests=8, prompt_tokens=4, attention_workers=1, expert_workers=1, micro_batches=0)


def test_message_processor_time_is_charged_at_both_ends_in_async_only() -> None:
    """One layer, two workers, top-1, 3 tokens to expert 0 and 1 to expert 1; each message costs 1 s of
    processor time at each end and nothing else. Async: the attention worker sends 2 dispatches and
    takes 2 combines (4 s) before its rows leave; worker 0 runs 5 + 3 plus one dispatch taken and
    one combine sent (2 s): done at 4 + 10 = 14. Sync pays its measured collectives instead: 8."""
    costs = _expert_costs_only(message_cpu_s=1.0)
    makespans = {mode: _three_and_one_makespan(costs, mode) for mode in ("sync", "async")}
    assert makespans == {"sync": pytest.approx(8.0), "async": pytest.approx(14.0)}
    # Per byte instead (1 byte per row, 0.5 s a byte): the attention worker sends 3 + 1 rows and takes
    # them back (4 s); worker 0 takes and returns 3 rows (3 s): 4 + 8 + 3 = 15.
    per_byte = dataclasses.replace(costs, message_cpu_s=0.0, message_cpu_per_byte_s=0.5, bytes_per_token=1)
    assert _three_and_one_makespan(per_byte, "async") == pytest.approx(15.0)


def test_collective_and_message_fits_recover_the_simulators_costs() -> None:
    latency, bandwidth, bytes_per_row, workers = 2e-3, 1e8, 520, 3
    rows = [3, 48, 192, 768]
    exchange = [3 * latency + (n + -(-n // workers)) * bytes_per_row / bandwidth for n in rows]
    fitted_collective, fitted_collective_bandwidth = fit_collective(rows, exchange, workers, bytes_per_row)
    assert fitted_collective == pytest.approx(latency, rel=1e-6)
    assert fitted_collective_bandwidth == pytest.approx(bandwidth, rel=1e-6)
    # The message fit against the simulator itself: one layer, one micro-batch whose tokens send
    # n rows to each of 3 workers; nothing costs time but messages, so the makespan is the round trip.
    cpu, flight, message_rows = 2e-4, 5e-5, [1, 16, 128, 1024]
    costs = SimCosts(
        expert_overhead_s=0.0, expert_per_token_s=0.0, attention_overhead_s=0.0, attention_per_token_s=0.0,
        message_latency_s=flight, message_cpu_s=cpu, bandwidth_bytes_per_s=bandwidth, bytes_per_token=bytes_per_row,
    )  # fmt: skip
    round_trip = []
    for rows_per_worker in message_rows:
        routing = np.tile(np.arange(workers, dtype=np.int16), rows_per_worker).reshape(-1, 1, 1)  # [3n, 1, 1]
        config = EPSimConfig(
            attention_workers=1, expert_workers=workers, mode="async", tokens_per_attention_worker=routing.shape[0],
            micro_batches_per_worker=1, hold_tokens_per_expert=0.0, flush_after_s=0.0, passes=1,
        )  # fmt: skip
        result = simulate_ep(routing, workers, config, costs, expert2rank=np.arange(workers)[None, :])
        round_trip.append(result.makespan_s)
    cpus = [cpu] * len(message_rows)
    fitted_latency, fitted_bandwidth = fit_message_latency(message_rows, round_trip, workers, cpus, bytes_per_row)
    assert fitted_latency == pytest.approx(flight, rel=1e-6)
    assert fitted_bandwidth == pytest.approx(bandwidth, rel=1e-6)
    # Flights at or below 0 are left out; one size left gives a latency only, none a floor.
    assert fit_message_latency([0, 16], [3e-3, 2 * 4 * cpu], workers, [cpu, cpu], bytes_per_row) == pytest.approx(
        ((3e-3 - 2 * 4 * cpu) / 2, 1e15)
    )
    assert fit_message_latency([0, 16], [cpu, cpu], workers, [cpu, cpu], bytes_per_row) == (1e-9, 1e15)
    per_end = [cpu + n * bytes_per_row * 1e-10 for n in message_rows]
    fixed, per_byte = fit_message_cpu(message_rows, per_end, bytes_per_row)
    assert fixed == pytest.approx(cpu, rel=1e-6) and per_byte == pytest.approx(1e-10, rel=1e-6)


def test_measure_gloo_times_the_transport_and_the_sync_exchange_among_three_processes() -> None:
    timings = measure_gloo([0, 16], exchange_rows=[2, 32], hidden=32, repeats=3, processes=3)
    assert timings.processes == 3
    assert len(timings.round_trip_s) == 2 and all(value > 0 for value in timings.round_trip_s)
    assert len(timings.exchange_s) == 2 and all(value > 0 for value in timings.exchange_s)
    assert len(timings.message_cpu_s) == 2
    assert all(0 < cpu < trip for cpu, trip in zip(timings.message_cpu_s, timings.round_trip_s, strict=True))
    with pytest.raises(ValueError, match="at least 2 processes"):
        measure_gloo([0], processes=1)
    with pytest.raises(ValueError, match="processes must be an integer >= 2"):
        CalibrationShape(processes=1)


def test_calibration_in_bfloat16_without_messages_times_bf16_experts() -> None:
    shape = CalibrationShape(hidden=32, intermediate=48, experts_per_worker=4, top_k=2, row_counts=(4, 16),
                             token_counts=(4, 16), message_rows=(0, 16), repeats=2, dtype="bfloat16")
    assert shape.bytes_per_row == 2 * 32 + 8
    calibration = calibrate_costs(shape, measure_messages=False)
    assert calibration.costs.bytes_per_token == 2 * 32 + 8 and "message_cpu_s" not in calibration.costs.measured
    assert calibration.costs.expert_per_token_s > 0 and calibration.shape.dtype == "bfloat16"
    assert Calibration.from_dict(calibration.to_dict()).shape == calibration.shape


def test_calibration_shape_refuses_unknown_devices_and_dtypes() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        CalibrationShape(dtype="float16")
    with pytest.raises(ValueError, match="device must be"):
        CalibrationShape(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given without a GPU")
def test_calibration_on_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        calibrate_costs(CalibrationShape(device="cuda"))
