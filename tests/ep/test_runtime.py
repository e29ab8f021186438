"""Real processes (gloo on CPU): 1 process, N-process sync and N-process async give the same outputs.

Each launch runs both modes in the same processes, so a test costs one process start-up.
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest

from moeserve.ep.config import EPConfig, FailureInjection
from moeserve.ep.launch import EPWorkerError, run_expert_parallel
from moeserve.ep.local import run_local
from moeserve.sim.ep import synthetic_routing
from moeserve.traces.format import TraceMeta, TraceWriter

SMALL = {
    "requests": 4,
    "prompt_tokens": 6,
    "new_tokens": 4,
    "micro_batches": 2,
    "collective_timeout_s": 30.0,
    "run_timeout_s": 120.0,
}


def _assert_same_outputs(result, reference, atol: float) -> None:
    for mode in ("sync", "async"):
        record = result.modes[mode].record
        np.testing.assert_array_equal(record.token_ids, reference.record.token_ids, err_msg=mode)
        np.testing.assert_allclose(
            record.first_outputs, reference.record.first_outputs, rtol=0, atol=atol, err_msg=mode
        )
        np.testing.assert_allclose(
            record.last_outputs, reference.record.last_outputs, rtol=0, atol=atol, err_msg=mode
        )


@pytest.fixture(scope="module")
def model_reference():
    return run_local(EPConfig(**SMALL))


@pytest.mark.parametrize("processes", [2, 4])
def test_reference_model_same_outputs_in_one_process_sync_and_async(processes: int, model_reference) -> None:
    rounds = 2 if processes == 2 else 1  # two rounds once: modes alternate in one launch
    scheduler = "defrag" if processes == 2 else "flfs"
    result = run_expert_parallel(EPConfig(processes=processes, rounds=rounds, scheduler=scheduler, **SMALL))
    assert [run.mode for run in result.runs] == ["sync", "async"] * rounds
    _assert_same_outputs(result, model_reference, atol=1e-4)
    for run in result.runs:
        np.testing.assert_array_equal(run.record.token_ids, model_reference.record.token_ids)
    assert result.expert2worker.shape == (4, 16)
    assert sorted(np.unique(result.expert2worker).tolist()) == list(range(processes - 1))
    # Every expert is held by exactly one expert worker, every layer.
    assert [sum(held) for held in zip(*result.held_experts.values(), strict=True)] == [16] * 4
    sync, async_ = result.modes["sync"], result.modes["async"]
    assert sync.generated_tokens == async_.generated_tokens == 4 * 4
    assert all(layer.barrier_wait_s >= 0 for layer in sync.metrics.layers)
    assert all(0 < layer.balancedness <= 1 for layer in sync.metrics.layers)
    assert all(layer.queue_depth_mean > 0 for layer in async_.metrics.layers)
    assert all(layer.barrier_wait_s == 0 for layer in async_.metrics.layers)


def test_trace_workload_same_outputs_with_skewed_routing(tmp_path) -> None:
    routing = synthetic_routing(num_tokens=80, num_layers=3, num_experts=8, top_k=2, skew=1.2, seed=3)
    writer = TraceWriter(TraceMeta(model="synthetic", num_experts=8, top_k=2, phase="decode", source="test"))
    writer.add_sequence(routing)
    path = writer.save(tmp_path / "skewed.npz")
    config = EPConfig(
        processes=3,
        trace=str(path),
        hidden_size=16,
        intermediate_size=24,
        scheduler="max-batch",
        hold_tokens_per_expert=4.0,  # held layers wait for more rows or for the 1 ms flush
        flush_after_s=0.001,
        **SMALL,
    )
    result = run_expert_parallel(config)
    _assert_same_outputs(result, run_local(config), atol=1e-5)
    assert result.modes["sync"].metrics.mean_balancedness < 1.0  # skewed loads on 2 workers


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failing_worker_stops_every_process_without_hanging(mode: str) -> None:
    config = EPConfig(
        processes=3, modes=(mode,), inject_failure=FailureInjection(rank=2, after_layer_calls=3), **SMALL
    )
    start = time.perf_counter()
    with pytest.raises(EPWorkerError, match="rank 2 failed") as raised:
        run_expert_parallel(config)
    assert "injected failure" in str(raised.value)
    assert time.perf_counter() - start < 60
    assert not [child for child in multiprocessing.active_children() if child.name.startswith("moeserve-ep-")]
