"""Read safetensors files ourselves: parse and validate the header, read single tensors by byte range.

A safetensors file is an 8-byte little-endian header length ``n``, then ``n`` bytes of JSON mapping
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
first byte after the header, the *data start*), plus an optional ``"__metadata__"`` dict of
strings, then the tensor bytes (little-endian, row-major).

We parse the header ourselves, instead of going through ``safetensors.safe_open``, because the
expert store needs the byte offsets: it reads one expert (or one dim-0 slice of a stacked expert
tensor) with a single seek + read into a buffer it owns, e.g. pinned host memory.

This module knows nothing about models or experts; ``moeserve.memory.store`` builds on it. Every
problem with a file raises ``CheckpointError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeserve.errors import CheckpointError

if sys.byteorder != "little":  # pragma: no cover - tensor bytes are copied as stored (little-endian)
    raise ImportError("moeserve.memory.safetensors_file needs a little-endian host")

# safetensors dtype code -> (torch dtype, bytes per element).
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U64": (torch.uint64, 8),
    "U32": (torch.uint32, 4),
    "U16": (torch.uint16, 2),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}

SUPPORTED_DTYPES: tuple[str, ...] = tuple(_DTYPES)
"""The safetensors dtype codes this module can read."""

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
_UNSUPPORTED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``"BF16"`` -> ``torch.bfloat16``).

    Raises ``ValueError`` for a code not in ``SUPPORTED_DTYPES``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"unknown safetensors dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
    return _DTYPES[dtype][0]


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype code. Raises ``ValueError`` for an unknown code."""
    if dtype not in _DTYPES:
        raise ValueError(f"unknown safetensors dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
    return _DTYPES[dtype][1]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry. ``begin``/``end`` are byte offsets relative to the data start."""

    dtype: str  # safetensors dtype code, one of SUPPORTED_DTYPES
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (``end - begin``)."""
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header.

    Guarantees: every entry has a supported dtype, its byte span equals ``prod(shape) * itemsize``,
    no two non-empty entries overlap, and every entry lies inside the file as it was when the
    header was read (``data_start + end <= file size``).
    """

    path: Path
    data_start: int  # absolute file offset of the first data byte (8 + header length)
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)

    def absolute_range(self, name: str) -> tuple[int, int]:
        """Absolute file offsets ``(begin, end)`` of tensor ``name``'s bytes."""
        entry = self.entry(name)
        return self.data_start + entry.begin, self.data_start + entry.end

    def entry(self, name: str) -> TensorEntry:
        """The entry of tensor ``name``; ``CheckpointError`` if the file has no such tensor."""
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor named {name!r}") from None


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Reads only the first ``8 + header length`` bytes. Raises ``CheckpointError`` naming the file
    when it is missing, too short, has a header that is not JSON or is malformed, uses an unknown
    dtype, has an entry whose byte span does not match its dtype and shape, has overlapping
    entries, or is truncated (entries reach past the end of the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    file_size = path.stat().st_size
    if file_size < 8:
        raise CheckpointError(
            f"{path} is not a safetensors file: it has {file_size} bytes, fewer than the 8-byte header length"
        )
    with path.open("rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        if 8 + header_length > file_size:
            raise CheckpointError(
                f"{path} is not a safetensors file or is truncated: its header length field says "
                f"{header_length} bytes, but the file has only {file_size - 8} bytes after it"
            )
        raw = f.read(header_length)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"header of {path} is not valid JSON ({error}); the file is corrupt") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"header of {path} is JSON but not an object; the file is corrupt")

    metadata = _parse_metadata(path, parsed.pop("__metadata__", None))
    tensors = {name: _parse_entry(path, name, value) for name, value in parsed.items()}
    _check_no_overlap(path, tensors)
    data_start = 8 + header_length
    needed = max((entry.end for entry in tensors.values()), default=0)
    available = file_size - data_start
    if needed > available:
        raise CheckpointError(
            f"{path} is truncated: header needs {needed} bytes of tensor data, file has {available}"
        )
    return SafetensorsHeader(path=path, data_start=data_start, tensors=tensors, metadata=metadata)


def _parse_metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CheckpointError(f"__metadata__ in the header of {path} must map strings to strings")
    return dict(value)


def _parse_entry(path: Path, name: str, value: object) -> TensorEntry:
    def malformed(problem: str) -> CheckpointError:
        return CheckpointError(f"tensor {name!r} in {path} has a malformed header entry: {problem}")

    if not isinstance(value, dict):
        raise malformed(f"expected an object, got {value!r}")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str):
        raise malformed(f"'dtype' must be a string, got {dtype!r}")
    if dtype not in _DTYPES:
        raise CheckpointError(
            f"tensor {name!r} in {path} has dtype {dtype!r}, which moeserve cannot read "
            f"(supported: {', '.join(SUPPORTED_DTYPES)})"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise malformed(f"'shape' must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise malformed(f"'data_offsets' must be [begin, end] with non-negative integers, got {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise malformed(f"data_offsets {offsets} end before they begin")
    expected = math.prod(shape) * _DTYPES[dtype][1]
    if end - begin != expected:
        raise CheckpointError(
            f"tensor {name!r} in {path}: shape {shape} of {dtype} needs {expected} bytes, "
            f"but its data_offsets {offsets} span {end - begin}"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: Path, tensors: dict[str, TensorEntry]) -> None:
    # Empty tensors occupy no bytes, so they may share an offset with anything.
    spans = sorted((e.begin, e.end, name) for name, e in tensors.items() if e.end > e.begin)
    for (begin_a, end_a, name_a), (begin_b, end_b, name_b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise CheckpointError(
                f"tensors {name_a!r} (bytes {begin_a}-{end_a}) and {name_b!r} (bytes {begin_b}-{end_b}) "
                f"overlap in {path}; the file is corrupt"
            )


def drop_from_page_cache(path: Path, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to drop ``path``'s cached pages (``length`` 0: to the end of the file), so
    the next read comes from the storage device. Advisory; a no-op where unsupported."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    with path.open("rb") as f:
        advise(f.fileno(), offset, length, os.POSIX_FADV_DONTNEED)


def read_range_into(path: Path, offset: int, out: torch.Tensor, drop_cache: bool = False) -> None:
    """Fill ``out``'s bytes with the ``out.nbytes`` bytes of ``path`` starting at absolute ``offset``.

    ``out`` must be a contiguous CPU tensor (pinned or not); its dtype and shape are the caller's
    business, the bytes are copied as stored (little-endian). Opens the file per call, so it is
    safe to call from several threads. Raises ``CheckpointError`` if the file ends early (it
    changed after its header was validated). ``drop_cache`` drops the range from the page cache
    after reading it, so reading it again goes to the device (cold reads).
    """
    assert out.device.type == "cpu" and out.is_contiguous(), "read_range_into needs a contiguous CPU tensor"
    nbytes = out.numel() * out.element_size()
    if nbytes == 0:
        return
    buffer = out.view(-1).view(torch.uint8).numpy().data  # a writable memoryview over out
    with path.open("rb") as f:
        f.seek(offset)
        filled = 0
        while filled < nbytes:
            count = f.readinto(buffer[filled:])
            if not count:
                raise CheckpointError(
                    f"{path} ended early: expected {nbytes} bytes at offset {offset}, got {filled} "
                    "(was the file changed or truncated while in use?)"
                )
            filled += count
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), offset, nbytes, os.POSIX_FADV_DONTNEED)


def read_tensor(header: SafetensorsHeader, name: str) -> torch.Tensor:
    """Read tensor ``name`` from ``header``'s file, reading only that tensor's bytes.

    Returns a new CPU tensor with the stored dtype and shape (not memory-mapped, not shared).
    Raises ``CheckpointError`` if the file has no such tensor.
    """
    entry = header.entry(name)
    out = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
    read_range_into(header.path, header.data_start + entry.begin, out)
    return out


def checkpoint_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights, in a stable order.

    Resolution: the shards named in ``model.safetensors.index.json`` if it exists (each must
    exist); else ``model.safetensors``; else every ``*.safetensors`` file in the folder (sorted).
    Raises ``CheckpointError`` when the folder is missing, the index is unreadable or names a
    missing shard, or there are no safetensors files (mentioning PyTorch ``.bin``/``.pt`` files,
    which are not supported, when the folder has some).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist or is not a directory")
    index_path = folder / INDEX_FILE_NAME
    if index_path.is_file():
        return _shards_from_index(folder, index_path)
    single = folder / SINGLE_FILE_NAME
    if single.is_file():
        return [single]
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if found:
        return found
    unsupported = sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.suffix in _UNSUPPORTED_WEIGHT_SUFFIXES
    )
    message = f"no *.safetensors weights in {folder}"
    if unsupported:
        message += (
            f"; found {', '.join(unsupported)}, but PyTorch .bin/.pt checkpoints are not supported: "
            "convert them to safetensors (load with transformers and call save_pretrained)"
        )
    raise CheckpointError(message)


def _shards_from_index(folder: Path, index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index_path} is not valid JSON ({error})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} has no 'weight_map' object mapping tensor names to shard files")
    shard_names = sorted(set(weight_map.values()))
    if not shard_names:
        raise CheckpointError(f"{index_path} lists no shards")
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path} names shard(s) missing from {folder}: {', '.join(missing)} (incomplete download?)"
        )
    return [folder / name for name in shard_names]
