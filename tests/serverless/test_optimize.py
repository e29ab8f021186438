"""The deployment optimiser against exhaustive search, the baselines, and plan_deployment end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moeserve.predict.popularity import BayesianPredictor, BayesianSettings
from moeserve.serverless.baselines import cpu_cluster_baseline, lambdaml_baseline
from moeserve.serverless.optimize import (
    GROUPINGS,
    SearchSpace,
    default_space,
    epsilon_greedy_search,
    exhaustive_search,
    plan_deployment,
)
from moeserve.serverless.perf import CHANNELS
from moeserve.serverless.plan import CostModel, DeploymentPlan, FunctionPlan, LayerPlan, evaluate_plan
from moeserve.serverless.shapes import DEEPSEEK_V2_LITE, ExpertShape, reference_shape
from moeserve.traces.format import TraceMeta, TraceWriter
from tests.serverless.test_plan import synthetic_workload

SMALL = ExpertShape("small", 1024, 1408, 16, 2, 1)
SMALL_SPACE = SearchSpace(
    (1, 2, 4, 8, 16), GROUPINGS, (1, 2, 4, 8), CHANNELS, (32.0, 64.0, 128.0, 1024.0), (0.9, 0.99), 128
)
"""640 points: more than three times the optimiser's 200 trials."""


@pytest.fixture(scope="module")
def small_instance():
    workload = synthetic_workload(
        SMALL, batch_tokens=512, throughput=10_000.0
    )  # a tight target: most points fail
    return workload, exhaustive_search(workload, CostModel(), SMALL_SPACE)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_epsilon_greedy_is_within_two_percent_of_the_exhaustive_optimum(small_instance, seed):
    workload, exhaustive = small_instance
    assert len(exhaustive.trials) == SMALL_SPACE.size == 640
    assert exhaustive.evaluation.feasible
    assert sum(trial.feasible for trial in exhaustive.trials) < SMALL_SPACE.size / 2
    found = epsilon_greedy_search(workload, CostModel(), SMALL_SPACE, trials=200, seed=seed)
    assert len(found.trials) <= 200
    assert len({tuple(sorted(trial.point.items())) for trial in found.trials}) == len(found.trials)
    assert found.evaluation.feasible
    assert found.evaluation.cost_per_token <= 1.02 * exhaustive.evaluation.cost_per_token
    assert found.plan.found_by.startswith("epsilon-greedy: trial ")
    assert found.best.how in {"init", "explore"} or found.best.how.startswith("exploit ")


def test_memory_is_the_exact_optimum_per_function(small_instance):
    workload, exhaustive = small_instance
    plan, best = exhaustive.plan, exhaustive.evaluation
    layer = plan.layers[0]
    for index, function in enumerate(layer.functions):
        for memory in range(128, 10241, 128):
            functions = list(layer.functions)
            functions[index] = dataclasses.replace(function, memory_mb=memory)
            changed = DeploymentPlan((dataclasses.replace(layer, functions=tuple(functions)),))
            evaluation = evaluate_plan(changed, workload)
            if evaluation.feasible:
                assert evaluation.cost_per_token >= best.cost_per_token * (1 - 1e-9)


def test_search_space_validation():
    with pytest.raises(ValueError, match="empty"):
        dataclasses.replace(SMALL_SPACE, channels=())
    with pytest.raises(ValueError, match="unknown channels"):
        dataclasses.replace(SMALL_SPACE, channels=("fax",))
    space = default_space(synthetic_workload(DEEPSEEK_V2_LITE))
    assert space.group_sizes[0] == 1 and space.group_sizes[-1] == 64


def test_lambdaml_baseline_is_one_uniform_function_per_expert_through_the_object_store():
    workload = synthetic_workload(reference_shape(), throughput=100.0)
    plan, evaluation = lambdaml_baseline(workload)
    for layer in plan.layers:
        assert layer.channel == "object_store" and layer.micro_batches == 1
        assert [f.experts for f in layer.functions] == [(e,) for e in range(16)]
        assert {f.memory_mb for f in layer.functions} == {plan.layers[0].functions[0].memory_mb}
        assert {f.replicas for f in layer.functions} == {1}
    assert evaluation.feasible, evaluation.violations


def test_cpu_cluster_holds_every_expert_and_is_billed_per_hour():
    workload = synthetic_workload(DEEPSEEK_V2_LITE, throughput=20.0)
    model = CostModel()
    cluster = cpu_cluster_baseline(workload, model)
    instance = model.prices.instance(cluster.instance)
    assert cluster.count * instance.memory_gib >= cluster.weights_gib
    assert cluster.count * instance.vcpus >= cluster.vcpus_needed
    assert cluster.cost_per_token == pytest.approx(cluster.count * instance.price_per_hour / 3600 / 20.0)
    assert 0 < cluster.utilisation <= 1


def _skewed_trace(shape: ExpertShape, sequences: int = 4, tokens: int = 64):
    rng = np.random.default_rng(1)
    skew = 1.0 / np.arange(1, shape.num_experts + 1) ** 1.2
    writer = TraceWriter(TraceMeta("synthetic", shape.num_experts, shape.top_k, "prefill", "test"))
    for _ in range(sequences):
        rows = [
            np.stack(
                [
                    rng.choice(shape.num_experts, shape.top_k, replace=False, p=skew / skew.sum())
                    for _ in range(shape.num_layers)
                ]
            )
            for _ in range(tokens)
        ]
        writer.add_sequence(np.stack(rows))
    return writer.build()


def test_plan_deployment_reports_the_plan_the_baselines_and_the_savings():
    shape = reference_shape()
    report = plan_deployment(
        _skewed_trace(shape),
        shape,
        throughput_tokens_per_s=500.0,
        predictor=BayesianPredictor(BayesianSettings(prior_strength=100.0, half_life_tokens=64.0)),
        trials=40,
        max_throughput_loss_vs_lambdaml=0.1,
    )
    record = json.loads(json.dumps(report.to_dict()))
    assert record["modelled"] is True
    plan_cost = record["plan"]["evaluation"]["cost_per_token_usd"]
    assert record["saving_vs_cpu_cluster"] == pytest.approx(
        1 - plan_cost / record["cpu_cluster"]["cost_per_token_usd"]
    )
    assert record["saving_vs_lambdaml"] == pytest.approx(
        1 - plan_cost / record["lambdaml"]["cost_per_token_usd"]
    )
    assert record["throughput_loss_vs_lambdaml"] <= 0.1 + 1e-9
    assert record["plan"]["evaluation"]["feasible"]
    assert record["plan"]["trials"] <= 40
    assert len(record["plan"]["plan"]["layers"]) == shape.num_layers
    with pytest.raises(ValueError, match="max_throughput_loss"):
        plan_deployment(
            _skewed_trace(shape, 2, 8),
            shape,
            10.0,
            trials=1,
            max_throughput_loss_vs_lambdaml=1.5,
            predictor=BayesianPredictor(BayesianSettings(prior_strength=100.0, half_life_tokens=64.0)),
        )


def test_a_plan_of_one_function_per_layer_evaluates_the_same_as_the_optimiser_reports():
    shape = reference_shape()
    workload = synthetic_workload(shape)
    found = epsilon_greedy_search(workload, trials=20, seed=3)
    again = evaluate_plan(found.plan, workload)
    assert again.cost_per_token == pytest.approx(found.evaluation.cost_per_token)
    single = DeploymentPlan((LayerPlan((FunctionPlan(tuple(range(16)), 1024),), 1, "direct"),) * 4)
    assert evaluate_plan(single, workload).feasible


def test_an_expert_larger_than_the_largest_function_is_refused_with_the_numbers():
    huge = ExpertShape("huge", 16384, 65536, 64, 6, 2)  # 12,288 MB of float32 weights per expert
    with pytest.raises(ValueError, match=r"one expert of huge needs 12,\d{3} MB .* above Lambda's 10,240 MB maximum"):
        plan_deployment(_skewed_trace(huge, 2, 16), huge, throughput_tokens_per_s=1.0, trials=5)


def test_cli_plan_for_an_unreachable_throughput_prints_the_best_plan_then_fails_naming_it(tmp_path):
    from typer.testing import CliRunner

    from moeserve.cli import app
    from moeserve.traces.format import save_trace

    trace_path = save_trace(_skewed_trace(reference_shape(), 2, 32), tmp_path / "trace.npz")
    result = CliRunner().invoke(
        app,
        ["serverless", "plan", "--trace", str(trace_path), "--throughput", "1e12", "--no-calibrate", "--trials", "10",
         "--json"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert json.loads(result.stdout.splitlines()[0])["plan"]["evaluation"]["feasible"] is False
    assert "no feasible plan for this target" in result.output and "below the 1e+12 target" in result.output


def test_cli_plan_takes_a_checkpoint_folder_for_its_expert_shape(tmp_path):
    from typer.testing import CliRunner

    from moeserve.cli import app
    from moeserve.models.loader import REFERENCE_MODEL
    from moeserve.traces.format import save_trace

    trace_path = save_trace(_skewed_trace(reference_shape(), 2, 32), tmp_path / "trace.npz")
    args = ["serverless", "plan", str(REFERENCE_MODEL), "--trace", str(trace_path), "--throughput", "100",
            "--no-calibrate", "--trials", "10", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    shape = json.loads(result.stdout)["shape"]
    expected = reference_shape()
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_experts"], shape["top_k"], shape["num_layers"]) == (
        expected.hidden_size, expected.intermediate_size, expected.num_experts, expected.top_k, expected.num_layers
    )  # fmt: skip
    both = CliRunner().invoke(app, args[:2] + [str(REFERENCE_MODEL), "--shape", "tiny-moe"] + args[3:])
    assert both.exit_code == 2 and "not both" in both.output
