"""Where each routed expert's weights live in a checkpoint's safetensors files; read one expert alone.

Shape legend: E routed experts in a layer, D hidden size, I expert intermediate size.

A checkpoint stores routed experts in one of two layouts, found by tensor name under
``<stack>.layers.{L}.mlp.experts`` (or Mixtral's ``block_sparse_moe.experts``):

(a) per-expert tensors, as transformers 5 ``save_pretrained`` writes for every family:
    Mixtral ``experts.{e}.w1.weight`` [I, D] (gate), ``w3.weight`` [I, D] (up), ``w2.weight`` [D, I]
    (down); Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V2 / DeepSeek-V3 ``experts.{e}.gate_proj.weight``,
    ``up_proj.weight``, ``down_proj.weight``.
(b) fused stacked tensors ``experts.gate_up_proj`` [E, 2I, D] (gate rows first, then up rows)
    and ``experts.down_proj`` [E, D, I]; expert e is the contiguous dim-0 slice, so it is read
    as one byte range without touching the other experts.

Either way ``read_expert`` returns the fused convention the MoE layer uses (see
``moeserve.moe.types.ExpertProvider``): ``gate_up`` [2I, D] and ``down`` [D, I].

Not routed experts, hence ignored: shared experts (Qwen2-MoE ``mlp.shared_expert``, DeepSeek
``mlp.shared_experts``), routers (``mlp.gate``), dense MLPs. Layers are numbered by their decoder
layer index L, so a model whose first layers are dense (DeepSeek ``first_k_dense_replace``) has
MoE layers that do not start at 0.

This module does not know the model config, devices or caching (``ExpertCache`` does), nor
quantised experts: any other tensor under ``experts.`` (scales, biases) is rejected with a
``CheckpointError`` rather than silently ignored.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from moeserve.errors import CheckpointError
from moeserve.memory.safetensors_file import (
    SafetensorsHeader,
    TensorEntry,
    checkpoint_weight_files,
    drop_from_page_cache,
    read_header,
    read_range_into,
    torch_dtype,
)

_LAYER_EXPERTS = r"^(?P<stack>(?:.+\.)?layers)\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\."
_ANY_EXPERT_TENSOR = re.compile(_LAYER_EXPERTS)
_PER_EXPERT_TENSOR = re.compile(
    _LAYER_EXPERTS + r"(?P<expert>\d+)\.(?P<projection>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED_TENSOR = re.compile(_LAYER_EXPERTS + r"(?P<projection>gate_up_proj|down_proj)$")
_ROLE_OF_PROJECTION = {
    "w1": "gate",
    "gate_proj": "gate",
    "w3": "up",
    "up_proj": "up",
    "w2": "down",
    "down_proj": "down",
}
_PROJECTION_NAMES = {"gate": "gate_proj / w1", "up": "up_proj / w3", "down": "down_proj / w2"}


@dataclass(frozen=True)
class ByteRange:
    """Contiguous bytes in one file: a whole tensor, or one expert's dim-0 slice of a stacked tensor."""

    path: Path
    tensor: str  # name of the tensor these bytes belong to
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]  # shape of these bytes read as a tensor
    begin: int  # absolute file offset, inclusive
    end: int  # absolute file offset, exclusive

    @property
    def nbytes(self) -> int:
        """Number of bytes in the range."""
        return self.end - self.begin


@dataclass(frozen=True)
class ExpertLocation:
    """Where one routed expert's weights are.

    ``gate_up`` holds the ranges that, read back to back, form the [2I, D] gate-then-up matrix: one
    range for the fused layout, two (gate [I, D], then up [I, D]) for per-expert tensors, possibly
    in different shards. ``down`` is the [D, I] range.
    """

    layer: int
    expert: int
    gate_up: tuple[ByteRange, ...]
    down: ByteRange

    @property
    def ranges(self) -> tuple[ByteRange, ...]:
        """Every byte range of the expert, gate/up first."""
        return (*self.gate_up, self.down)

    @property
    def nbytes(self) -> int:
        """Bytes the expert occupies on disk (what ``read_expert`` reads)."""
        return sum(r.nbytes for r in self.ranges)


@dataclass(frozen=True)
class ExpertLayerSpec:
    """What every routed expert of one MoE layer looks like on disk (all experts alike)."""

    layout: Literal["per_expert", "fused"]
    num_experts: int  # E
    hidden_size: int  # D
    intermediate_size: int  # I
    dtype: str  # stored safetensors dtype code, e.g. "BF16"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The stored dtype as a torch dtype."""
        return torch_dtype(self.dtype)


@dataclass(frozen=True)
class ExpertTensors:
    """One expert's weights in the fused convention: gate_up [2I, D] (gate rows first), down [D, I]."""

    gate_up: torch.Tensor  # [2I, D]
    down: torch.Tensor  # [D, I]

    @property
    def nbytes(self) -> int:
        """Bytes held by the two tensors."""
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down))


@dataclass(frozen=True)
class _Layer:
    spec: ExpertLayerSpec
    experts: tuple[ExpertLocation, ...]  # indexed by expert id


class ExpertStore:
    """Index of every routed expert's bytes in a checkpoint folder; reads one expert at a time.

    Construction reads only the safetensors headers. ``read_expert`` reads exactly
    ``expert_nbytes(layer, expert)`` bytes (counted in ``bytes_read``) and nothing of the other
    experts. Thread-safe: reads open the file per call and the counter is locked.

    Raises ``CheckpointError`` at construction when the folder's weights are unusable (see
    ``checkpoint_weight_files``, ``read_header``), contain no routed experts, or the experts of a
    layer are incomplete or inconsistent (missing experts or projections, mismatched shapes or
    dtypes, tensors under ``experts.`` it does not understand).
    """

    def __init__(self, folder: str | Path, cold_reads: bool = False) -> None:
        self.folder = Path(folder)
        self.files: list[Path] = checkpoint_weight_files(self.folder)
        self.headers: tuple[SafetensorsHeader, ...] = tuple(read_header(path) for path in self.files)
        self._layers: dict[int, _Layer] = _index_experts(self.folder, self.headers)
        self._bytes_read = 0
        self._lock = threading.Lock()
        self.cold_reads = cold_reads
        """Ask that expert reads come from the storage device: the shards' pages are dropped from
        the page cache now and each range after it is read (``posix_fadvise`` DONTNEED, advisory:
        the kernel keeps pages something still maps). For machines whose RAM would otherwise
        cache a checkpoint that, where offloading matters, it could not hold."""
        if cold_reads:
            for path in self.files:
                drop_from_page_cache(path)

    def __repr__(self) -> str:
        return (
            f"ExpertStore({str(self.folder)!r}, layers={self.layers}, "
            f"expert_bytes={self.total_expert_bytes()})"
        )

    @property
    def layers(self) -> list[int]:
        """Decoder layer numbers L that have routed experts, ascending."""
        return sorted(self._layers)

    @property
    def bytes_read(self) -> int:
        """Total bytes read from the checkpoint by this store so far."""
        with self._lock:
            return self._bytes_read

    def layer_spec(self, layer: int) -> ExpertLayerSpec:
        """Layout, E, D, I and stored dtype of layer ``layer``'s experts. ``KeyError`` if not an MoE layer."""
        return self._layer(layer).spec

    def num_experts(self, layer: int) -> int:
        """Number of routed experts E in layer ``layer``."""
        return self._layer(layer).spec.num_experts

    def location(self, layer: int, expert: int) -> ExpertLocation:
        """Files and byte ranges of one expert. ``KeyError``/``IndexError`` for an unknown layer/expert."""
        experts = self._layer(layer).experts
        if not 0 <= expert < len(experts):
            raise IndexError(f"expert {expert} out of range: layer {layer} has experts 0-{len(experts) - 1}")
        return experts[expert]

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """Bytes one expert occupies on disk, in its stored dtype."""
        return self.location(layer, expert).nbytes

    def total_expert_bytes(self) -> int:
        """Bytes of all routed experts of all layers, in their stored dtype."""
        return sum(loc.nbytes for layer in self._layers.values() for loc in layer.experts)

    def read_expert(self, layer: int, expert: int, dtype: torch.dtype | None = None) -> ExpertTensors:
        """Read one expert into new CPU tensors: gate_up [2I, D] (gate rows first), down [D, I].

        Reads only that expert's bytes. ``dtype`` converts after reading (default: the stored dtype).
        """
        spec = self._layer(layer).spec
        d, i = spec.hidden_size, spec.intermediate_size
        gate_up = torch.empty((2 * i, d), dtype=spec.torch_dtype)
        down = torch.empty((d, i), dtype=spec.torch_dtype)
        self.read_expert_into(layer, expert, gate_up, down)
        if dtype is not None and dtype != spec.torch_dtype:
            gate_up, down = gate_up.to(dtype), down.to(dtype)
        return ExpertTensors(gate_up=gate_up, down=down)

    def read_expert_into(self, layer: int, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Read one expert straight into caller-owned buffers (e.g. pinned host staging memory).

        ``gate_up`` [2I, D] and ``down`` [D, I] must be contiguous CPU tensors of the stored dtype
        (``layer_spec(layer).torch_dtype``); ``ValueError`` otherwise. No conversion, no extra copy.
        """
        spec = self._layer(layer).spec
        location = self.location(layer, expert)
        d, i = spec.hidden_size, spec.intermediate_size
        for what, tensor, shape in (("gate_up", gate_up, (2 * i, d)), ("down", down, (d, i))):
            if tuple(tensor.shape) != shape or tensor.dtype != spec.torch_dtype:
                raise ValueError(
                    f"{what} buffer is {tuple(tensor.shape)} {tensor.dtype}; layer {layer} experts need "
                    f"{shape} {spec.torch_dtype}"
                )
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise ValueError(f"{what} buffer must be a contiguous CPU tensor")
        flat = gate_up.view(-1)
        filled = 0
        for byte_range in location.gate_up:
            count = math.prod(byte_range.shape)
            read_range_into(byte_range.path, byte_range.begin, flat[filled : filled + count], self.cold_reads)
            filled += count
        assert filled == flat.numel(), "gate/up ranges must fill gate_up exactly"
        read_range_into(location.down.path, location.down.begin, down, self.cold_reads)
        with self._lock:
            self._bytes_read += location.nbytes

    def _layer(self, layer: int) -> _Layer:
        try:
            return self._layers[layer]
        except KeyError:
            raise KeyError(
                f"layer {layer} has no routed experts in {self.folder}; MoE layers are {self.layers}"
            ) from None


@dataclass(frozen=True)
class _Found:
    """One expert tensor found in a header."""

    name: str
    header: SafetensorsHeader
    entry: TensorEntry

    def where(self) -> str:
        return f"{self.name!r} in {self.header.path}"

    def whole(self) -> ByteRange:
        begin = self.header.data_start + self.entry.begin
        return ByteRange(
            path=self.header.path,
            tensor=self.name,
            dtype=self.entry.dtype,
            shape=self.entry.shape,
            begin=begin,
            end=begin + self.entry.nbytes,
        )

    def slice0(self, index: int) -> ByteRange:
        """Bytes of ``tensor[index]`` (a contiguous dim-0 slice of a row-major tensor)."""
        stride = self.entry.nbytes // self.entry.shape[0]
        begin = self.header.data_start + self.entry.begin + index * stride
        return ByteRange(
            path=self.header.path,
            tensor=self.name,
            dtype=self.entry.dtype,
            shape=self.entry.shape[1:],
            begin=begin,
            end=begin + stride,
        )


def _index_experts(folder: Path, headers: tuple[SafetensorsHeader, ...]) -> dict[int, _Layer]:
    """Steps: 1. find every tensor under ``layers.{L}.<mlp>.experts.`` and classify it;
    2. check they come from one decoder stack with no duplicates; 3. build and validate each layer
    from its per-expert or fused tensors."""
    per_expert: dict[int, dict[int, dict[str, _Found]]] = {}  # layer -> expert -> role -> tensor
    fused: dict[int, dict[str, _Found]] = {}  # layer -> "gate_up_proj"/"down_proj" -> tensor
    stacks: dict[str, str] = {}  # stack prefix -> one tensor name under it
    seen: dict[str, Path] = {}
    for header in headers:
        for name, entry in header.tensors.items():
            match = _ANY_EXPERT_TENSOR.match(name)
            if match is None:
                continue
            found = _Found(name, header, entry)
            if name in seen:
                raise CheckpointError(
                    f"expert tensor {name!r} appears in both {seen[name]} and {header.path}"
                )
            seen[name] = header.path
            stacks.setdefault(match["stack"], name)
            layer = int(match["layer"])
            if m := _PER_EXPERT_TENSOR.match(name):
                role = _ROLE_OF_PROJECTION[m["projection"]]
                per_expert.setdefault(layer, {}).setdefault(int(m["expert"]), {})[role] = found
            elif m := _FUSED_TENSOR.match(name):
                fused.setdefault(layer, {})[m["projection"]] = found
            else:
                raise CheckpointError(
                    f"unsupported expert tensor {found.where()}: moeserve reads unquantised experts "
                    "stored as experts.{e}.{gate_proj,up_proj,down_proj}.weight (or Mixtral w1/w3/w2), "
                    "or fused experts.gate_up_proj [E, 2I, D] and experts.down_proj [E, D, I]"
                )
    if len(stacks) > 1:
        examples = "; ".join(f"{stack!r} (e.g. {name!r})" for stack, name in sorted(stacks.items()))
        raise CheckpointError(
            f"{folder} has routed experts under more than one layer stack: {examples}; "
            "moeserve expects a single decoder stack"
        )
    if not per_expert and not fused:
        raise CheckpointError(
            f"no routed MoE expert tensors in {folder}: expected names like "
            "model.layers.{L}.mlp.experts.{e}.gate_proj.weight, "
            "model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight or model.layers.{L}.mlp.experts.gate_up_proj"
        )
    layers: dict[int, _Layer] = {}
    for layer in sorted(per_expert.keys() | fused.keys()):
        if layer in per_expert and layer in fused:
            raise CheckpointError(
                f"layer {layer} in {folder} mixes per-expert tensors and fused experts.gate_up_proj/down_proj"
            )
        if layer in fused:
            layers[layer] = _fused_layer(layer, fused[layer])
        else:
            layers[layer] = _per_expert_layer(folder, layer, per_expert[layer])
    return layers


def _fused_layer(layer: int, tensors: dict[str, _Found]) -> _Layer:
    for needed in ("gate_up_proj", "down_proj"):
        if needed not in tensors:
            other = next(iter(tensors.values()))
            raise CheckpointError(f"layer {layer} has {other.where()} but no experts.{needed} next to it")
    gate_up, down = tensors["gate_up_proj"], tensors["down_proj"]
    gate_up_shape, down_shape = gate_up.entry.shape, down.entry.shape
    consistent = (
        len(gate_up_shape) == 3
        and len(down_shape) == 3
        and gate_up_shape[0] == down_shape[0] > 0
        and gate_up_shape[1] == 2 * down_shape[2]
        and gate_up_shape[2] == down_shape[1]
    )
    if not consistent:
        raise CheckpointError(
            f"fused experts of layer {layer} have shapes gate_up_proj {list(gate_up_shape)} and down_proj "
            f"{list(down_shape)}; expected [E, 2I, D] and [E, D, I] ({gate_up.where()})"
        )
    if gate_up.entry.dtype != down.entry.dtype:
        raise CheckpointError(
            f"fused experts of layer {layer} mix dtypes: gate_up_proj {gate_up.entry.dtype}, "
            f"down_proj {down.entry.dtype} ({gate_up.where()})"
        )
    num_experts, hidden_size, intermediate_size = down_shape
    spec = ExpertLayerSpec("fused", num_experts, hidden_size, intermediate_size, gate_up.entry.dtype)
    experts = tuple(
        ExpertLocation(layer=layer, expert=e, gate_up=(gate_up.slice0(e),), down=down.slice0(e))
        for e in range(num_experts)
    )
    return _Layer(spec=spec, experts=experts)


def _per_expert_layer(folder: Path, layer: int, by_expert: dict[int, dict[str, _Found]]) -> _Layer:
    num_experts = max(by_expert) + 1
    missing = [e for e in range(num_experts) if e not in by_expert]
    if missing:
        raise CheckpointError(
            f"layer {layer} in {folder} is missing expert(s) {missing} (has experts up to {num_experts - 1})"
        )
    reference: tuple[tuple[int, ...], tuple[int, ...], str] | None = None
    experts = []
    for e in range(num_experts):
        roles = by_expert[e]
        for role in ("gate", "up", "down"):
            if role not in roles:
                raise CheckpointError(
                    f"layer {layer} expert {e} in {folder} has no {role} projection "
                    f"({_PROJECTION_NAMES[role]} weight)"
                )
        gate, up, down = roles["gate"], roles["up"], roles["down"]
        gate_shape, down_shape = gate.entry.shape, down.entry.shape
        if not (
            len(gate_shape) == 2
            and up.entry.shape == gate_shape
            and down_shape == (gate_shape[1], gate_shape[0])
        ):
            raise CheckpointError(
                f"layer {layer} expert {e} has shapes gate {list(gate_shape)}, up {list(up.entry.shape)}, "
                f"down {list(down_shape)}; expected [I, D], [I, D], [D, I] ({gate.where()})"
            )
        if not gate.entry.dtype == up.entry.dtype == down.entry.dtype:
            raise CheckpointError(
                f"layer {layer} expert {e} mixes dtypes gate {gate.entry.dtype}, up {up.entry.dtype}, "
                f"down {down.entry.dtype} ({gate.where()})"
            )
        signature = (gate_shape, down_shape, gate.entry.dtype)
        if reference is None:
            reference = signature
        elif signature != reference:
            raise CheckpointError(
                f"layer {layer} expert {e} is gate {list(gate_shape)} {gate.entry.dtype} but expert 0 is "
                f"{list(reference[0])} {reference[2]}; all experts of a layer must match ({gate.where()})"
            )
        experts.append(
            ExpertLocation(layer=layer, expert=e, gate_up=(gate.whole(), up.whole()), down=down.whole())
        )
    assert reference is not None
    intermediate_size, hidden_size = reference[0]
    spec = ExpertLayerSpec("per_expert", num_experts, hidden_size, intermediate_size, reference[2])
    return _Layer(spec=spec, experts=tuple(experts))
