"""Performance model of expert functions: compute, transfer and cold-start time, in seconds.

Which figures are measured and which are modelled:

* **Measured** (by :func:`calibrate`, on this machine, one torch thread): the time of a real
  SiLU-gated expert MLP at a few token counts. To keep calibration cheap the expert is a
  *small* one (D and I capped at 512 by default); a least-squares fit of
  ``time = call_overhead + flops / flops_per_second`` gives the two measured constants.
* **Modelled**: scaling to the target shape by FLOPs (and by weight bytes against a memory
  bandwidth floor, :attr:`PerfConstants.memory_bandwidth_bytes_per_s`); CPU share (a Lambda
  function with ``v`` vCPUs' share runs ``v`` times as fast as one vCPU when ``v < 1`` and
  ``min(v, usable_threads)`` times as fast above it, scaled by ``thread_efficiency``); every
  network and start-up figure in :class:`PerfConstants` (from published measurements, cited
  per field, not measured here). Nothing here has run on AWS.

This module knows expert shapes and seconds; it knows nothing of prices or plans.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moeserve.serverless.shapes import ExpertShape

CHANNELS = ("direct", "object_store")
"""How tokens reach an expert function: in the invocation payload, or through an object store."""


@dataclass(frozen=True)
class Calibration:
    """Compute speed of one CPU thread running expert MLPs: measured by :func:`calibrate` or a default.

    Contract: ``flops_per_second > 0``, ``call_overhead_s >= 0``.
    """

    flops_per_second: float
    """Sustained FLOP/s of one thread on expert matmuls."""
    call_overhead_s: float
    """Fixed time per expert call (framework dispatch, small-matrix inefficiency)."""
    measured: bool
    """True when fitted from timings on this machine; False for the built-in default."""
    points: tuple[tuple[int, float], ...] = ()
    """(tokens, seconds) pairs that were timed, for reports."""
    probe: tuple[int, int] = (0, 0)
    """(D, I) of the expert that was timed."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.flops_per_second) and self.flops_per_second > 0):
            raise ValueError(f"flops_per_second must be > 0, got {self.flops_per_second}")
        if not (math.isfinite(self.call_overhead_s) and self.call_overhead_s >= 0):
            raise ValueError(f"call_overhead_s must be >= 0, got {self.call_overhead_s}")

    def to_dict(self) -> dict[str, object]:
        return {
            "flops_per_second": self.flops_per_second,
            "call_overhead_s": self.call_overhead_s,
            "measured": self.measured,
            "points": [list(point) for point in self.points],
            "probe_hidden_intermediate": list(self.probe),
        }


DEFAULT_CALIBRATION = Calibration(flops_per_second=40e9, call_overhead_s=30e-6, measured=False)
"""Modelled stand-in (one AVX2/AVX-512 core at float32, about 40 GFLOP/s) for tests and when not calibrated."""


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
) -> np.ndarray:
    """Seconds for ``experts`` experts of ``shape`` to process ``tokens`` token-assignments in total.

    Broadcasts over its array arguments. Time is ``experts * call_overhead`` plus the larger of
    the FLOP time and the weight-streaming floor (weights of the ``experts`` experts read once),
    both divided by :func:`speedup`. Zero tokens cost nothing.
    """
    constants = constants or PerfConstants()
    tokens = np.asarray(tokens, dtype=np.float64)
    experts = np.asarray(experts, dtype=np.float64)
    rate = speedup(vcpus, constants)
    flop_time = tokens * shape.flops_per_token / calibration.flops_per_second
    stream_time = experts * shape.expert_bytes / constants.memory_bandwidth_bytes_per_s
    busy = experts * calibration.call_overhead_s + np.maximum(flop_time, stream_time)
    return np.where(tokens > 0, busy / rate, 0.0)


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


def calibrate(
    shape: ExpertShape,
    token_counts: Sequence[int] = (16, 64, 256),
    repeats: int = 5,
    max_width: int = 512,
) -> Calibration:
    """Time a real SiLU-gated expert MLP (torch, float32, one thread) and fit FLOP/s and call overhead.

    The timed expert has D and I capped at ``max_width`` (cheap: a few tens of ms in all); its
    FLOP rate is assumed to carry over to ``shape`` (modelled). Median of ``repeats`` after a
    warm-up, per token count; the fit is least squares of ``seconds = overhead + flops / rate``
    (overhead clipped at 0). torch's thread count is restored afterwards.
    """
    import torch

    if len(token_counts) < 2 or min(token_counts) < 1:
        raise ValueError(f"need at least two token counts >= 1, got {tuple(token_counts)}")
    hidden = min(shape.hidden_size, max_width)
    intermediate = min(shape.intermediate_size, max_width)
    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2 * intermediate, hidden, generator=generator) / math.sqrt(hidden)
    down = torch.randn(hidden, intermediate, generator=generator) / math.sqrt(intermediate)
    flops_per_token = 2 * 3 * hidden * intermediate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    points: list[tuple[int, float]] = []
    try:
        with torch.inference_mode():
            for tokens in token_counts:
                x = torch.randn(tokens, hidden, generator=generator)
                timings = []
                for _ in range(repeats + 1):
                    start = time.perf_counter()
                    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
                    _ = (torch.nn.functional.silu(gate) * up) @ down.T
                    timings.append(time.perf_counter() - start)
                points.append((int(tokens), float(np.median(timings[1:]))))
    finally:
        torch.set_num_threads(threads)
    flops = np.array([tokens * flops_per_token for tokens, _ in points], dtype=np.float64)
    seconds = np.array([elapsed for _, elapsed in points])
    slope, intercept = np.polyfit(flops, seconds, 1)
    if slope <= 0:
        # Noise swamped the trend (a loaded machine); fall back to the largest point's rate.
        slope, intercept = seconds[-1] / flops[-1], 0.0
    return Calibration(
        flops_per_second=float(1.0 / slope),
        call_overhead_s=float(max(intercept, 0.0)),
        measured=True,
        points=tuple(points),
        probe=(hidden, intermediate),
    )
