"""Serverless plans: the function cost/time model, constraint checks, evaluation and rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.table import Table

from moeserve.predict.popularity import BayesianPredictor, BayesianSettings
from moeserve.serverless.plan import (
    CostModel,
    DeploymentPlan,
    FunctionPlan,
    LayerPlan,
    Workload,
    assignments_per_row,
    evaluate_plan,
    function_figures,
    render_table,
    workload_from_predictor,
)
from moeserve.serverless.prices import billed_cost
from moeserve.serverless.shapes import DEEPSEEK_V2_LITE, ExpertShape, reference_shape
from moeserve.traces.format import TraceMeta, TraceWriter


def synthetic_workload(shape: ExpertShape, batch_tokens: int = 256, throughput: float = 50.0) -> Workload:
    """Zipf-skewed loads, the same for every layer; quantiles 1.2x and 1.5x the mean."""
    shares = 1.0 / np.arange(1, shape.num_experts + 1)
    shares /= shares.sum()
    expected = np.tile(batch_tokens * shape.top_k * shares, (shape.num_layers, 1))
    quantiles = np.stack([np.ceil(expected * 1.2), np.ceil(expected * 1.5)])
    return Workload(shape, batch_tokens, throughput, expected, (0.9, 0.99), quantiles, "synthetic zipf")


def one_function_plan(shape: ExpertShape, memory_mb: int, micro_batches: int = 1, channel: str = "direct"):
    layer = LayerPlan((FunctionPlan(tuple(range(shape.num_experts)), memory_mb),), micro_batches, channel)
    return DeploymentPlan((layer,) * shape.num_layers)


def test_billed_cost_matches_the_price_module_per_invocation():
    shape = reference_shape()
    model = CostModel()
    figures = function_figures(
        model,
        shape,
        np.array([4]),
        np.array([37.0]),
        np.array([50.0]),
        np.array([2]),
        3,
        "direct",
        np.array([512]),
    )
    duration_ms = float(figures.duration_s[0, 0]) * 1000
    assert figures.cost_per_batch[0, 0] == pytest.approx(billed_cost(512, duration_ms, requests=2 * 3))


def test_object_store_bills_get_and_put_inside_the_handler():
    shape = DEEPSEEK_V2_LITE
    model = CostModel()
    args = (model, shape, np.array([1]), np.array([100.0]), np.array([120.0]), np.array([1]), 1)
    direct = function_figures(*args, "direct", np.array([2048]))
    stored = function_figures(*args, "object_store", np.array([2048]))
    extra = model.constants.object_store_get_latency_s + model.constants.object_store_put_latency_s
    assert stored.duration_s[0, 0] - direct.duration_s[0, 0] >= extra
    assert stored.cost_per_batch[0, 0] > direct.cost_per_batch[0, 0]


def test_pipelining_hides_transfer_behind_compute_for_large_payloads():
    shape = DEEPSEEK_V2_LITE
    model = CostModel()
    args = (model, shape, np.array([64]), np.array([6000.0]), np.array([6000.0]), np.array([1]))
    serial = function_figures(*args, 1, "direct", np.array([10240])).seconds_per_batch[0, 0]
    piped = function_figures(*args, 4, "direct", np.array([10240])).seconds_per_batch[0, 0]
    assert piped < 0.8 * serial


def test_memory_needed_counts_runtime_weights_and_activations():
    shape = DEEPSEEK_V2_LITE
    model = CostModel()
    figures = function_figures(
        model,
        shape,
        np.array([8]),
        np.array([10.0]),
        np.array([10.0]),
        np.array([1]),
        1,
        "direct",
        np.array([4096]),
    )
    weights_mb = 8 * shape.expert_bytes / 2**20
    assert model.constants.runtime_overhead_mb + weights_mb < figures.needed_mb[0] < 4096


def test_evaluation_of_a_sound_plan_is_feasible_and_json_able():
    shape = reference_shape()
    workload = synthetic_workload(shape)
    evaluation = evaluate_plan(one_function_plan(shape, 1024), workload)
    assert evaluation.feasible, evaluation.violations
    assert evaluation.functions == evaluation.concurrency == shape.num_layers
    assert evaluation.cost_per_token == pytest.approx(sum(evaluation.layer_cost_per_batch) / 256)
    assert evaluation.throughput_tokens_per_s == pytest.approx(256 / max(evaluation.layer_seconds))
    record = json.loads(json.dumps(evaluation.to_dict()))
    assert record["modelled"] is True and record["feasible"] is True
    assert isinstance(render_table(evaluation), Table)


def test_broken_limits_are_reported():
    shape = DEEPSEEK_V2_LITE
    workload = synthetic_workload(shape, batch_tokens=8192, throughput=1e6)
    evaluation = evaluate_plan(one_function_plan(shape, 1024), workload)
    text = " ".join(evaluation.violations)
    assert not evaluation.feasible
    assert "below the" in text and "MB needed" in text
    assert "payload" in text and "throughput" in text


def test_concurrency_over_the_limit_is_reported_and_slows_the_plan():
    shape = DEEPSEEK_V2_LITE
    workload = synthetic_workload(shape, throughput=1.0)
    replicated = LayerPlan(tuple(FunctionPlan((e,), 1024, replicas=1) for e in range(64)), 1, "direct")
    evaluation = evaluate_plan(DeploymentPlan((replicated,) * shape.num_layers), workload)
    assert evaluation.concurrency == 64 * 26
    assert any("concurrency" in violation for violation in evaluation.violations)
    unthrottled = 256 / max(evaluation.layer_seconds)
    assert evaluation.throughput_tokens_per_s == pytest.approx(unthrottled * 1000 / (64 * 26))


def test_plans_must_cover_each_expert_once():
    shape = reference_shape()
    with pytest.raises(ValueError, match="more than one function"):
        LayerPlan((FunctionPlan((0, 1), 512), FunctionPlan((1,), 512)), 1, "direct")
    partial = LayerPlan((FunctionPlan((0, 1), 512),), 1, "direct")
    with pytest.raises(ValueError, match="once each"):
        evaluate_plan(DeploymentPlan((partial,) * shape.num_layers), synthetic_workload(shape))
    with pytest.raises(ValueError, match="channel"):
        LayerPlan((FunctionPlan((0,), 512),), 1, "carrier pigeon")


def test_workload_from_the_bayesian_predictor_matches_the_trace_shape():
    shape = reference_shape()
    rng = np.random.default_rng(0)
    writer = TraceWriter(TraceMeta("synthetic", shape.num_experts, shape.top_k, "prefill", "test"))
    skew = 1.0 / np.arange(1, shape.num_experts + 1)
    for _ in range(4):
        ids = np.stack(
            [
                rng.choice(
                    shape.num_experts, (shape.num_layers, shape.top_k), replace=False, p=skew / skew.sum()
                )
                for _ in range(64)
            ]
        )
        writer.add_sequence(ids)
    predictor = BayesianPredictor(BayesianSettings(prior_strength=100.0, half_life_tokens=64.0))
    predictor.fit(writer.build(), 64)
    workload = workload_from_predictor(predictor, shape, 128, 10.0)
    np.testing.assert_allclose(workload.expected.sum(axis=1), 128 * shape.top_k, rtol=0.05)
    assert (workload.peak(0.99) >= workload.peak(0.5)).all()
    assert workload.latency_budget_s == pytest.approx(12.8)


def test_assignments_per_row_is_exact_at_the_ends_and_for_uniform_loads():
    shape = ExpertShape("uniform", 8, 8, 8, 2, 1)  # E = 8, top-2
    batch = 64
    per_expert = batch * 2 / 8
    # One expert: a token picks it at most once, so every assignment is its own row.
    assert float(assignments_per_row(shape, np.array(per_expert), batch)) == pytest.approx(1.0)
    # All experts: every token comes, with both of its choices.
    assert float(assignments_per_row(shape, np.array(8 * per_expert), batch)) == pytest.approx(2.0)
    # Four of eight, uniform: P(miss) = C(4, 2) / C(8, 2) = 6 / 28.
    hit = 1 - 6 / 28
    assert float(assignments_per_row(shape, np.array(4 * per_expert), batch)) == pytest.approx(1.0 / hit)
    assert float(assignments_per_row(shape, np.array(0.0), batch)) == 1.0


def test_rows_sent_once_per_function_and_a_half_width_wire_cut_the_modelled_bill():
    shape = reference_shape()
    workload = synthetic_workload(shape, batch_tokens=256, throughput=100.0)
    model = CostModel()

    def cost(dtype: str) -> float:
        layer = LayerPlan((FunctionPlan(tuple(range(shape.num_experts)), 1024),), 1, "direct", dtype)
        return evaluate_plan(DeploymentPlan((layer,) * shape.num_layers), workload, model).cost_per_token

    figures = [
        function_figures(
            model,
            shape,
            np.array([16]),
            np.array([512.0]),
            np.array([600.0]),
            np.array([1]),
            1,
            "direct",
            np.array([1024]),
            batch_tokens,
        )  # fmt: skip
        for batch_tokens in (None, 256)
    ]
    # All experts in one function: each token's row travels once instead of twice.
    assert figures[1].payload_bytes[0] < 0.6 * figures[0].payload_bytes[0]
    assert figures[1].duration_s[0, 0] < figures[0].duration_s[0, 0]
    assert cost("bfloat16") < cost("float16") + 1e-15 and cost("float16") < cost("float32")
    with pytest.raises(ValueError, match="wire_dtype"):
        LayerPlan((FunctionPlan((0,), 512),), 1, "direct", "int4")
