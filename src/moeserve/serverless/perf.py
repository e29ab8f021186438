"""Performance model of expert functions: compute, handler, transfer and cold-start time, in seconds.

Which figures are measured and which are modelled:

* **Measured** (by :func:`calibrate`, on this machine, one thread): the CPU time of the deployed
  handler (:mod:`handler_template`, run through the emulator worker's own request loop,
  :func:`function_worker.serve_request`) at the plan's expert shape, on a grid of invocations
  (experts touched x mean tokens per expert, the experts' loads unequal around that mean as
  routing makes them), with every expert's weights cold (a rotation of
  experts larger than the last-level cache). Two least-squares fits give four constants:
  ``experts_cpu = experts * call_overhead + tokens * flops_per_token / flops_per_second``
  (``call_overhead`` includes streaming one expert's weights, at this shape), except that an
  expert given exactly one token costs ``single_token_expert`` instead (a matrix-vector product:
  the BLAS streams the weights once without packing them, several times cheaper than the
  packed matrix-matrix path two tokens take, which a line through both cannot follow), and
  ``rest = invocation_overhead + json_bytes * payload_seconds_per_byte`` (JSON parsing and
  base64 decoding of the event, converting rows from and to the wire dtype; the direct response
  is raw bytes, not encoded). A calibration is per shape and wire dtype. Means of repeats (a
  bill sums durations, so the mean, not the median, is what it needs); the spread of the
  repeats is recorded. :func:`cached_calibration` keeps calibrations as JSON data keyed by
  device and shape, so ``serverless plan`` and ``serverless run`` use the same one.
* **Modelled**: a calibration measured at another shape (or the built-in default) scales to the
  target by FLOPs, with a weight-streaming floor at :attr:`PerfConstants.memory_bandwidth_bytes_per_s`;
  CPU share (a Lambda function with ``v`` vCPUs' share runs ``v`` times as fast as one vCPU when
  ``v < 1`` and, for the expert matmuls only, ``min(v, usable_threads)`` times as fast above it,
  scaled by ``thread_efficiency``); every network and start-up figure in :class:`PerfConstants`
  (from published measurements, cited per field, not measured here). Nothing here has run on AWS.

This module knows expert shapes, the handler's payload sizes and seconds; it knows nothing of
prices or plans.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeserve.errors import MoeserveError
from moeserve.serverless.shapes import ExpertShape

CHANNELS = ("direct", "object_store")
"""How tokens reach an expert function: in the invocation payload, or through an object store."""


class CalibrationError(MoeserveError, RuntimeError):
    """Timing the handler failed, or its timings could not be fitted."""


@dataclass(frozen=True)
class Calibration:
    """CPU time of the expert handler on one thread: measured by :func:`calibrate`, or a default.

    Contract: ``flops_per_second > 0``; ``call_overhead_s``, ``invocation_overhead_s``,
    ``payload_seconds_per_byte`` and ``spread`` >= 0 (``ValueError`` naming the field otherwise).
    """

    flops_per_second: float
    """Sustained FLOP/s of one thread on the experts' per-token work (matmuls and activation)."""
    call_overhead_s: float
    """Fixed time per expert an invocation touches (dispatch; with ``weights_streamed``, also
    reading that expert's cold weights at the ``probe`` shape)."""
    measured: bool
    """True when fitted from timings on this machine; False for the built-in default."""
    points: tuple[tuple[float, ...], ...] = ()
    """Per grid point: (experts, token-assignments, experts CPU s, rest CPU s, JSON bytes, experts
    given exactly one token), means over repeats."""
    probe: tuple[int, int] = (0, 0)
    """(D, I) of the expert that was timed."""
    invocation_overhead_s: float = 0.0
    """Fixed handler time per invocation outside the experts (event parsing, validation)."""
    payload_seconds_per_byte: float = 0.0
    """Handler time per byte of JSON it parses or writes (the event's base64 arrays; a raw-bytes
    response is not JSON), including turning rows from and to the wire dtype."""
    weights_streamed: bool = False
    """True when ``call_overhead_s`` was measured with cold weights at ``probe``: for that shape
    weight streaming is already in it, and no modelled streaming floor is added."""
    device: str = ""
    """The CPU the calibration was measured on."""
    spread: float = 0.0
    """Median over timed points of (max - min) / median of the repeats: how noisy the timings were."""
    wire_dtype: str = "float32"
    """The dtype token rows travelled in while timing (the per-byte cost includes converting them)."""
    single_token_expert_s: float = 0.0
    """Time of an expert an invocation gives exactly one token (its weights streamed once through a
    matrix-vector product), measured at ``probe``; 0 when not measured: such an expert then costs
    ``call_overhead_s`` plus one token's FLOPs like any other."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.flops_per_second) and self.flops_per_second > 0):
            raise ValueError(f"flops_per_second must be > 0, got {self.flops_per_second}")
        for name in ("call_overhead_s", "invocation_overhead_s", "payload_seconds_per_byte", "spread",
                     "single_token_expert_s"):  # fmt: skip
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")

    def covers(self, shape: ExpertShape) -> bool:
        """Whether weight streaming for ``shape`` was measured (not modelled) by this calibration."""
        return self.weights_streamed and self.probe == (shape.hidden_size, shape.intermediate_size)

    def to_dict(self) -> dict[str, object]:
        return {
            "flops_per_second": self.flops_per_second,
            "call_overhead_s": self.call_overhead_s,
            "invocation_overhead_s": self.invocation_overhead_s,
            "payload_seconds_per_byte": self.payload_seconds_per_byte,
            "measured": self.measured,
            "weights_streamed": self.weights_streamed,
            "device": self.device,
            "spread": self.spread,
            "points": [list(point) for point in self.points],
            "probe_hidden_intermediate": list(self.probe),
            "wire_dtype": self.wire_dtype,
            "single_token_expert_s": self.single_token_expert_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; fields it lacks (older files) take their defaults."""
        try:
            probe = data.get("probe_hidden_intermediate", (0, 0))
            return cls(
                flops_per_second=float(data["flops_per_second"]),
                call_overhead_s=float(data["call_overhead_s"]),
                measured=bool(data["measured"]),
                points=tuple(tuple(float(v) for v in point) for point in data.get("points", ())),
                probe=(int(probe[0]), int(probe[1])),
                invocation_overhead_s=float(data.get("invocation_overhead_s", 0.0)),
                payload_seconds_per_byte=float(data.get("payload_seconds_per_byte", 0.0)),
                weights_streamed=bool(data.get("weights_streamed", False)),
                device=str(data.get("device", "")),
                spread=float(data.get("spread", 0.0)),
                wire_dtype=str(data.get("wire_dtype", "float32")),
                single_token_expert_s=float(data.get("single_token_expert_s", 0.0)),
            )
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"malformed calibration: {error!r}") from error


DEFAULT_CALIBRATION = Calibration(
    flops_per_second=40e9,
    call_overhead_s=30e-6,
    measured=False,
    invocation_overhead_s=100e-6,
    payload_seconds_per_byte=8e-9,
)
"""Modelled stand-in for tests and when not calibrated: one AVX2/AVX-512 core at float32 (about
40 GFLOP/s), numpy dispatch per expert, and CPython's JSON + base64 at about 8 ns per payload
byte (the order :func:`calibrate` measures on x86 servers)."""


@dataclass(frozen=True)
class PerfConstants:
    """Network, storage and start-up constants of the model (all modelled, not measured here).

    Contract: every field > 0 except ``thread_efficiency`` in (0, 1].
    """

    usable_threads: int = 6
    """Threads a function's torch can use: Lambda shows up to 6 vCPUs (Lambda docs, memory page)."""
    thread_efficiency: float = 0.85
    """Parallel efficiency per extra thread on expert matmuls (assumption: typical GEMM scaling)."""
    memory_bandwidth_bytes_per_s: float = 8e9
    """Weight-streaming floor per vCPU share, bytes/s (assumption: one core's DRAM bandwidth)."""
    direct_bandwidth_bytes_per_s: float = 60e6
    """Invoke-payload throughput, bytes/s (assumption from published Lambda invoke measurements,
    tens of MB/s; e.g. Jonas et al., "Occupy the Cloud", SoCC 2017, and LambdaML, SIGMOD 2021)."""
    direct_latency_s: float = 0.012
    """Per-request latency of a warm synchronous Invoke (assumption: 10-20 ms reported widely)."""
    object_store_bandwidth_bytes_per_s: float = 80e6
    """S3 single-stream throughput from Lambda, bytes/s (LambdaML, SIGMOD 2021: ~65-100 MB/s)."""
    object_store_put_latency_s: float = 0.030
    """S3 PUT first-byte latency (LambdaML / Pocket, OSDI 2018: 20-40 ms)."""
    object_store_get_latency_s: float = 0.020
    """S3 GET first-byte latency (same sources: 10-30 ms)."""
    process_start_s: float = 1.2
    """Cold start of a Python runtime importing torch (assumption: Lambda container INIT, ~1 s)."""
    weight_load_bandwidth_bytes_per_s: float = 90e6
    """Weights read from S3 / container image on cold start, bytes/s (as object_store_bandwidth)."""
    runtime_overhead_mb: int = 350
    """Resident memory of the Python + torch runtime before weights (assumption: measured RSS of
    ``import torch`` is 250-400 MB)."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name == "thread_efficiency":
                if not 0.0 < value <= 1.0:
                    raise ValueError(f"thread_efficiency must be in (0, 1], got {value}")
            elif not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")

    def to_dict(self) -> dict[str, float]:
        return {name: float(value) for name, value in vars(self).items()}


def speedup(vcpus: np.ndarray | float, constants: PerfConstants) -> np.ndarray:
    """Speed relative to one full vCPU for a CPU share of ``vcpus`` (float or float [M]).

    Below 1 the share throttles proportionally; above 1, ``1 + (min(v, threads) - 1) * efficiency``.
    """
    share = np.asarray(vcpus, dtype=np.float64)
    above = 1.0 + (np.minimum(share, constants.usable_threads) - 1.0) * constants.thread_efficiency
    return np.where(share < 1.0, share, above)


def compute_seconds(
    shape: ExpertShape,
    tokens: np.ndarray | float,
    experts: np.ndarray | float,
    vcpus: np.ndarray | float,
    calibration: Calibration = DEFAULT_CALIBRATION,
    constants: PerfConstants | None = None,
    single_token_experts: np.ndarray | float | None = None,
) -> np.ndarray:
    """Seconds for ``experts`` experts of ``shape`` to process ``tokens`` token-assignments in total.

    Broadcasts over its array arguments. Time is ``experts * call_overhead`` plus the FLOP time,
    divided by :func:`speedup`. Of the experts, ``single_token_experts`` (default none; at most
    ``experts`` and ``tokens``) get exactly one token: when the calibration measured that case
    at this shape (``single_token_expert_s``, :meth:`Calibration.covers`), each of them costs
    it instead of ``call_overhead`` and its token's FLOPs. When the calibration did not measure
    this shape's weight streaming, the FLOP time is raised to the modelled floor of reading the
    ``experts`` experts' weights once. Zero tokens cost nothing.
    """
    constants = constants or PerfConstants()
    tokens = np.asarray(tokens, dtype=np.float64)
    experts = np.asarray(experts, dtype=np.float64)
    rate = speedup(vcpus, constants)
    single_cost = calibration.single_token_expert_s
    if single_token_experts is None or single_cost <= 0 or not calibration.covers(shape):
        singles = np.zeros_like(experts)
    else:
        singles = np.clip(
            np.asarray(single_token_experts, dtype=np.float64), 0.0, np.minimum(experts, tokens)
        )
    flop_time = (tokens - singles) * shape.flops_per_token / calibration.flops_per_second
    if not calibration.covers(shape):
        stream_time = experts * shape.expert_bytes / constants.memory_bandwidth_bytes_per_s
        flop_time = np.maximum(flop_time, stream_time)
    busy = (experts - singles) * calibration.call_overhead_s + flop_time + singles * single_cost
    return np.where(tokens > 0, busy / rate, 0.0)


def expected_single_token_experts(tokens: np.ndarray | float, group: np.ndarray | float) -> np.ndarray:
    """Expected number of a ``group`` of experts that get exactly one of ``tokens`` token-assignments
    spread uniformly over them: ``tokens * (1 - 1/group) ** (tokens - 1)`` (at most ``tokens``)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    group = np.asarray(group, dtype=np.float64)
    miss = np.where(group > 0, 1.0 - 1.0 / np.maximum(group, 1.0), 0.0)
    return np.minimum(tokens * miss ** np.maximum(tokens - 1.0, 0.0), tokens)


_EVENT_JSON_BYTES = 160
"""JSON around the arrays of an event (keys, counts, dtype), bytes; approximate."""
_ASSIGNMENT_BYTES = 12
"""Per token-assignment in an event: row index, expert id, routing weight (int32, int32, float32)."""


@dataclass(frozen=True)
class HandlerPayload:
    """Bytes of one invocation (arrays broadcast like the token counts), by how the handler treats them."""

    request_json: np.ndarray
    """The event: JSON the handler parses (base64 arrays, 4/3 of their raw size)."""
    response_json: np.ndarray
    """The response's JSON bytes (object store; a direct response is raw bytes, not JSON)."""
    raw_in: np.ndarray
    """Raw rows read outside the event (the object-store input object)."""
    raw_out: np.ndarray
    """Raw output rows: the direct response, or the object-store output object."""

    @property
    def json_bytes(self) -> np.ndarray:
        """What the calibration's per-byte cost applies to."""
        return self.request_json + self.response_json

    @property
    def invoke_request(self) -> np.ndarray:
        """Bytes of the Invoke request (what the synchronous limit applies to)."""
        return self.request_json

    @property
    def invoke_response(self) -> np.ndarray:
        return np.where(self.response_json > 0, self.response_json, self.raw_out)


def handler_payload(
    shape: ExpertShape,
    assignments: np.ndarray | float,
    rows: np.ndarray | float,
    channel: str,
    wire_dtype: str = "float32",
) -> HandlerPayload:
    """Bytes of one invocation with ``assignments`` token-assignments over ``rows`` distinct token rows.

    The handler's format (:mod:`handler_template`): per assignment a row index, expert id and
    routing weight, base64 in the event; rows [T, D] in ``wire_dtype``, base64 in the event on the
    direct channel, raw in the input object on the object store; outputs [T, D] in ``wire_dtype``
    as raw bytes (the direct response is ``bytes``, which the runtime does not encode). Unknown
    channels or dtypes raise ``ValueError``.
    """
    from moeserve.serverless.handler_template import wire_bytes

    assignments = np.asarray(assignments, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)
    row_bytes = rows * shape.hidden_size * wire_bytes(wire_dtype)
    index_json = assignments * _ASSIGNMENT_BYTES * 4 / 3 + _EVENT_JSON_BYTES
    zero = np.zeros(np.broadcast(assignments, rows).shape)
    if channel == "direct":
        return HandlerPayload(index_json + row_bytes * 4 / 3 + zero, zero, zero, row_bytes + zero)
    if channel == "object_store":
        return HandlerPayload(
            index_json + zero, zero + _EVENT_JSON_BYTES / 2, row_bytes + zero, row_bytes + zero
        )
    raise ValueError(f"unknown channel {channel!r}; known: {', '.join(CHANNELS)}")


def handler_overhead_seconds(
    payload_bytes: np.ndarray | float,
    vcpus: np.ndarray | float,
    calibration: Calibration = DEFAULT_CALIBRATION,
) -> np.ndarray:
    """Handler seconds outside the experts for one invocation with ``payload_bytes`` of JSON (:attr:`HandlerPayload.json_bytes`).

    ``invocation_overhead + bytes * payload_seconds_per_byte``, at the CPU share when below one
    vCPU; JSON and base64 run on one thread, so more vCPUs do not speed them up.
    """
    payload = np.asarray(payload_bytes, dtype=np.float64)
    share = np.minimum(np.asarray(vcpus, dtype=np.float64), 1.0)
    return (calibration.invocation_overhead_s + payload * calibration.payload_seconds_per_byte) / share


def transfer_seconds(
    payload_bytes: np.ndarray | float, channel: str, constants: PerfConstants | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sender side, receiver side) seconds to move ``payload_bytes`` one way over ``channel``.

    ``direct``: the invocation payload; the sender pays ``latency + bytes / bandwidth`` and the
    receiver nothing (the payload arrives before the handler starts, so it is not billed).
    ``object_store``: the sender PUTs (``put latency + bytes / bandwidth``) and the receiver
    GETs (``get latency + bytes / bandwidth``); an expert function pays its GET and PUT inside
    its billed duration. Unknown channels raise ``ValueError``.
    """
    constants = constants or PerfConstants()
    payload = np.asarray(payload_bytes, dtype=np.float64)
    if channel == "direct":
        send = constants.direct_latency_s + payload / constants.direct_bandwidth_bytes_per_s
        return send, np.zeros_like(payload)
    if channel == "object_store":
        wire = payload / constants.object_store_bandwidth_bytes_per_s
        return constants.object_store_put_latency_s + wire, constants.object_store_get_latency_s + wire
    raise ValueError(f"unknown channel {channel!r}; known: {', '.join(CHANNELS)}")


def cold_start_seconds(weight_bytes: float, constants: PerfConstants | None = None) -> float:
    """Seconds from a cold invocation to ready: process start plus weights at the load bandwidth."""
    constants = constants or PerfConstants()
    return constants.process_start_s + weight_bytes / constants.weight_load_bandwidth_bytes_per_s


def device_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else the machine architecture: the key calibrations are kept under."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def _last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (sysfs), or 32 MiB when unknown."""
    largest = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest or 32 << 20


def fit_nonnegative(design: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Least squares of ``design @ coefficients = seconds`` in relative error, coefficients >= 0.

    Each row is scaled by 1 / its size so small invocations weigh as much as large ones: first by
    the measurement, then by the first fit's prediction (scaling by noisy measurements alone
    biases the fit low). A coefficient that comes out negative (noise, near-collinear columns)
    is fixed at 0 and the rest refitted.
    """
    size = np.maximum(seconds, 1e-12)
    coefficients = np.zeros(design.shape[1])
    for _ in range(2):
        scale = 1.0 / size
        active = list(range(design.shape[1]))
        coefficients = np.zeros(design.shape[1])
        while active:
            solution, *_ = np.linalg.lstsq(design[:, active] * scale[:, None], seconds * scale, rcond=None)
            if (solution >= 0).all():
                coefficients[active] = solution
                break
            active.pop(int(np.argmin(solution)))
        predicted = design @ coefficients
        if not (predicted > 0).all():
            break
        size = predicted
    return coefficients


def calibrate(
    shape: ExpertShape,
    experts_touched: Sequence[int] = (1, 4, 16),
    tokens_per_expert: Sequence[int] = (1, 8, 32),
    repeats: int = 7,
    max_pool_bytes: int = 1 << 30,
    seed: int = 0,
    wire_dtype: str = "float32",
    idle_s: float = 0.0,
) -> Calibration:
    """Time the deployed handler at ``shape`` on one thread and fit the :class:`Calibration` constants.

    Steps: 1. random float32 experts of ``shape``, a pool of at least twice the last-level cache
    (at most ``max_pool_bytes``, at least ``max(experts_touched)`` experts), used in rotation so
    every invocation reads cold weights, as a function instance does between invocations on a
    shared host; 2. in a worker process with one BLAS thread, as the emulator starts them
    (``python -m moeserve.serverless.function_worker --calibrate``,
    :func:`function_worker.measure_handler`), for every (experts, mean tokens per expert) pair a
    direct-channel event as the gate sends it, the experts' loads spread around the mean
    (:func:`function_worker.expert_loads`: the matmuls' row counts take every value, as routed
    loads do; equal loads at round numbers would time only the BLAS kernel's fastest case),
    each after ``idle_s`` seconds asleep (default 0: back to back). An instance idles between
    invocations, and on this host an invocation after an idle spell takes more CPU time than one
    straight after another (DeepSeek shape, measured: about +4% after 50 ms, +8-10% after
    0.2-0.5 s, 1.1-1.9x for the first after 10 s); how long it idles depends on the plan's
    cadence, which a calibration per shape does not know, so the default times the busy case
    (docs/benchmarks.md, "Local emulator"). Served by the worker's request loop
    (:func:`function_worker.serve_request`: JSON parse, ``handler_template.handle``, JSON
    encode), recording the thread's CPU time and the expert part of it; 3. the pairs in
    round-robin, ``repeats`` times after a warm-up round, means per pair (a bill sums
    durations); 4. the two fits in
    the module docstring (relative least squares, coefficients >= 0). :class:`CalibrationError`
    if the worker fails or no per-token cost can be fitted.
    """
    from moeserve.serverless import function_worker

    if len(experts_touched) < 2 or min(experts_touched) < 1:
        raise ValueError(f"need at least two expert counts >= 1, got {tuple(experts_touched)}")
    if not tokens_per_expert or min(tokens_per_expert) < 1:
        raise ValueError(f"need token counts >= 1, got {tuple(tokens_per_expert)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not (math.isfinite(idle_s) and idle_s >= 0):
        raise ValueError(f"idle_s must be >= 0, got {idle_s}")
    hidden, intermediate = shape.hidden_size, shape.intermediate_size
    float32_expert_bytes = 3 * hidden * intermediate * 4  # the handler computes in float32
    most = max(experts_touched)
    pool = max(most, min(math.ceil(2 * _last_level_cache_bytes() / float32_expert_bytes),
                         max_pool_bytes // float32_expert_bytes))  # fmt: skip
    pairs = [[n, t] for n in experts_touched for t in tokens_per_expert]
    spec = {
        "hidden": hidden,
        "intermediate": intermediate,
        "pool": pool,
        "flush_bytes": 2 * _last_level_cache_bytes(),
        "pairs": pairs,
        "repeats": repeats,
        "seed": seed,
        "dtype": wire_dtype,
        "idle_s": idle_s,
    }  # fmt: skip
    completed = subprocess.run(
        [sys.executable, "-m", "moeserve.serverless.function_worker", "--calibrate"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env={**os.environ, **function_worker.ONE_THREAD_ENVIRONMENT},
        check=False,
    )
    if completed.returncode != 0:
        raise CalibrationError(f"calibrating the handler failed: {completed.stderr.strip()[-600:]}")
    samples: dict[tuple[int, int], list[list[float]]] = {}  # by (experts, mean tokens per expert)
    points = []
    spreads = []
    for index, row in enumerate(json.loads(completed.stdout)):
        samples.setdefault((int(row[0]), int(pairs[index % len(pairs)][1])), []).append(row)
    for rows in samples.values():
        table = np.array(rows, dtype=np.float64)  # [repeats, 5]
        totals = table[:, 2] + table[:, 3]
        spreads.append(float((totals.max() - totals.min()) / max(np.median(totals), 1e-12)))
        points.append(tuple(float(value) for value in table.mean(axis=0)))  # means: a bill sums durations
    data = np.array(points)  # [P, 6]
    per_expert, per_single, per_flop = fit_expert_seconds(
        data[:, 0], data[:, 1], data[:, 5], data[:, 2], shape
    )
    if per_flop <= 0:
        raise CalibrationError("calibration found no per-token cost; the timings are too noisy to fit")
    per_invocation, per_byte = fit_nonnegative(np.stack([np.ones(len(data)), data[:, 4]], axis=1), data[:, 3])
    return Calibration(
        flops_per_second=float(1.0 / per_flop),
        call_overhead_s=float(per_expert),
        measured=True,
        points=tuple(tuple(point) for point in points),
        probe=(hidden, intermediate),
        invocation_overhead_s=float(per_invocation),
        payload_seconds_per_byte=float(per_byte),
        weights_streamed=True,
        device=device_name(),
        spread=float(np.median(spreads)),
        wire_dtype=wire_dtype,
        single_token_expert_s=float(per_single),
    )


def fit_expert_seconds(
    experts: np.ndarray, tokens: np.ndarray, singles: np.ndarray, seconds: np.ndarray, shape: ExpertShape
) -> tuple[float, float, float]:
    """(per expert s, per single-token expert s, per FLOP s) fitted to invocations' expert CPU ``seconds``.

    ``experts``, ``tokens`` (token-assignments), ``singles`` (experts given exactly one token),
    ``seconds``: float [P]. The form of :func:`compute_seconds`: ``(experts - singles) *
    per_expert + singles * per_single + (tokens - singles) * flops_per_token * per_flop``, by
    :func:`fit_nonnegative`. Without single-token experts in the data, or when the other
    invocations leave no per-FLOP cost (too few or too noisy to separate it from the per-expert
    one), one line through all invocations as before (``per_single`` 0: not measured).
    """
    if (singles > 0).any():
        columns = [experts - singles, singles, (tokens - singles) * shape.flops_per_token]
        per_expert, per_single, per_flop = fit_nonnegative(np.stack(columns, axis=1), seconds)
        if per_flop > 0:
            return float(per_expert), float(per_single), float(per_flop)
    per_expert, per_flop = fit_nonnegative(
        np.stack([experts, tokens * shape.flops_per_token], axis=1), seconds
    )
    return float(per_expert), 0.0, float(per_flop)


CALIBRATION_FORMAT = "moeserve-serverless-calibration/1"
DEFAULT_CALIBRATION_PATH = Path("runs") / "serverless" / "calibration.json"
"""Where ``serverless plan`` and ``serverless run`` keep calibrations by default (relative to the
working directory; ``runs/`` is scratch)."""


HANDLER_FORMAT = 3
"""Version of the handler a calibration was timed on (2: rows sent once per function, outputs
combined in the function and returned as raw bytes; 3: weights held input-major with gate and
up fused, one contiguous matrix each); part of the key, so a calibration of another handler is
never used for this one."""


CALIBRATION_METHOD = 2
"""Version of how :func:`calibrate` times the handler (2: experts' loads unequal around the grid's
mean, means of repeats, single-token experts fitted apart; 1: equal loads at the grid's values,
medians, one line through all); part of the key, so a
calibration timed the older way is measured again rather than reused."""


def shape_key(shape: ExpertShape, wire_dtype: str = "float32") -> str:
    """The key of a calibration in a file: the handler's cost depends on D, I, the wire dtype and its
    format; the key also names the calibration method."""
    return (
        f"D{shape.hidden_size}-I{shape.intermediate_size}-{wire_dtype}-handler{HANDLER_FORMAT}"
        f"-method{CALIBRATION_METHOD}"
    )


def load_calibration(
    path: str | Path, shape: ExpertShape, device: str | None = None, wire_dtype: str = "float32"
) -> Calibration | None:
    """The calibration for ``shape`` and ``wire_dtype`` on ``device`` (default: this one) in the file at ``path``; None if absent.

    ``ValueError`` for a file that is not a calibration file.
    """
    path = Path(path)
    if not path.exists():
        return None
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or document.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{path} is not a {CALIBRATION_FORMAT} file")
    entry = document.get("devices", {}).get(device or device_name(), {}).get(shape_key(shape, wire_dtype))
    return None if entry is None else Calibration.from_dict(entry)


def save_calibration(path: str | Path, shape: ExpertShape, calibration: Calibration) -> Path:
    """Add (or replace) ``calibration`` for ``shape`` (and its wire dtype) under its device in the file at ``path``; returns it.

    The file: ``{"format", "devices": {device: {shape_key: Calibration.to_dict()}}}``.
    """
    path = Path(path)
    document: dict[str, Any] = {"format": CALIBRATION_FORMAT, "devices": {}}
    if path.exists():
        existing = json.loads(path.read_text())
        if isinstance(existing, dict) and existing.get("format") == CALIBRATION_FORMAT:
            document = existing
    device = calibration.device or device_name()
    key = shape_key(shape, calibration.wire_dtype)
    document.setdefault("devices", {}).setdefault(device, {})[key] = calibration.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def cached_calibration(
    shape: ExpertShape,
    path: str | Path = DEFAULT_CALIBRATION_PATH,
    recalibrate: bool = False,
    wire_dtype: str = "float32",
) -> Calibration:
    """The calibration for ``shape`` and ``wire_dtype`` on this device from ``path``; measured (:func:`calibrate`) and saved if absent.

    ``recalibrate`` measures again and replaces the stored one.
    """
    if not recalibrate:
        stored = load_calibration(path, shape, wire_dtype=wire_dtype)
        if stored is not None:
            return stored
    calibration = calibrate(shape, wire_dtype=wire_dtype)
    save_calibration(path, shape, calibration)
    return calibration
