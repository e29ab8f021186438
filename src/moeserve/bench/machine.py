"""The machine's physical limits, measured in the same run as the benchmark they scale.

``measure_machine(dtype, device)`` times large square matmuls (peak GFLOP/s in that dtype) and a
large tensor copy (memory bandwidth, read + write bytes), median of a few repeats after a
warm-up, on the CPU or on a CUDA device (timed to completion: synchronized before and after). Benchmarks divide an ideal time derived from these by their measured time
(``roofline_fraction``), so results from a noisy shared machine stay comparable. This module
knows nothing of MoE.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from moeserve.env import available_cores

DEFAULT_MATMUL_SIZE = 2048
"""Largest side of the square matmul; 2*n^3 = 17 GFLOP, enough to reach the BLAS plateau on CPU."""
DEFAULT_COPY_BYTES = 256 * 2**20
"""Bytes of the copied tensor; far above any last-level cache, so the copy streams from memory."""
CUDA_MATMUL_SIZE = 8192
"""Largest matmul side on a GPU: an H100 needs ~8k x 8k x 8k bf16 products to reach its plateau."""
CUDA_COPY_BYTES = 2 * 2**30
"""Bytes copied on a GPU: ~40x an H100's 50 MB L2."""


@dataclass(frozen=True)
class MachinePeak:
    """What the machine can do at best, as measured now."""

    peak_gflops: float
    """Best matmul throughput in GFLOP/s (2*n^3 flops per n x n x n product) in ``dtype``."""
    bandwidth_gbs: float
    """Copy bandwidth in GB/s (10^9 bytes), counting both the bytes read and the bytes written."""
    dtype: torch.dtype
    """Element type the matmul peak was measured in."""


def device_synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (nothing to wait for on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return partial(torch.cuda.synchronize, device)
    return lambda: None


def median_seconds(
    run: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None
) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after ``warmup`` untimed ones;
    ``sync`` (see :func:`device_synchronizer`) runs before and after each timed call."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure_matmul_gflops(
    dtype: torch.dtype,
    size: int = DEFAULT_MATMUL_SIZE,
    repeats: int = 3,
    call_budget_s: float = 0.2,
    device: torch.device | str = "cpu",
) -> float:
    """Best GFLOP/s of ``F.linear(a, w)`` (a @ w.T, the layout of every expert projection).

    Square sizes double from 256 up to ``size``; growth stops once one product takes longer
    than ``call_budget_s`` (bf16 on a CPU without bf16 instructions runs at a few GFLOP/s, so
    a 2048 product would take seconds). Returns the median-of-repeats rate of the best size.
    """
    generator = torch.Generator().manual_seed(0)
    sync = device_synchronizer(device)
    best = 0.0
    n = min(256, size)
    while True:
        a, w = _random_matrix(n, dtype, generator).to(device), _random_matrix(n, dtype, generator).to(device)
        seconds = median_seconds(partial(F.linear, a, w), repeats, sync=sync)
        best = max(best, 2 * n**3 / seconds / 1e9)
        if n >= size or seconds > call_budget_s:
            return best
        n = min(2 * n, size)


def _random_matrix(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, n, generator=generator).to(dtype)


@torch.inference_mode()
def measure_copy_bandwidth(
    num_bytes: int = DEFAULT_COPY_BYTES, repeats: int = 3, device: torch.device | str = "cpu"
) -> float:
    """GB/s of ``dst.copy_(src)`` for ``num_bytes``-sized tensors on ``device``, counting read + write."""
    numel = max(1, num_bytes // 4)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeats, sync=device_synchronizer(device))
    return 2 * numel * 4 / seconds / 1e9


def measure_machine(
    dtype: torch.dtype,
    *,
    matmul_size: int | None = None,
    copy_bytes: int | None = None,
    repeats: int = 3,
    device: torch.device | str = "cpu",
) -> MachinePeak:
    """Measure matmul peak for ``dtype`` data and copy bandwidth now, in this process, on ``device``.

    Sizes default to :data:`DEFAULT_MATMUL_SIZE` / :data:`DEFAULT_COPY_BYTES` on the CPU and
    :data:`CUDA_MATMUL_SIZE` / :data:`CUDA_COPY_BYTES` on a GPU. On the CPU, for bf16/fp16 the
    peak is the better of a native low-precision matmul and an fp32 matmul: a CPU without bf16
    instructions multiplies bf16 data fastest by converting it to fp32 (what moeserve's ``cpu``
    backend does), so the native figure alone would understate the limit. A GPU's peak is its
    native one for ``dtype`` (default math: fp32 products without TF32).
    """
    on_gpu = torch.device(device).type == "cuda"
    matmul_size = matmul_size or (CUDA_MATMUL_SIZE if on_gpu else DEFAULT_MATMUL_SIZE)
    copy_bytes = copy_bytes or (CUDA_COPY_BYTES if on_gpu else DEFAULT_COPY_BYTES)
    peak = measure_matmul_gflops(dtype, matmul_size, repeats, device=device)
    if dtype in (torch.bfloat16, torch.float16) and not on_gpu:
        peak = max(peak, measure_matmul_gflops(torch.float32, matmul_size, repeats, device=device))
    return MachinePeak(
        peak_gflops=peak,
        bandwidth_gbs=measure_copy_bandwidth(copy_bytes, repeats, device=device),
        dtype=dtype,
    )


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description(device: torch.device | str = "cpu") -> str:
    """One line naming the CPU, its cores, torch's threads and versions (and the GPU when
    ``device`` is one), for every report."""
    cores = available_cores()
    host = (
        f"{cpu_model_name()}, {cores} cores available, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, Python {platform.python_version()}"
    )
    if torch.device(device).type != "cuda":
        return host
    properties = torch.cuda.get_device_properties(torch.device(device))
    return (
        f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs, "
        f"CUDA {torch.version.cuda}); host: {host}"
    )
