"""Exporting a plan as a SAM application: plan files, the template (checked by cfn-lint) and the handler."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from moeserve.predict.popularity import BayesianPredictor, BayesianSettings
from moeserve.serverless import handler_template as ht
from moeserve.serverless.export import (
    LayerExpertWeights,
    PlanFile,
    build_template,
    export_plan,
    load_plan_json,
    save_plan_json,
    synthetic_expert_weights,
)
from moeserve.serverless.optimize import plan_deployment
from moeserve.serverless.plan import DeploymentPlan, FunctionPlan, LayerPlan
from moeserve.serverless.shapes import ExpertShape
from tests.serverless.test_optimize import _skewed_trace

TINY = ExpertShape("tiny", 8, 12, 4, 2, 2)


def two_layer_plan(channel_1: str = "object_store") -> DeploymentPlan:
    first = LayerPlan((FunctionPlan((0, 1), 512, 2), FunctionPlan((2, 3), 1024)), 1, "direct")
    second = LayerPlan((FunctionPlan((3, 0, 2, 1), 2048, 3),), 4, channel_1)
    return DeploymentPlan((first, second), found_by="test")


def cfn_lint(template: Path) -> list[str]:
    """cfn-lint's findings on ``template`` (rule id and message), via its Python API."""
    pytest.importorskip(
        "cfnlint", reason="cfn-lint is not installed (pip install cfn-lint, a dev dependency)"
    )
    from cfnlint.api import ManualArgs, lint_file

    matches = lint_file(template, config=ManualArgs(regions=["us-east-1"]))
    return [f"{m.rule.id}: {m.message}" for m in matches]


def reference_expert(weights: LayerExpertWeights, expert: int, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    gate = x @ weights.gate[expert].T.astype(np.float64)
    up = x @ weights.up[expert].T.astype(np.float64)
    return (gate / (1.0 + np.exp(-gate)) * up) @ weights.down[expert].T.astype(np.float64)


# -- plan files ----------------------------------------------------------------------------------


def test_plan_json_round_trips_and_reads_the_cli_report(tmp_path):
    plan = two_layer_plan()
    loaded = load_plan_json(save_plan_json(PlanFile(plan, TINY, "arm64"), tmp_path / "plan.json"))
    assert loaded.plan.to_dict() == plan.to_dict()
    assert loaded.shape == TINY and loaded.architecture == "arm64"
    assert load_plan_json(save_plan_json(plan, tmp_path / "bare.json")).plan == plan

    report = plan_deployment(
        _skewed_trace(TINY, 2, 16),
        TINY,
        throughput_tokens_per_s=100.0,
        batch_tokens=32,
        predictor=BayesianPredictor(BayesianSettings(prior_strength=100.0, half_life_tokens=64.0)),
        trials=5,
    )
    # What `moeserve serverless plan --json` prints: the best plan is under ["plan"]["plan"].
    (tmp_path / "report.json").write_text(json.dumps(report.to_dict()))
    from_cli = load_plan_json(tmp_path / "report.json")
    assert from_cli.plan == report.search.plan
    assert from_cli.shape == TINY and from_cli.architecture == report.model.architecture
    assert load_plan_json(save_plan_json(report, tmp_path / "saved.json")).plan == report.search.plan

    (tmp_path / "junk.json").write_text(json.dumps({"plan": {"method": "x"}}))
    with pytest.raises(ValueError, match="no plan found"):
        load_plan_json(tmp_path / "junk.json")


# -- the template --------------------------------------------------------------------------------


def test_export_writes_a_template_cfn_lint_accepts(tmp_path):
    result = export_plan(
        PlanFile(two_layer_plan(), TINY, "arm64"),
        tmp_path / "app",
        synthetic_expert_weights(TINY),
        reserve_concurrency=True,
    )
    template = json.loads(result.template.read_text())
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    functions = {
        k: v["Properties"]
        for k, v in template["Resources"].items()
        if v["Type"] == "AWS::Serverless::Function"
    }
    assert (
        list(functions)
        == list(result.function_ids)
        == ["Layer0Function0", "Layer0Function1", "Layer1Function0"]
    )
    first = functions["Layer0Function0"]
    assert first["MemorySize"] == 512 and first["Timeout"] <= 900 and first["Architectures"] == ["arm64"]
    assert first["Runtime"] == "python3.12" and first["Handler"] == "handler.lambda_handler"
    assert first["ReservedConcurrentExecutions"] == 2
    assert first["Environment"]["Variables"]["MOESERVE_EXPERTS"] == "0,1"
    assert first["Environment"]["Variables"]["MOESERVE_WEIGHTS_KEY"] == "weights/layer0/function0.npz"
    assert "MOESERVE_EXCHANGE_BUCKET" not in first["Environment"]["Variables"]
    assert functions["Layer1Function0"]["Environment"]["Variables"]["MOESERVE_EXCHANGE_BUCKET"] == {
        "Ref": "ExchangeBucket"
    }
    assert template["Resources"]["ExchangeBucket"]["Type"] == "AWS::S3::Bucket"
    assert set(template["Outputs"]) >= {f"{name}Arn" for name in functions}
    assert (result.package_dir / "handler.py").read_text() == Path(ht.__file__).read_text()
    assert "numpy" in (result.package_dir / "requirements.txt").read_text()
    assert "sam deploy --guided" in result.readme.read_text()
    assert len(result.weight_files) == 3 and all(p.is_file() for p in result.weight_files)
    assert json.loads(result.routing.read_text())["layers"][1]["micro_batches"] == 4
    assert cfn_lint(result.template) == []


def test_direct_only_bundled_export_has_no_buckets_and_lints_clean(tmp_path):
    result = export_plan(
        two_layer_plan("direct"), tmp_path / "app", synthetic_expert_weights(TINY), bundle_weights=True
    )
    template = json.loads(result.template.read_text())
    assert not [r for r in template["Resources"].values() if r["Type"] == "AWS::S3::Bucket"]
    assert not result.object_store
    variables = template["Resources"]["Layer1Function0"]["Properties"]["Environment"]["Variables"]
    assert (result.package_dir / variables["MOESERVE_WEIGHTS_PATH"]).is_file()
    assert "ReservedConcurrentExecutions" not in template["Resources"]["Layer1Function0"]["Properties"]
    assert cfn_lint(result.template) == []


def test_cfn_lint_catches_a_broken_template(tmp_path):
    template = build_template(two_layer_plan())
    template["Outputs"]["Layer0Function0Arn"]["Value"] = {"Fn::GetAtt": ["Missing", "Arn"]}
    path = tmp_path / "template.yaml"
    path.write_text(json.dumps(template))
    assert any(finding.startswith("E") and "Missing" in finding for finding in cfn_lint(path))


def test_export_rejects_what_lambda_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="timeout_s"):
        build_template(two_layer_plan(), timeout_s=901)
    huge = DeploymentPlan((LayerPlan((FunctionPlan((0,), 20_000),), 1, "direct"),))
    with pytest.raises(ValueError, match="outside Lambda"):
        build_template(huge)
    many = DeploymentPlan((LayerPlan((FunctionPlan((0,), 512, 950),), 1, "direct"),))
    with pytest.raises(ValueError, match="reserve"):
        build_template(many, reserve_concurrency=True)
    with pytest.raises(ValueError, match="layers"):
        export_plan(two_layer_plan(), tmp_path, synthetic_expert_weights(TINY)[:1])


# -- the handler ---------------------------------------------------------------------------------


def test_exported_handler_matches_a_numpy_reference(tmp_path, monkeypatch):
    weights = synthetic_expert_weights(TINY, seed=3)
    result = export_plan(two_layer_plan("direct"), tmp_path / "app", weights, bundle_weights=True)
    spec = importlib.util.spec_from_file_location("exported_handler", result.package_dir / "handler.py")
    assert spec is not None and spec.loader is not None
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    template = json.loads(result.template.read_text())
    variables = template["Resources"]["Layer0Function1"]["Properties"]["Environment"]["Variables"]
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, TINY.hidden_size)).astype(np.float32)
    rows = np.array([0, 0, 1, 2, 3, 3], dtype=np.int32)  # rows 0 and 3 go to both held experts
    experts = np.array([2, 3, 3, 2, 2, 3], dtype=np.int32)
    gate = rng.random(6).astype(np.float32)
    event = json.loads(json.dumps(handler.encode_request(x, rows, experts, gate)))
    response = handler.lambda_handler(event)
    assert isinstance(response, bytes)  # returned raw: the runtime passes bytes through unencoded
    y = handler.rows_from_wire(response, "float32", (4, TINY.hidden_size))
    expected = np.zeros_like(x)
    for row, expert, weight in zip(rows, experts, gate, strict=True):
        expected[row] += weight * reference_expert(weights[0], int(expert), x[row : row + 1])[0]
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match=r"experts \[0\] are not held"):
        handler.lambda_handler(
            handler.encode_request(x[:1], np.array([0]), np.array([0]), np.ones(1, dtype=np.float32))
        )


def one_per_row(tokens: int, expert: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assignments sending each of ``tokens`` rows to ``expert`` with weight 1."""
    return np.arange(tokens), np.full(tokens, expert), np.ones(tokens, dtype=np.float32)


def test_payloads_over_the_synchronous_limit_are_refused_clearly():
    hidden = 1024
    tokens = ht.SYNC_PAYLOAD_LIMIT_BYTES // (hidden * 4) + 1  # raw floats alone exceed 6 MB
    x = np.zeros((tokens, hidden), dtype=np.float32)
    with pytest.raises(ht.PayloadTooLargeError, match="synchronous payload limit.*object_store"):
        ht.encode_request(x, *one_per_row(tokens))
    # Small limits exercise the response check without building 6 MB arrays.
    rng = np.random.default_rng(1)
    weights = ht.ExpertWeights(
        np.array([0]),
        rng.standard_normal((1, 4, 6)).astype(np.float32),  # gate_up [n, D, 2I]
        rng.standard_normal((1, 3, 4)).astype(np.float32),  # down [n, I, D]
    )
    event = ht.encode_request(np.ones((50, 4), dtype=np.float32), *one_per_row(50))
    with pytest.raises(ht.PayloadTooLargeError, match="response of 50 tokens"):
        ht.handle(event, weights, limit=50 * 4 * 4 - 1)
    assert len(ht.handle(event, weights, limit=50 * 4 * 4)) == 50 * 4 * 4  # raw float32 bytes


def test_grouped_experts_equal_a_row_by_row_reference_and_the_object_store_path_matches_direct():
    rng = np.random.default_rng(2)
    n, intermediate, hidden = 5, 6, 4
    # The checkpoint's layout; the handler holds them transposed and fused (from_projections).
    gate_w = rng.standard_normal((n, intermediate, hidden)).astype(np.float32)
    up_w = rng.standard_normal((n, intermediate, hidden)).astype(np.float32)
    down_w = rng.standard_normal((n, hidden, intermediate)).astype(np.float32)
    weights = ht.ExpertWeights.from_projections(np.array([7, 3, 9, 1, 4]), gate_w, up_w, down_w)
    x = rng.standard_normal((40, hidden)).astype(np.float32)
    # Each row to two distinct experts, as top-2 routing inside one function.
    pairs = np.stack([rng.choice(weights.experts, 2, replace=False) for _ in range(40)])  # [40, 2]
    rows, experts = np.repeat(np.arange(40), 2), pairs.reshape(-1)
    gate = rng.random(80).astype(np.float32)
    y = ht.run_experts(weights, x, rows, experts, gate)
    for row in range(40):
        expected = np.zeros(hidden, dtype=np.float32)
        for a in (2 * row, 2 * row + 1):
            slot = weights.slot(int(experts[a]))
            h = x[row] @ gate_w[slot].T
            expected += gate[a] * ((h / (1 + np.exp(-h)) * (x[row] @ up_w[slot].T)) @ down_w[slot].T)
        np.testing.assert_allclose(y[row], expected, rtol=1e-4, atol=1e-5)

    direct = ht.handle(ht.encode_request(x, rows, experts, gate), weights)
    for dtype in ht.WIRE_DTYPES:
        store = {"in": ht.rows_to_wire(x, dtype)}
        event = {**ht.encode_assignments(x.shape, rows, experts, gate, dtype), "input_key": "in"}
        response = ht.handle_object_store(event, weights, store.__getitem__, store.__setitem__)
        assert response["output_key"] == "in.out"
        stored = ht.rows_from_wire(store["in.out"], dtype, (40, hidden))
        if dtype == "float32":
            np.testing.assert_array_equal(stored, ht.rows_from_wire(direct, dtype, (40, hidden)))
        else:  # half the bytes, rounded rows and outputs (8 or 11 significant bits)
            assert len(store["in.out"]) == len(direct) // 2
            np.testing.assert_allclose(stored, y, rtol=0.05, atol=0.05 * float(np.abs(y).max()))


def test_wire_dtypes_round_as_documented():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 8)) * 10.0 ** rng.integers(-3, 4, (64, 8))).astype(np.float32)
    exact = ht.rows_from_wire(ht.rows_to_wire(x, "float32"), "float32", x.shape)
    np.testing.assert_array_equal(exact, x)
    brain = ht.rows_from_wire(ht.rows_to_wire(x, "bfloat16"), "bfloat16", x.shape)
    np.testing.assert_allclose(brain, x, rtol=2.0**-8)  # 8 significant bits, round to nearest
    half = ht.rows_from_wire(ht.rows_to_wire(x, "float16"), "float16", x.shape)
    np.testing.assert_allclose(half, x.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="wire dtype"):
        ht.rows_to_wire(x, "int8")
    with pytest.raises(ValueError, match="expected"):
        ht.rows_from_wire(b"\0" * 6, "bfloat16", (2, 2))


def test_plan_files_keep_the_wire_dtype_and_the_template_sets_it():
    layers = two_layer_plan("direct").layers
    plan = DeploymentPlan((layers[0], LayerPlan(layers[1].functions, 4, "direct", "bfloat16")), "test")
    assert [layer.wire_dtype for layer in plan_from_saved(plan)] == ["float32", "bfloat16"]
    template = build_template(plan)
    variables = template["Resources"]["Layer1Function0"]["Properties"]["Environment"]["Variables"]
    assert variables["MOESERVE_WIRE_DTYPE"] == "bfloat16"
    assert variables["MALLOC_TRIM_THRESHOLD_"] == ht.MALLOC_ENVIRONMENT["MALLOC_TRIM_THRESHOLD_"]


def plan_from_saved(plan: DeploymentPlan) -> tuple[LayerPlan, ...]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = save_plan_json(plan, Path(folder) / "plan.json")
        return load_plan_json(path).plan.layers


def test_weights_files_round_trip_and_an_older_layout_is_refused_by_name(tmp_path):
    rng = np.random.default_rng(3)
    gate, up = rng.standard_normal((2, 3, 4), dtype=np.float32), rng.standard_normal((2, 3, 4), dtype=np.float32)
    down = rng.standard_normal((2, 4, 3), dtype=np.float32)
    weights = ht.ExpertWeights.from_projections(np.array([5, 1]), gate, up, down)
    # Input-major and fused: x @ gate_up is [x @ gate.T | x @ up.T]; x @ down_t is x @ down.T.
    x = rng.standard_normal((7, 4), dtype=np.float32)
    np.testing.assert_allclose(x @ weights.gate_up[1], np.concatenate([x @ gate[1].T, x @ up[1].T], 1), rtol=1e-5)
    np.testing.assert_allclose(x[:, :3] @ weights.down[0], x[:, :3] @ down[0].T, rtol=1e-5)
    ht.save_weights(tmp_path / "w.npz", weights)
    loaded = ht.load_weights(str(tmp_path / "w.npz"))
    assert np.array_equal(loaded.experts, [5, 1])
    assert np.array_equal(loaded.gate_up, weights.gate_up) and np.array_equal(loaded.down, weights.down)
    np.savez(tmp_path / "old.npz", experts=np.array([5, 1]), gate=gate, up=up, down=down)
    with pytest.raises(ValueError, match="older export"):
        ht.load_weights(str(tmp_path / "old.npz"))
    with pytest.raises(ValueError, match=r"gate and up must both be \[2, I, D\]"):
        ht.ExpertWeights.from_projections(np.array([5, 1]), gate, up[:, :2], down)


def test_cli_export_writes_a_checkpoints_experts_one_function_at_a_time(tmp_path):
    import torch
    from typer.testing import CliRunner

    from moeserve.cli import app
    from moeserve.memory.store import ExpertStore
    from moeserve.models.loader import REFERENCE_MODEL
    from moeserve.serverless.shapes import reference_shape

    shape = reference_shape()
    halves = (tuple(range(0, 16, 2)), tuple(range(1, 16, 2)))
    plan = DeploymentPlan(tuple(LayerPlan(tuple(FunctionPlan(h, 512) for h in halves), 1, "direct") for _ in range(4)))
    plan_path = save_plan_json(PlanFile(plan, shape), tmp_path / "plan.json")
    result = CliRunner().invoke(app, ["serverless", "export", str(plan_path), "--out", str(tmp_path / "sam"),
                                      "--model", str(REFERENCE_MODEL)])  # fmt: skip
    assert result.exit_code == 0, result.output
    store = ExpertStore(REFERENCE_MODEL)
    written = ht.load_weights(str(tmp_path / "sam" / "weights" / "layer2" / "function1.npz"))
    assert written.experts.tolist() == list(halves[1])
    expert = store.read_expert(store.layers[2], 5, torch.float32)  # slot 2 of function 1
    intermediate = shape.intermediate_size
    np.testing.assert_array_equal(written.gate_up[2][:, :intermediate], expert.gate_up[:intermediate].numpy().T)
    np.testing.assert_array_equal(written.gate_up[2][:, intermediate:], expert.gate_up[intermediate:].numpy().T)
    np.testing.assert_array_equal(written.down[2], expert.down.numpy().T)
    other = save_plan_json(PlanFile(plan, TINY), tmp_path / "other.json")
    refused = CliRunner().invoke(app, ["serverless", "export", str(other), "--out", str(tmp_path / "x"),
                                       "--model", str(REFERENCE_MODEL)])  # fmt: skip
    assert refused.exit_code == 2 and "the plan is for tiny" in refused.output
