"""Expert shapes and the serverless performance model: CPU share, compute, transfer, cold start, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from moeserve.serverless.perf import (
    DEFAULT_CALIBRATION,
    Calibration,
    PerfConstants,
    calibrate,
    cold_start_seconds,
    compute_seconds,
    speedup,
    transfer_seconds,
)
from moeserve.serverless.shapes import (
    DEEPSEEK_V2_LITE,
    MIXTRAL_8X7B,
    ExpertShape,
    reference_shape,
    shape_by_name,
)


def test_published_shapes_have_the_expected_bytes_per_expert():
    assert DEEPSEEK_V2_LITE.expert_bytes == 3 * 2048 * 1408 * 4
    assert DEEPSEEK_V2_LITE.with_dtype(2).expert_bytes == 3 * 2048 * 1408 * 2
    assert MIXTRAL_8X7B.expert_bytes == 3 * 4096 * 14336 * 4
    assert (DEEPSEEK_V2_LITE.num_experts, DEEPSEEK_V2_LITE.top_k, DEEPSEEK_V2_LITE.num_layers) == (64, 6, 26)
    assert DEEPSEEK_V2_LITE.flops_per_token == 6 * 2048 * 1408


def test_reference_shape_is_read_from_the_embedded_config():
    shape = reference_shape()
    assert (shape.hidden_size, shape.intermediate_size, shape.num_experts, shape.top_k, shape.num_layers) == (
        128,
        160,
        16,
        2,
        4,
    )
    assert shape_by_name("tiny-moe") == shape
    assert shape_by_name("deepseek-v2-lite") is DEEPSEEK_V2_LITE
    with pytest.raises(KeyError, match="known"):
        shape_by_name("nope")


@pytest.mark.parametrize(
    "field, value", [("hidden_size", 0), ("top_k", 99), ("bytes_per_parameter", 3), ("num_layers", -1)]
)
def test_bad_shapes_raise_naming_the_field(field, value):
    arguments = {
        "name": "x",
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_experts": 4,
        "top_k": 2,
        "num_layers": 1,
    }
    arguments[field] = value
    with pytest.raises(ValueError, match=field if field != "top_k" else "top_k"):
        ExpertShape(**arguments)


def test_cpu_share_throttles_below_one_vcpu_and_caps_at_usable_threads():
    constants = PerfConstants(usable_threads=4, thread_efficiency=1.0)
    np.testing.assert_allclose(
        speedup(np.array([0.25, 0.5, 1.0, 2.0, 4.0, 5.79]), constants), [0.25, 0.5, 1, 2, 4, 4]
    )
    partial = PerfConstants(thread_efficiency=0.5)
    assert float(speedup(3.0, partial)) == pytest.approx(2.0)


def test_compute_time_scales_with_tokens_and_inversely_with_share():
    shape = DEEPSEEK_V2_LITE
    calibration = Calibration(flops_per_second=1e10, call_overhead_s=0.0, measured=False)
    constants = PerfConstants(memory_bandwidth_bytes_per_s=1e15)  # no weight-streaming floor
    one = compute_seconds(shape, 100, 1, 1.0, calibration, constants)
    assert float(one) == pytest.approx(100 * shape.flops_per_token / 1e10)
    assert float(compute_seconds(shape, 200, 1, 1.0, calibration, constants)) == pytest.approx(2 * float(one))
    assert float(compute_seconds(shape, 100, 1, 0.5, calibration, constants)) == pytest.approx(2 * float(one))
    assert float(compute_seconds(shape, 0, 1, 1.0, calibration, constants)) == 0.0


def test_few_tokens_are_bound_by_streaming_the_weights():
    constants = PerfConstants(memory_bandwidth_bytes_per_s=1e9)
    seconds = compute_seconds(DEEPSEEK_V2_LITE, 1, 2, 1.0, DEFAULT_CALIBRATION, constants)
    floor = 2 * DEEPSEEK_V2_LITE.expert_bytes / 1e9
    assert float(seconds) == pytest.approx(floor + 2 * DEFAULT_CALIBRATION.call_overhead_s)


def test_transfer_channels():
    constants = PerfConstants()
    send, receive = transfer_seconds(6e6, "direct", constants)
    assert float(send) == pytest.approx(
        constants.direct_latency_s + 6e6 / constants.direct_bandwidth_bytes_per_s
    )
    assert float(receive) == 0.0
    put, get = transfer_seconds(8e6, "object_store", constants)
    wire = 8e6 / constants.object_store_bandwidth_bytes_per_s
    assert float(put) == pytest.approx(constants.object_store_put_latency_s + wire)
    assert float(get) == pytest.approx(constants.object_store_get_latency_s + wire)
    with pytest.raises(ValueError, match="known"):
        transfer_seconds(1, "pigeon")


def test_cold_start_is_process_start_plus_weight_load():
    constants = PerfConstants(process_start_s=1.0, weight_load_bandwidth_bytes_per_s=1e8)
    assert cold_start_seconds(5e8, constants) == pytest.approx(6.0)


@pytest.mark.parametrize("field", ["thread_efficiency", "direct_latency_s", "runtime_overhead_mb"])
def test_bad_constants_raise(field):
    with pytest.raises(ValueError, match=field):
        PerfConstants(**{field: 0})


def test_calibrate_times_a_real_expert_and_fits_positive_constants():
    calibration = calibrate(reference_shape(), token_counts=(8, 64), repeats=2, max_width=64)
    assert calibration.measured
    assert calibration.flops_per_second > 0 and calibration.call_overhead_s >= 0
    assert [tokens for tokens, _ in calibration.points] == [8, 64]
    assert calibration.probe == (64, 64)
    with pytest.raises(ValueError, match="two token counts"):
        calibrate(reference_shape(), token_counts=(8,))
