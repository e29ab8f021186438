"""The local serverless emulator: real worker processes, real weights, Lambda's rules and bill."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moeserve.models.loader import REFERENCE_MODEL
from moeserve.serverless.emulator import (
    CheckpointWeights,
    Emulator,
    EmulatorConfig,
    FunctionFailedError,
    PayloadLimitError,
    RandomWeights,
    fit_handler_calibration,
    model_replay,
)
from moeserve.serverless.export import PlanFile, save_plan_json
from moeserve.serverless.ledger import Ledger
from moeserve.serverless.perf import Calibration, device_name, save_calibration
from moeserve.serverless.plan import CostModel, DeploymentPlan, FunctionPlan, LayerPlan
from moeserve.serverless.prices import billed_cost, default_prices
from moeserve.serverless.shapes import ExpertShape, reference_shape
from moeserve.traces.format import TraceMeta, TraceWriter

LIMITS = default_prices().lambda_prices
MODEL = CostModel()


@pytest.fixture(scope="module")
def replay(reference_model):
    """The reference model's own routing, layer inputs and in-process layer outputs for 64 tokens."""
    token_ids = torch.randint(
        0, reference_model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)
    )
    return model_replay(reference_model, token_ids, layers=2)


@pytest.fixture(scope="module")
def checkpoint():
    return CheckpointWeights(REFERENCE_MODEL)


def split_plan() -> DeploymentPlan:
    """Two layers; each: experts 0-7 in 256 MB x 2 replicas, 8-15 in 512 MB; 2 micro-batches.

    Layer 0 uses the direct channel, layer 1 the object store.
    """
    functions = (FunctionPlan(tuple(range(8)), 256, 2), FunctionPlan(tuple(range(8, 16)), 512))
    return DeploymentPlan(
        (LayerPlan(functions, 2, "direct"), LayerPlan(functions, 2, "object_store")), "test"
    )


def one_function_plan(memory_mb: int, replicas: int = 1) -> DeploymentPlan:
    return DeploymentPlan((LayerPlan((FunctionPlan(tuple(range(16)), memory_mb, replicas),), 1, "direct"),))


def test_emulated_layers_equal_the_in_process_layers_and_the_ledger_adds_up(replay, checkpoint):
    config = EmulatorConfig(network="none")
    with Emulator(split_plan(), reference_shape(), checkpoint, 2, MODEL, config) as emulator:
        run = emulator.run(replay, batch_tokens=32)
        report = run.report()
        entries = emulator.ledger.entries

    assert run.batches == 2
    assert torch.allclose(
        torch.from_numpy(run.outputs), torch.from_numpy(replay.reference), rtol=1e-4, atol=1e-5
    )

    # A function gets each token once, whatever number of its experts the token chose; its
    # tokens are split over replicas, then micro-batches; every non-empty micro-batch is one
    # invocation (empty ones are not sent).
    invokes = [e for e in entries if e.kind == "invoke"]
    expected = rows = singles = 0
    for layer in range(2):
        for batch in range(2):
            ids = replay.topk_ids[layer, batch * 32 : (batch + 1) * 32]  # [32, 2]
            for function in split_plan().layers[layer].functions:
                tokens = np.flatnonzero(np.isin(ids, function.experts).any(axis=1))
                rows += tokens.size
                if function.replicas == 1:  # one micro-batch split aside, loads per expert as sent
                    for chunk in np.array_split(tokens, 2):
                        held = ids[chunk][np.isin(ids[chunk], function.experts)]
                        singles += int((np.unique(held, return_counts=True)[1] == 1).sum())
                for share in np.array_split(tokens, function.replicas):
                    expected += sum(1 for chunk in np.array_split(share, 2) if chunk.size)
    assert len(invokes) == expected
    assert sum(e.tokens for e in invokes) == 2 * 2 * 32 * 2  # layers x batches x tokens x top-2
    assert sum(e.rows for e in invokes) == rows < 2 * 2 * 32 * 2  # rows sent once per function
    # Experts given exactly one token are counted per invocation (the cost model prices them apart).
    one_replica = {
        (layer, g)
        for layer in range(2)
        for g, f in enumerate(split_plan().layers[layer].functions)
        if f.replicas == 1
    }
    assert sum(e.single_token_experts for e in invokes if (e.layer, e.function) in one_replica) == singles
    assert all(0 <= e.single_token_experts <= e.experts_touched for e in invokes)
    assert all(e.json_bytes == e.request_bytes for e in invokes if e.layer == 0)  # direct: raw response
    assert all(e.outcome == "ok" for e in entries)

    # Cold starts: one per instance (3 per layer), billed as duration without a request.
    inits = [e for e in entries if e.kind == "init"]
    assert len(inits) == 6
    for entry in entries:
        assert entry.billed_ms == max(math.ceil(entry.duration_ms - 1e-9), 1)
        per_request = LIMITS.price_per_million_requests / 1e6 if entry.kind == "invoke" else 0.0
        gb_seconds = entry.billed_ms / 1000 * entry.memory_mb / 1024
        assert entry.cost_usd == pytest.approx(
            gb_seconds * LIMITS.price_per_gb_second["x86_64"] + per_request
        )
    assert emulator.ledger.total() == pytest.approx(sum(e.cost_usd for e in entries))
    assert report.measured_invoke_cost == pytest.approx(sum(e.cost_usd for e in invokes))

    # The prediction is the cost model's for the same plan and the loads replayed.
    summary = report.to_dict()
    assert summary["measured"]["ledger"]["invocations"] == expected
    assert summary["measured"]["outputs_allclose"] is True
    assert summary["refitted"] is not None and summary["refitted"]["invoke_cost_usd"] > 0
    assert report.predicted_invoke_cost > 0 and math.isfinite(report.bill_ratio)
    # A 256 MB function has 256/1769 of a vCPU: the duty cycle stretches its wall time to cpu / share.
    small = [e for e in invokes if e.memory_mb == 256]
    assert all(e.wall_s >= 0.95 * e.cpu_s * 1769 / 256 for e in small)


def test_billing_rounds_up_to_whole_milliseconds():
    ledger = Ledger(LIMITS, "x86_64")
    short = ledger.bill("invoke", 1024, 0.2, layer=0, function=0, replica=0, batch=0, micro_batch=0)
    exact = ledger.bill("invoke", 1024, 3.0, layer=0, function=0, replica=0, batch=0, micro_batch=1)
    over = ledger.bill("invoke", 1024, 3.01, layer=0, function=0, replica=0, batch=0, micro_batch=2)
    init = ledger.bill("init", 1024, 150.4, layer=0, function=0, replica=0, batch=-1, micro_batch=-1)
    assert (short.billed_ms, exact.billed_ms, over.billed_ms, init.billed_ms) == (1, 3, 4, 151)
    assert short.cost_usd == pytest.approx(billed_cost(1024, 1.0))
    assert over.cost_usd == pytest.approx(billed_cost(1024, 4.0))
    assert init.cost_usd == pytest.approx(0.151 * 1.0 * LIMITS.price_per_gb_second["x86_64"])
    assert ledger.total("invoke") == pytest.approx(
        billed_cost(1024, 1.0) + billed_cost(1024, 3.0) + billed_cost(1024, 4.0)
    )


def test_a_function_over_its_memory_is_killed_and_reported():
    # 16 experts of 512 x 2048: 201 MB of weights in a 128 MB function.
    shape = ExpertShape("big", 512, 2048, 16, 2, 1)
    with Emulator(one_function_plan(128), shape, RandomWeights(shape), 1, MODEL) as emulator:
        instance = emulator.instances[(0, 0)][0]
        with pytest.raises(FunctionFailedError, match="out of memory") as failure:
            emulator.start_instance(instance)
        assert failure.value.outcome == "out_of_memory"
        assert instance.process is not None and instance.process.wait(timeout=5) == -9  # SIGKILL
        assert instance.peak_rss_kib > 128 * 1024
        (line,) = emulator.ledger.entries
        assert (line.kind, line.outcome, line.memory_mb) == ("init", "out_of_memory", 128)


def test_a_payload_over_the_synchronous_limit_is_refused_before_sending(checkpoint):
    shape = reference_shape()
    with Emulator(one_function_plan(1024), shape, checkpoint, 1, MODEL) as emulator:
        # 10,000 base64 rows of 128 floats are about 6.9 MB of JSON, over the 6 MiB limit.
        x = np.zeros((10_000, shape.hidden_size), dtype=np.float32)
        with pytest.raises(PayloadLimitError, match="synchronous payload limit"):
            emulator.invoke(0, 0, 0, x, np.zeros(10_000, dtype=np.int64))
        assert emulator.ledger.entries == ()
        assert emulator.instances[(0, 0)][0].process is None  # nothing was started, nothing billed


def test_an_invocation_past_the_timeout_is_killed_and_billed_for_the_timeout(checkpoint):
    shape = reference_shape()
    # 128 MB has 0.07 vCPU: 4,000 rows take ~30 ms of CPU, stretched to ~0.4 s by the duty cycle.
    # One host slot: the killed invocation must free it, or the next one would wait forever.
    config = EmulatorConfig(timeout_s=0.1, host_slots=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, shape.hidden_size), dtype=np.float32)
    experts = rng.integers(0, 16, 4000)
    with Emulator(one_function_plan(128), shape, checkpoint, 1, MODEL, config) as emulator:
        with pytest.raises(FunctionFailedError, match="timed out") as failure:
            emulator.invoke(0, 0, 0, x, experts)
        assert failure.value.outcome == "timeout"
        instance = emulator.instances[(0, 0)][0]
        assert instance.process is not None and instance.process.wait(timeout=5) == -9
        line = failure.value.entry
        assert line is not None and (line.kind, line.billed_ms) == ("invoke", 100)
        # The killed environment is replaced by a new one (another cold start, billed).
        emulator.start_instance(instance)
        assert instance.process.poll() is None and instance.killed_for is None
        assert [e.kind for e in emulator.ledger.entries] == ["init", "invoke", "init"]
        assert emulator.invoke(0, 0, 0, x[:2], experts[:2]).shape == (2, shape.hidden_size)


def test_concurrent_invocations_stay_within_the_limit(replay, checkpoint):
    # One function with 4 replicas at 128 MB (each invocation is mostly duty-cycle sleep, so the
    # four lanes overlap), but at most 2 invocations may run at once.
    config = EmulatorConfig(concurrency_limit=2, network="none")
    plan = DeploymentPlan((LayerPlan((FunctionPlan(tuple(range(16)), 128, 4),), 1, "direct"),))
    with Emulator(plan, reference_shape(), checkpoint, 1, MODEL, config) as emulator:
        inputs = type(replay)(
            replay.hidden[:1],
            replay.topk_ids[:1],
            replay.topk_weights[:1],
            replay.reference[:1],
            replay.source,
        )
        run = emulator.run(inputs, batch_tokens=64)
        assert emulator.ledger.max_concurrency() <= 2
        assert emulator.ledger.count("invoke") == 4
        assert run.throttled >= 1
        assert np.allclose(run.outputs, replay.reference[:1], rtol=1e-4, atol=1e-5)


def test_one_host_slot_is_held_while_computing_not_through_the_cpu_share_sleep(replay, checkpoint):
    # 128 MB (0.07 vCPU): each invocation computes ~1 ms and then sleeps ~14x that as its duty
    # cycle. With one host slot the next replica computes during that sleep, so invocations still
    # overlap; were the slot held to the reply, none could.
    config = EmulatorConfig(host_slots=1, network="none")
    plan = DeploymentPlan((LayerPlan((FunctionPlan(tuple(range(16)), 128, 4),), 1, "direct"),))
    with Emulator(plan, reference_shape(), checkpoint, 1, MODEL, config) as emulator:
        inputs = type(replay)(
            replay.hidden[:1], replay.topk_ids[:1], replay.topk_weights[:1], replay.reference[:1], replay.source
        )
        run = emulator.run(inputs, batch_tokens=64)
        assert emulator.host_slots == 1
        assert emulator.ledger.count("invoke") == 4
        assert emulator.ledger.max_concurrency() >= 2
        assert np.allclose(run.outputs, replay.reference[:1], rtol=1e-4, atol=1e-5)
        assert "at most 1 invocations compute at once" in " ".join(run.report().notes())


def test_cli_runs_a_saved_plan_with_a_trace_on_the_reference_weights(tmp_path):
    from moeserve.cli import app

    plan_path = save_plan_json(PlanFile(split_plan(), reference_shape()), tmp_path / "plan.json")
    rng = np.random.default_rng(0)
    writer = TraceWriter(TraceMeta("tiny-moe", 16, 2, "prefill", "test"), num_layers=4)
    writer.add_sequence(np.stack([rng.permutation(16)[:2] for _ in range(64 * 4)]).reshape(64, 4, 2))
    trace_path = writer.save(tmp_path / "trace.npz")
    # The prediction uses the cached calibration `serverless plan` would use (none is measured here).
    stored = Calibration(3e10, 1e-4, True, probe=(128, 160), invocation_overhead_s=2e-4,
                         payload_seconds_per_byte=9e-9, weights_streamed=True, device=device_name())  # fmt: skip
    calibration_path = save_calibration(tmp_path / "calibration.json", reference_shape(), stored)
    result = CliRunner().invoke(
        app,
        ["serverless", "run", str(plan_path), "--trace", str(trace_path), "--tokens", "64", "--batch-tokens", "32",
         "--calibration", str(calibration_path), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["layers"], report["tokens"], report["batches"]) == (2, 64, 2)
    assert report["weights"].startswith("real weights")
    assert report["measured"]["ledger"]["invocations"] > 0
    assert report["measured"]["outputs_allclose"] is None  # a trace holds no hidden states to compare with
    assert report["modelled"]["invoke_cost_usd"] > 0
    assert report["modelled"]["calibration"] == stored.to_dict()
    assert report["bill_ratio_measured_over_modelled"] == pytest.approx(
        report["measured"]["invoke_cost_usd"] / report["modelled"]["invoke_cost_usd"]
    )


def test_a_plan_for_another_shape_without_weights_or_routing_is_refused(tmp_path):
    from moeserve.cli import app

    plan = DeploymentPlan((LayerPlan((FunctionPlan((0, 1, 2, 3), 256),), 1, "direct"),))
    path = save_plan_json(PlanFile(plan, ExpertShape("other", 8, 12, 4, 2, 1)), tmp_path / "plan.json")
    result = CliRunner().invoke(app, ["serverless", "run", str(path), "--no-calibrate"])
    assert result.exit_code == 2
    assert "pass --trace" in result.output


def test_the_handler_fit_recovers_known_compute_constants():
    shape = reference_shape()
    ledger = Ledger(LIMITS, "x86_64")
    cases = (
        (16, 5, 0, 9_000),
        (64, 12, 2, 40_000),
        (256, 16, 0, 150_000),
        (100, 3, 1, 70_000),
        (8, 8, 8, 5_000),
    )
    for tokens, touched, singles, payload in cases:
        experts = (
            (touched - singles) * 2e-4 + singles * 5e-5 + (tokens - singles) * shape.flops_per_token / 5e10
        )
        rest = 1e-4 + payload * 8e-9
        ledger.bill("invoke", 512, 1.0, layer=0, function=0, replica=0, batch=0, micro_batch=0,
                    tokens=tokens, experts_touched=touched, single_token_experts=singles, experts_cpu_s=experts,
                    cpu_s=experts + rest, request_bytes=payload, response_bytes=payload // 2, json_bytes=payload)  # fmt: skip
    fitted = fit_handler_calibration(ledger.entries, shape)
    assert fitted is not None and fitted.covers(shape)
    assert fitted.flops_per_second == pytest.approx(5e10, rel=1e-6)
    assert fitted.call_overhead_s == pytest.approx(2e-4, rel=1e-6)
    assert fitted.single_token_expert_s == pytest.approx(5e-5, rel=1e-6)
    assert fitted.invocation_overhead_s == pytest.approx(1e-4, rel=1e-6)
    assert fitted.payload_seconds_per_byte == pytest.approx(8e-9, rel=1e-6)


def test_a_bfloat16_wire_halves_the_rows_and_rounds_the_outputs_within_bfloat16_precision(replay, checkpoint):
    config = EmulatorConfig(network="none")
    plans = {}
    for dtype in ("float32", "bfloat16"):
        layer = LayerPlan((FunctionPlan(tuple(range(16)), 1024),), 1, "direct", dtype)
        with Emulator(
            DeploymentPlan((layer, layer)), reference_shape(), checkpoint, 2, MODEL, config
        ) as emulator:
            run = emulator.run(replay, batch_tokens=32)
            plans[dtype] = (run, [e for e in emulator.ledger.entries if e.kind == "invoke"])
    exact, exact_lines = plans["float32"]
    rounded, rounded_lines = plans["bfloat16"]
    scale = float(np.abs(replay.reference).max())
    assert exact.max_abs_error() < 1e-4 * scale
    # bfloat16 keeps 8 significant bits of the rows and the outputs: errors of a few 2^-8.
    assert 1e-4 * scale < rounded.max_abs_error() < 0.05 * scale
    assert sum(e.response_bytes for e in rounded_lines) * 2 == sum(e.response_bytes for e in exact_lines)
    assert sum(e.request_bytes for e in rounded_lines) < 0.6 * sum(e.request_bytes for e in exact_lines)
