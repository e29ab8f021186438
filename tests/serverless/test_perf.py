"""Expert shapes and the serverless performance model: CPU share, compute, transfer, cold start, calibration."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moeserve.serverless.function_worker import expert_loads
from moeserve.serverless.perf import (
    CALIBRATION_FORMAT,
    DEFAULT_CALIBRATION,
    Calibration,
    PerfConstants,
    cached_calibration,
    calibrate,
    cold_start_seconds,
    compute_seconds,
    device_name,
    expected_single_token_experts,
    fit_expert_seconds,
    handler_overhead_seconds,
    handler_payload,
    load_calibration,
    save_calibration,
    shape_key,
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


def test_calibrate_times_the_deployed_handler_and_fits_positive_constants():
    shape = reference_shape()
    calibration = calibrate(shape, experts_touched=(1, 4), tokens_per_expert=(1, 16), repeats=1, idle_s=0.01)
    assert calibration.measured and calibration.weights_streamed and calibration.covers(shape)
    assert calibration.flops_per_second > 0 and calibration.call_overhead_s >= 0
    assert calibration.payload_seconds_per_byte >= 0 and calibration.invocation_overhead_s >= 0
    assert calibration.invocation_overhead_s + calibration.payload_seconds_per_byte > 0
    # Several experts' loads sum to experts x mean tokens; a single expert's load is drawn around
    # the mean (here one repeat of 1 + [-8, 8] tokens), a decode-sized one is 1.
    experts_assignments = [(n, t) for n, t, *_ in calibration.points]
    assert experts_assignments[0] == (1, 1) and experts_assignments[2:] == [(4, 4), (4, 64)]
    assert experts_assignments[1][0] == 1 and 8 <= experts_assignments[1][1] <= 24
    assert calibration.probe == (128, 160)
    assert not calibration.covers(DEEPSEEK_V2_LITE)
    # The recorded JSON bytes are the handler's real ones, which the model's estimate follows
    # (the grid sends each row to two of the experts when it touches more than one; a row at most
    # once per expert, so at least the largest load's rows).
    # The experts given one token are counted per point: all of them at one token per expert.
    assert [point[5] for point in calibration.points][::2] == [1.0, 4.0]
    for experts, assignments, _, _, measured_bytes, _ in calibration.points:
        rows = -(-assignments // 2) if experts > 1 else assignments
        payload = handler_payload(shape, assignments, rows, "direct")
        assert float(payload.json_bytes) == pytest.approx(measured_bytes, rel=0.02, abs=100)
        assert float(payload.raw_out) == rows * 4 * shape.hidden_size  # the response: raw bytes, not JSON
    with pytest.raises(ValueError, match="two expert counts"):
        calibrate(shape, experts_touched=(8,))


def test_single_token_experts_cost_their_own_measured_time():
    shape = DEEPSEEK_V2_LITE
    calibration = Calibration(
        1e10, 4e-3, True, probe=(2048, 1408), weights_streamed=True, single_token_expert_s=1e-3
    )
    per_token = shape.flops_per_token / 1e10
    # 3 experts: one with a single token, two sharing 9 tokens.
    assert float(compute_seconds(shape, 10, 3, 1.0, calibration, single_token_experts=1)) == pytest.approx(
        1e-3 + 2 * 4e-3 + 9 * per_token
    )
    # Not given, or not measured: every expert costs the per-expert time and its tokens' FLOPs.
    assert float(compute_seconds(shape, 10, 3, 1.0, calibration)) == pytest.approx(3 * 4e-3 + 10 * per_token)
    unmeasured = dataclasses.replace(calibration, single_token_expert_s=0.0)
    assert float(compute_seconds(shape, 10, 3, 1.0, unmeasured, single_token_experts=1)) == pytest.approx(
        3 * 4e-3 + 10 * per_token
    )
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_expected_single_token_experts_matches_sampling():
    rng = np.random.default_rng(0)
    for group, tokens in [(16, 4), (16, 24), (4, 3), (1, 1), (1, 5), (64, 256)]:
        draws = rng.integers(0, group, size=(4000, tokens))
        singles = np.mean([(np.bincount(row, minlength=group) == 1).sum() for row in draws])
        assert float(expected_single_token_experts(tokens, group)) == pytest.approx(
            singles, rel=0.05, abs=0.02
        )
    assert float(expected_single_token_experts(0, 16)) == 0.0


def test_fit_expert_seconds_recovers_the_three_constants():
    shape = DEEPSEEK_V2_LITE
    experts = np.array([1, 4, 16, 1, 4, 16, 1, 4, 16], dtype=np.float64)
    tokens = experts * np.array([1, 1, 1, 8, 8, 8, 32, 32, 32])
    singles = np.where(tokens == experts, experts, 0.0)
    seconds = (
        (experts - singles) * 4e-3 + singles * 1.5e-3 + (tokens - singles) * shape.flops_per_token / 5e10
    )
    per_expert, per_single, per_flop = fit_expert_seconds(experts, tokens, singles, seconds, shape)
    assert (per_expert, per_single, 1 / per_flop) == pytest.approx((4e-3, 1.5e-3, 5e10), rel=1e-6)


@pytest.mark.parametrize(("experts", "mean"), [(1, 1), (16, 1), (1, 8), (4, 8), (5, 32), (16, 32), (2, 2)])
def test_expert_loads_are_unequal_around_the_mean_and_keep_the_total(experts, mean):
    rng = np.random.default_rng(0)
    draws = np.array([expert_loads(experts, mean, rng) for _ in range(400)])  # [400, experts]
    assert draws.shape == (400, experts) and draws.min() >= max(1, mean - mean // 2)
    assert draws.max() <= mean + mean // 2
    if experts > 1:
        assert (draws.sum(axis=1) == experts * mean).all()
    else:
        assert draws.mean() == pytest.approx(mean, rel=0.05)
    if mean >= 8:
        # Routed loads are not all multiples of the BLAS kernel's unroll: every residue occurs.
        assert set(np.unique(draws % 4)) == {0, 1, 2, 3}


def test_a_calibration_that_measured_streaming_adds_no_modelled_floor():
    shape = DEEPSEEK_V2_LITE
    measured = Calibration(1e10, 2e-3, True, probe=(2048, 1408), weights_streamed=True)
    constants = PerfConstants(memory_bandwidth_bytes_per_s=1e9)
    assert float(compute_seconds(shape, 1, 2, 1.0, measured, constants)) == pytest.approx(
        2 * 2e-3 + shape.flops_per_token / 1e10
    )
    elsewhere = Calibration(1e10, 2e-3, True, probe=(128, 160), weights_streamed=True)
    assert float(compute_seconds(shape, 1, 2, 1.0, elsewhere, constants)) == pytest.approx(
        2 * 2e-3 + 2 * shape.expert_bytes / 1e9
    )


def test_handler_overhead_is_per_invocation_and_per_byte_and_not_sped_up_by_more_vcpus():
    calibration = Calibration(1e10, 0.0, True, invocation_overhead_s=1e-4, payload_seconds_per_byte=1e-8)
    assert float(handler_overhead_seconds(1e6, 1.0, calibration)) == pytest.approx(1e-4 + 1e-2)
    assert float(handler_overhead_seconds(1e6, 0.5, calibration)) == pytest.approx(2 * (1e-4 + 1e-2))
    assert float(handler_overhead_seconds(1e6, 4.0, calibration)) == pytest.approx(1e-4 + 1e-2)
    store = handler_payload(reference_shape(), 8, 4, "object_store")
    direct = handler_payload(reference_shape(), 8, 4, "direct")
    rows_bytes = 4 * 4 * reference_shape().hidden_size
    assert float(store.raw_in) == float(store.raw_out) == rows_bytes  # the rows travel raw
    assert float(direct.json_bytes - store.request_json) == pytest.approx(rows_bytes * 4 / 3)  # base64 rows
    assert float(direct.invoke_response) == rows_bytes and float(direct.response_json) == 0
    half = handler_payload(reference_shape(), 8, 4, "direct", "bfloat16")
    assert float(half.raw_out) == rows_bytes / 2
    with pytest.raises(ValueError, match="known"):
        handler_payload(reference_shape(), 1, 1, "pigeon")
    with pytest.raises(ValueError, match="wire dtype"):
        handler_payload(reference_shape(), 1, 1, "direct", "int8")


def test_calibrations_are_cached_as_data_keyed_by_device_and_shape(tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    shape = reference_shape()
    stored = Calibration(3e10, 1e-4, True, points=((1.0, 2.0, 3.0, 4.0, 5.0),), probe=(128, 160),
                         invocation_overhead_s=2e-4, payload_seconds_per_byte=9e-9, weights_streamed=True,
                         device=device_name(), spread=0.2)  # fmt: skip
    assert load_calibration(path, shape) is None
    save_calibration(path, shape, stored)
    save_calibration(path, DEEPSEEK_V2_LITE, dataclasses.replace(stored, probe=(2048, 1408)))
    assert load_calibration(path, shape) == stored
    assert load_calibration(path, shape, device="another cpu") is None
    document = json.loads(path.read_text())
    assert document["format"] == CALIBRATION_FORMAT
    assert set(document["devices"][device_name()]) == {shape_key(shape), shape_key(DEEPSEEK_V2_LITE)}

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached calibration must not be measured again")

    monkeypatch.setattr("moeserve.serverless.perf.calibrate", no_timing)
    assert cached_calibration(shape, path) == stored
    monkeypatch.setattr(
        "moeserve.serverless.perf.calibrate",
        lambda shape, wire_dtype: dataclasses.replace(stored, spread=0.5),
    )
    assert cached_calibration(shape, path, recalibrate=True).spread == 0.5
    assert load_calibration(path, shape).spread == 0.5
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a"):
        load_calibration(path, shape)
    with pytest.raises(ValueError, match="call_overhead_s"):
        Calibration(1e10, -1.0, True)
