"""Experts stage: run each expert's gated MLP over its contiguous rows.

Every backend computes, for the rows of expert e,
``down_e @ (act(gate_e @ x) * (up_e @ x))`` and returns [N, D] unweighted outputs.
``loop`` is the plain reference; the others must match it (tests compare them).

Shape legend: N dispatched rows, E experts, D hidden, I intermediate, C capacity per expert.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeserve.moe.types import ExpertGroups, ExpertProvider
from moeserve.registry import Registry

Activation = Callable[[torch.Tensor], torch.Tensor]
Backend = Callable[[ExpertGroups, ExpertProvider, Activation], torch.Tensor]
BackendFactory = Callable[[], Backend]
BACKENDS: Registry[BackendFactory] = Registry("experts backend")
"""Name -> factory; each MoELayer calls the factory once, so a backend may keep per-layer scratch."""


def _stateless(backend: Backend) -> BackendFactory:
    return lambda: backend


def _gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Activation) -> torch.Tensor:
    """One expert: x [n, D], gate_up [2I, D], down [D, I] -> [n, D]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    return F.linear(act(gate) * up, down)  # [n, D]


def _gated_mlp_transposed(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Activation) -> torch.Tensor:
    """:func:`_gated_mlp` with each weight transposed to contiguous first: the arithmetic
    ``hybrid`` runs through ``_grouped_mm`` on its transposed copy (bit-identical to it)."""
    gate, up = torch.mm(x, gate_up.t().contiguous()).chunk(2, dim=-1)  # [n, I] each
    return torch.mm(act(gate) * up, down.t().contiguous())  # [n, D]


def experts_loop(
    groups: ExpertGroups, weights: ExpertProvider, act: Activation, mlp: Callable[..., torch.Tensor] = _gated_mlp
) -> torch.Tensor:
    """Reference: a Python loop over experts that received rows, one pair of matmuls each
    (``mlp``: :func:`_gated_mlp`, or :func:`_gated_mlp_transposed` for ``hybrid`` with a cache)."""
    out = torch.empty_like(groups.rows)  # [N, D]
    # One host sync per layer: the loop needs the group sizes to slice rows.
    counts = groups.expert_counts.tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count:
            end = start + count
            out[start:end] = mlp(groups.rows[start:end], weights.gate_up(expert), weights.down(expert), act)
            start = end
    return out


LOW_PRECISION = (torch.bfloat16, torch.float16)
UPCAST_MIN_ROWS = 8
"""Rows from which an expert's bf16/fp16 matmuls run faster in fp32 on a CPU without native
low-precision matmul, converting the weights into reused scratch buffers. Measured on an AVX2
CPU, one thread, D=4096, I=1024: 4 rows 10.5 ms native vs 14.6 ms converted, 8 rows 21.5 vs
15.5; at D=128, I=160 the crossover is 2-4 rows."""


def cpu_has_native_low_precision_matmul() -> bool:
    """True when the CPU advertises bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


class CpuExperts:
    """The per-expert loop for bf16/fp16 weights on CPUs that only emulate low-precision matmul,
    with groups of at least ``UPCAST_MIN_ROWS`` rows computed in fp32 (``hybrid`` runs it for
    large layers and for steps of a handful of rows; with fp32 weights it is the loop reference). Weights are converted into reused
    fp32 scratch buffers: a fresh allocation per expert costs page faults that made the
    conversion ~10x slower than the copy itself (92 ms vs 9 ms for 29M elements here)."""

    def __init__(self) -> None:
        self._scratch: dict[tuple[int, ...], torch.Tensor] = {}

    def _as_fp32(self, weight: torch.Tensor) -> torch.Tensor:
        buffer = self._scratch.get(tuple(weight.shape))
        if buffer is None:
            buffer = self._scratch[tuple(weight.shape)] = torch.empty(
                weight.shape, dtype=torch.float32, device=weight.device
            )
        return buffer.copy_(weight)

    def __call__(self, groups: ExpertGroups, weights: ExpertProvider, act: Activation) -> torch.Tensor:
        low_precision = groups.rows.dtype in LOW_PRECISION
        out = torch.empty_like(groups.rows)  # [N, D]
        counts = groups.expert_counts.tolist()  # one host sync per layer, as in the loop reference
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            end = start + count
            rows, gate_up, down = groups.rows[start:end], weights.gate_up(expert), weights.down(expert)
            if low_precision and count >= UPCAST_MIN_ROWS:
                gate_up32 = self._as_fp32(gate_up)
                out[start:end] = _gated_mlp(rows.float(), gate_up32, self._as_fp32(down), act)
            else:
                out[start:end] = _gated_mlp(rows, gate_up, down, act)
            start = end
        return out


def _stacked_or_raise(weights: ExpertProvider, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = weights.stacked()
    if stacked is None:
        raise ValueError(f"backend {backend!r} needs every expert resident; use backend 'loop' with an expert cache")
    return stacked


def experts_grouped_mm(groups: ExpertGroups, weights: ExpertProvider, act: Activation) -> torch.Tensor:
    """One grouped matmul per projection (``torch._grouped_mm``), no host sync; bmm when capacity-gated."""
    gate_up, down = _stacked_or_raise(weights, "grouped_mm")  # [E, 2I, D], [E, D, I]
    if groups.capacity is not None:
        num_experts = gate_up.shape[0]
        x = groups.rows.view(num_experts, groups.capacity, -1)  # [E, C, D]
        gate, up = torch.bmm(x, gate_up.transpose(1, 2)).chunk(2, dim=-1)  # [E, C, I] each
        return torch.bmm(act(gate) * up, down.transpose(1, 2)).view_as(groups.rows)  # [N, D]
    if groups.rows.shape[0] == 0:
        return torch.empty_like(groups.rows)
    return _grouped_gated_mlp(groups.rows, groups.expert_counts, gate_up.transpose(1, 2), down.transpose(1, 2), act)


HYBRID_LOOP_MAX_ROWS = 3
"""Steps with at most this many dispatched rows run the per-expert loop in ``hybrid``."""
HYBRID_MAX_LAYER_BYTES = 64 << 20
"""``hybrid`` keeps a transposed copy of a layer's experts up to this size; larger layers loop."""


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter; -1 for inference tensors, which have none (and
    cannot be changed in place outside inference mode)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


class HybridExperts:
    """On CPU: ``torch._grouped_mm`` over a transposed copy of small experts, the per-expert loop
    for a handful of rows and for large experts; with an expert cache (experts not stacked),
    per-expert loops with the grouped path's arithmetic (:func:`_gated_mlp_transposed`), so exact
    caching stays bit-identical to the resident layer. bf16/fp16 weights (on CPUs without native
    low-precision matmul, where ``resolve_backend`` picks this backend for them) are copied to
    fp32 in the same transposed copy and computed in fp32, outputs rounded back; their handful-
    of-rows and large-expert steps take :class:`CpuExperts` (fp32 from ``UPCAST_MIN_ROWS`` rows).

    On CPU ``torch._grouped_mm`` loops over the groups in C++, so it saves the Python and
    dispatch cost of the per-expert loop (about ten small ops per active expert), which is most
    of what small experts cost, while large experts cost the same either way. It reads the
    second operand fastest when it is contiguous as [E, D, 2I] (with weights out of cache: 249 us
    against 456 us for the transposed view, 16 experts of 128 x 320, 32 rows), so this backend
    keeps a transposed copy of layers up to ``HYBRID_MAX_LAYER_BYTES`` (the reference model: 4 MB
    a layer in fp32). Measured on this project's 2-core AVX2 machine, one thread, fp32, random
    weights and softmax top-k routing, ms per layer, loop / grouped_mm over the transposed view
    (``moeserve bench moe-layer`` times every backend on the reference layer): D=128 I=160 E=16
    k=2: 1 token 0.13 / 0.19, 4 tokens 0.42 / 0.31, 16 tokens 1.17 / 0.57, 256 tokens 2.96 /
    1.80; D=1024 I=1408 E=64 k=6: within 10% either way at 1-256 tokens; D=4096 I=3584 E=8 k=2:
    within 17% either way. A single token's rows are the one case where the loop is faster. (With one
    layer's weights kept in cache, as in ``bench moe-layer``, the transposed view is faster at
    16 tokens; inside a model the weights are not in cache and the copy wins.)
    """

    def __init__(self) -> None:
        self._source: tuple[torch.Tensor, torch.Tensor, int, int] | None = None
        self._transposed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._per_expert = CpuExperts()  # fp32: exactly the loop reference; bf16/fp16: upcast large groups

    def _transposed_copy(self, stacked: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = stacked  # [E, 2I, D], [E, D, I]
        # Tensors and their in-place version counters: a weight reloaded in place refreshes the copy.
        source = (gate_up, down, _version(gate_up), _version(down))
        known = self._source
        if self._transposed is None or known is None or known[0] is not gate_up or known[1] is not down \
                or known[2:] != source[2:]:
            self._source = source
            compute = _compute_dtype(gate_up.dtype)
            self._transposed = (
                gate_up.transpose(1, 2).to(compute).contiguous(),
                down.transpose(1, 2).to(compute).contiguous(),
            )
        return self._transposed  # [E, D, 2I], [E, I, D]

    def __call__(self, groups: ExpertGroups, weights: ExpertProvider, act: Activation) -> torch.Tensor:
        stacked = weights.stacked()
        low_precision = groups.rows.dtype in LOW_PRECISION
        if groups.capacity is not None:
            if stacked is None:
                return self._per_expert(groups, weights, act)
            if not low_precision:
                return experts_grouped_mm(groups, weights, act)
            if not _small_layer(groups, weights):
                return self._per_expert(groups, weights, act)
            gate_up_t, down_t = self._transposed_copy(stacked)  # fp32
            x = groups.rows.float().view(gate_up_t.shape[0], groups.capacity, -1)  # [E, C, D]
            gate, up = torch.bmm(x, gate_up_t).chunk(2, dim=-1)  # [E, C, I] each
            return torch.bmm(act(gate) * up, down_t).view(groups.rows.shape).to(groups.rows.dtype)  # [N, D]
        rows = groups.rows.shape[0]
        if rows <= HYBRID_LOOP_MAX_ROWS or not _small_layer(groups, weights):
            return self._per_expert(groups, weights, act)
        if stacked is None:
            # An expert cache (weights one expert at a time): the same arithmetic as the grouped
            # path below, so an exact cache gives bit-identical outputs to the resident layer.
            if not low_precision:
                return experts_loop(groups, weights, act, _gated_mlp_transposed)
            upcast = dataclasses.replace(groups, rows=groups.rows.float())
            return experts_loop(upcast, _Float32View(weights), act, _gated_mlp_transposed).to(groups.rows.dtype)
        gate_up_t, down_t = self._transposed_copy(stacked)
        x = groups.rows.float() if low_precision else groups.rows  # [N, D]
        if rows <= HYBRID_CHUNK_ROWS:
            return _grouped_gated_mlp(x, groups.expert_counts, gate_up_t, down_t, act).to(groups.rows.dtype)
        out = torch.empty_like(groups.rows)  # [N, D]
        for first, last, start, end in expert_chunks(groups.expert_counts.tolist(), HYBRID_CHUNK_ROWS):
            out[start:end] = _grouped_gated_mlp(
                x[start:end], groups.expert_counts[first:last], gate_up_t[first:last], down_t[first:last], act
            )
        return out


HYBRID_CHUNK_ROWS = 4096
"""``hybrid`` runs larger steps as grouped matmuls over runs of experts of about this many rows:
one grouped call over a prefill's rows streams intermediates of [N, 2I] through memory (65,536
rows of D=128, I=160: 246 ms as one call against 185 ms for the per-expert loop, whose
intermediates stay in cache; measured here, one thread)."""


def _grouped_gated_mlp(
    x: torch.Tensor, expert_counts: torch.Tensor, gate_up_t: torch.Tensor, down_t: torch.Tensor, act: Activation
) -> torch.Tensor:
    """x [n, D] grouped by expert, counts [e], gate_up_t [e, D, 2I], down_t [e, I, D] -> [n, D]."""
    offsets = torch.cumsum(expert_counts, dim=0).to(torch.int32)  # [e] end row of each group
    gate, up = torch._grouped_mm(x, gate_up_t, offs=offsets).chunk(2, dim=-1)  # [n, I] each
    return torch._grouped_mm(act(gate) * up, down_t, offs=offsets)  # [n, D]


def expert_chunks(counts: list[int], max_rows: int) -> list[tuple[int, int, int, int]]:
    """Split experts with ``counts`` rows (in order) into runs of at most ``max_rows`` rows each,
    as (first expert, last expert + 1, first row, last row + 1); an expert with more rows than
    ``max_rows`` is a run of its own. Every expert is in exactly one run."""
    chunks: list[tuple[int, int, int, int]] = []
    first = start = rows = 0
    for expert, count in enumerate(counts):
        if rows and rows + count > max_rows:
            chunks.append((first, expert, start, start + rows))
            first, start, rows = expert, start + rows, 0
        rows += count
    if counts:
        chunks.append((first, len(counts), start, start + rows))
    return chunks


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16 weights (``hybrid`` runs on CPUs that only emulate them), else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


class _Float32View:
    """An expert provider's experts converted to fp32 one at a time (``hybrid``'s low-precision
    path with an expert cache: the values its fp32 transposed copy holds for a resident layer)."""

    def __init__(self, inner: ExpertProvider) -> None:
        self.inner = inner
        self.num_experts = inner.num_experts
        self.dtype = torch.float32
        self.device = inner.device

    def stacked(self) -> None:
        return None

    def gate_up(self, expert: int) -> torch.Tensor:
        return self.inner.gate_up(expert).float()

    def down(self, expert: int) -> torch.Tensor:
        return self.inner.down(expert).float()


def _small_layer(groups: ExpertGroups, weights: ExpertProvider) -> bool:
    """Whether all the layer's experts together, in their compute dtype (fp32 for bf16/fp16),
    fit ``HYBRID_MAX_LAYER_BYTES`` (from the row width and, for the intermediate size, the
    stacked weights or the step's first routed expert)."""
    stacked = weights.stacked()
    if stacked is not None:
        gate_up, down = stacked
        return (gate_up.numel() + down.numel()) * _compute_dtype(gate_up.dtype).itemsize <= HYBRID_MAX_LAYER_BYTES
    counts = groups.expert_counts.tolist()
    first = next((expert for expert, count in enumerate(counts) if count), None)
    if first is None:
        return False
    gate_up = weights.gate_up(first)  # [2I, D]; this step uses it anyway
    element = _compute_dtype(gate_up.dtype).itemsize
    return weights.num_experts * 3 * (gate_up.numel() // 2) * element <= HYBRID_MAX_LAYER_BYTES


BACKENDS.register("loop")(_stateless(experts_loop))
BACKENDS.register("grouped_mm")(_stateless(experts_grouped_mm))
BACKENDS.register("hybrid")(HybridExperts)
BACKENDS.register("cpu")(CpuExperts)


def grouped_mm_available() -> bool:
    """True when this torch build has ``torch._grouped_mm`` (CUDA kernels; a loop on CPU)."""
    return hasattr(torch, "_grouped_mm")


CPU_ONLY_BACKENDS = ("hybrid", "cpu")
"""Backends written for CPUs (fp32 upcasts of bf16 weights, a transposed copy for the CPU
``_grouped_mm`` loop); on CUDA they would only be slower versions of ``grouped_mm`` / ``loop``."""

_GROUPED_MM_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs on ``device`` for ``dtype`` operands (probed once per
    device type and dtype with a two-group product; CUDA builds accept bf16 only on some versions
    and GPUs, the CPU build every float type)."""
    if not grouped_mm_available():
        return False
    key = (device.type, dtype)
    if key not in _GROUPED_MM_SUPPORT:
        try:
            a = torch.ones(16, 16, dtype=dtype, device=device)  # [N, K]
            b = torch.ones(2, 16, 16, dtype=dtype, device=device)  # [G, K, M]
            offsets = torch.tensor([8, 16], dtype=torch.int32, device=device)
            out = torch._grouped_mm(a, b, offs=offsets)
            _GROUPED_MM_SUPPORT[key] = bool(out.shape == (16, 16) and torch.all(out == 16))
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_SUPPORT[key] = False
    return _GROUPED_MM_SUPPORT[key]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, stacked: bool = True) -> str:
    """Turn ``auto`` into a concrete backend name once, at construction.

    ``stacked`` says whether the provider holds every expert in one tensor (an expert cache
    does not: then only per-expert backends apply). On CUDA: ``grouped_mm`` where this build's
    ``_grouped_mm`` takes the dtype on this GPU, else (and with an expert cache) ``loop``. On CPU: ``hybrid`` (grouped_mm over a transposed copy of small experts, the
    loop for a single token's rows; with an expert cache, per-expert loops with the same
    arithmetic, so exact caching stays bit-identical), bf16/fp16 included (computed in fp32),
    unless the CPU has bf16 instructions: then ``loop`` for low-precision weights.
    """
    if name != "auto":
        BACKENDS.get(name)  # raises with the known names
        if name == "grouped_mm" and not stacked:
            raise ValueError("backend 'grouped_mm' needs every expert resident; use 'loop' or 'auto' with an expert cache")
        return name
    if device.type == "cuda":
        return "grouped_mm" if stacked and grouped_mm_supported(device, dtype) else "loop"
    if dtype in LOW_PRECISION and cpu_has_native_low_precision_matmul():
        return "loop"
    if grouped_mm_available():
        return "hybrid"  # with an expert cache it runs per-expert loops matching the resident arithmetic
    return "loop"
