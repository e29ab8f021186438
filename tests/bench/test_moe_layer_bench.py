"""``bench moe-layer``: every impl agrees with the loop reference; reported values are sound.

Tiny shapes only; assertions are on values (outputs, drop fractions, JSON fields), never timings.
"""

from __future__ import annotations

import json

import pytest
import torch

from moeserve.bench.machine import MachinePeak, machine_description, measure_machine
from moeserve.bench.moe_layer import (
    BASELINE_IMPL,
    REFERENCE_IMPL,
    BenchLayer,
    LayerShape,
    OutputMismatchError,
    bench_layer,
    build_bench_layer,
    build_impls,
    check_outputs,
    random_bench_layer,
    reference_architecture_shape,
    render_table,
    roofline_seconds,
    run_moe_layer_bench,
)
from moeserve.moe.types import RouterOutput

# D and I multiples of 8 keep bf16 rows 16-byte aligned, as torch._grouped_mm on CPU needs.
TINY = LayerShape(name="tiny", hidden_size=32, intermediate_size=48, num_experts=4, top_k=2)
FIXED_MACHINE = MachinePeak(peak_gflops=10.0, bandwidth_gbs=10.0, dtype=torch.float32)


def _capacity_skipped(impls) -> dict[str, float]:
    """Drop fractions that leave capacity impls out of the comparison (as if they dropped)."""
    return {name: 1.0 if name.startswith("moeserve-capacity") else 0.0 for name in impls}


def _skewed_layer(num_tokens: int) -> BenchLayer:
    """Every token picks experts 0 and 1: capacity C = T*k/E slots cannot hold them."""
    layer = random_bench_layer(TINY, num_tokens, torch.float32)
    topk_ids = torch.tensor([[0, 1]] * num_tokens)  # [T, k]
    topk_weights = torch.full((num_tokens, 2), 0.5)  # [T, k]
    return BenchLayer(
        shape=layer.shape,
        experts=layer.experts,
        act=layer.act,
        hidden=layer.hidden,
        routing=RouterOutput(topk_ids=topk_ids, topk_weights=topk_weights),
        weights_source=layer.weights_source,
        routing_source="skewed: every token on experts 0 and 1",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_dropless_and_hf_impls_match_loop_reference(dtype, num_tokens):
    layer = random_bench_layer(TINY, 64, dtype)
    impls = build_impls(layer)
    errors = check_outputs(impls, layer, num_tokens, _capacity_skipped(impls))
    expected = {"moeserve-dropless", REFERENCE_IMPL, "hf-eager", "hf-grouped_mm"}
    assert expected <= set(errors)
    assert errors[REFERENCE_IMPL] == 0.0


def test_capacity_impl_without_drops_matches_reference():
    layer = random_bench_layer(TINY, 16, torch.float32)
    impls = build_impls(layer)
    # With one token and factor 2.0, C = ceil(2*1*2/4) = 1 slot per expert: nothing dropped.
    errors = check_outputs(impls, layer, 1, dict.fromkeys(impls, 0.0))
    assert errors["moeserve-capacity-2.0"] < 1e-5


def test_check_outputs_raises_on_a_wrong_impl():
    layer = random_bench_layer(TINY, 8, torch.float32)
    impls = build_impls(layer)
    impls["broken"] = lambda hidden, routing: torch.zeros_like(hidden)
    with pytest.raises(OutputMismatchError, match="broken"):
        check_outputs(impls, layer, 8, _capacity_skipped(impls))


def test_capacity_drops_on_skewed_routing_dropless_does_not():
    result = bench_layer(_skewed_layer(8), [8], repeats=1, machine=FIXED_MACHINE)
    dropped = {row.impl: row.dropped_fraction for row in result.results}
    # Experts 0 and 1 get T=8 assignments each, C = ceil(1.0*8*2/4) = 4 slots: half dropped.
    assert dropped["moeserve-capacity-1.0"] == pytest.approx(0.5)
    assert dropped["moeserve-capacity-2.0"] == 0.0
    for name in ("moeserve-dropless", REFERENCE_IMPL, "hf-eager", "hf-grouped_mm"):
        assert dropped[name] == 0.0


def test_json_has_every_field_and_positive_values():
    machine = measure_machine(torch.float32, matmul_size=128, copy_bytes=1 << 20, repeats=1)
    result = run_moe_layer_bench(
        TINY, None, [1, 8], torch.float32, repeats=1, progress=False, machine=machine
    )
    data = json.loads(result.to_json_text())
    assert set(data) >= {"machine", "peak_gflops", "bandwidth_gbs", "shape", "dtype", "results"}
    assert data["dtype"] == "float32"
    assert data["shape"]["hidden_size"] == 32 and data["shape"]["num_experts"] == 4
    assert data["peak_gflops"] > 0 and data["bandwidth_gbs"] > 0
    impls = {row["impl"] for row in data["results"]}
    assert {"moeserve-dropless", "moeserve-capacity-1.25", "hf-eager", "hf-grouped_mm"} <= impls
    assert len(data["results"]) == 2 * len(impls)
    for row in data["results"]:
        assert set(row) == {
            "impl",
            "tokens",
            "tokens_per_s",
            "ms",
            "dropped_fraction",
            "roofline_fraction",
            "vs_hf_eager",
        }
        assert row["ms"] > 0 and row["tokens_per_s"] > 0
        assert row["roofline_fraction"] > 0 and row["vs_hf_eager"] > 0
        assert 0 <= row["dropped_fraction"] < 1
        if row["impl"] == BASELINE_IMPL:
            assert row["vs_hf_eager"] == 1.0
    assert render_table(result).row_count == len(data["results"])


def test_roofline_counts_useful_flops_and_touched_experts():
    shape = LayerShape(name="s", hidden_size=8, intermediate_size=16, num_experts=4, top_k=2)
    routing = RouterOutput(topk_ids=torch.tensor([[0, 1], [1, 0], [0, 1]]), topk_weights=torch.ones(3, 2))
    compute_bound = MachinePeak(peak_gflops=1e-9, bandwidth_gbs=1e9, dtype=torch.float32)
    assert roofline_seconds(shape, routing, torch.float32, compute_bound) == pytest.approx(
        2 * 3 * 2 * 3 * 8 * 16
    )
    memory_bound = MachinePeak(peak_gflops=1e9, bandwidth_gbs=1e-9, dtype=torch.float32)
    # Two distinct experts' weights (3*D*I floats each) plus input and output activations.
    expected_bytes = 2 * 3 * 8 * 16 * 4 + 2 * 3 * 8 * 4
    assert roofline_seconds(shape, routing, torch.float32, memory_bound) == pytest.approx(expected_bytes)


def test_reference_architecture_from_config_or_training_defaults(tmp_path):
    from moeserve.models.reference import ReferenceModelConfig

    defaults = ReferenceModelConfig()
    shape = reference_architecture_shape(tmp_path)  # no config.json: the training defaults
    assert (shape.hidden_size, shape.intermediate_size) == (defaults.hidden_size, defaults.intermediate_size)
    assert (shape.num_experts, shape.top_k) == (defaults.num_experts, defaults.top_k)
    config = {"hidden_size": 64, "intermediate_size": 96, "num_local_experts": 8, "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = reference_architecture_shape(tmp_path)
    assert (shape.hidden_size, shape.intermediate_size, shape.num_experts, shape.top_k) == (64, 96, 8, 2)
    assert shape.activation == "silu"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_checkpoint_layer_routing_comes_from_its_router(tmp_path, family):
    from moeserve.models.random_init import save_random_checkpoint

    folder = save_random_checkpoint(family, tmp_path / family)
    layer = build_bench_layer("reference", folder, 24, torch.float32)
    assert layer.hidden.shape == (24, layer.shape.hidden_size)
    assert layer.routing.topk_ids.shape == (24, layer.shape.top_k)
    assert int(layer.routing.topk_ids.max()) < layer.shape.num_experts
    impls = build_impls(layer)
    errors = check_outputs(impls, layer, 24, _capacity_skipped(impls))
    assert errors["hf-eager"] < 1e-4


def test_bad_shape_and_model_combinations_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown shape"):
        build_bench_layer("nope", None, 4, torch.float32)
    with pytest.raises(ValueError, match="--model"):
        build_bench_layer("mixtral", tmp_path, 4, torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        LayerShape(name="bad", hidden_size=8, intermediate_size=8, num_experts=2, top_k=3)


def test_machine_description_names_torch():
    assert torch.__version__ in machine_description()
