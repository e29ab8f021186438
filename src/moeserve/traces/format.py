"""The ``moeserve-trace/1`` routing trace: which experts every token was routed to, per MoE layer.

A trace file is an ``.npz`` archive holding::

    experts  int16   [T, L, K]  routed expert ids per token and MoE layer; -1 where unknown
    weights  float32 [T, L, K]  gate weights (optional)
    offsets  int64   [S+1]      sequence s owns rows offsets[s]:offsets[s+1], in token order
    meta     str (0-d array)    JSON object: format="moeserve-trace/1", model, num_experts,
                                top_k, phase, source, and any further descriptive keys

Shape legend: T tokens (all sequences back to back), L MoE layers, K slots per token and layer
(K == top_k), S sequences, E = num_experts.

This module reads, writes and validates traces; it does not know how they were recorded (see
``TraceWriter`` for the helper a recorder fills) nor what they are used for (``stats`` and the
cache, predictor and placement code consume them). It imports numpy only.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeserve.errors import TraceError

TRACE_FORMAT = "moeserve-trace/1"
UNKNOWN_EXPERT = -1
"""Expert id stored where the recorder did not see the routing decision."""

EXPERTS_DTYPE = np.dtype(np.int16)
WEIGHTS_DTYPE = np.dtype(np.float32)
OFFSETS_DTYPE = np.dtype(np.int64)

_REQUIRED_ARRAYS = ("experts", "offsets", "meta")
_META_KEYS = ("format", "model", "num_experts", "top_k", "phase", "source")


@dataclass(frozen=True)
class TraceMeta:
    """What a trace was recorded from. Serialised as the ``meta`` JSON object.

    Contract: ``num_experts >= 1`` and ``1 <= top_k <= num_experts``; ``extra`` holds every other
    JSON key (e.g. ``"layers"`` describing which decoder layers the L axis maps to) and must not
    reuse a reserved key (``format`` and the named fields). Invalid values raise ``TraceError``.
    """

    model: str
    """Model the routing came from, e.g. ``"deepseek-ai/DeepSeek-V2-Lite-Chat"``."""
    num_experts: int
    """Routed experts per MoE layer (E); shared experts are not counted."""
    top_k: int
    """Experts each token is routed to per layer (K, the last axis of ``experts``)."""
    phase: str
    """How the tokens were produced, e.g. ``"prefill"`` or ``"decode (greedy)"``."""
    source: str
    """Provenance: the recorder, repository or dataset the routing came from."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further JSON-serialisable descriptive keys, kept verbatim on save and load."""

    def __post_init__(self) -> None:
        _check_meta_values(
            self.model, self.num_experts, self.top_k, self.phase, self.source, self.extra, "trace meta"
        )

    def to_json(self) -> str:
        """The ``meta`` JSON text, reserved keys first, then ``extra`` in its own order."""
        document: dict[str, Any] = {
            "format": TRACE_FORMAT,
            "model": self.model,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "phase": self.phase,
            "source": self.source,
        }
        document.update(self.extra)
        return json.dumps(document)

    @classmethod
    def from_json(cls, text: str, where: str = "trace meta") -> TraceMeta:
        """Parse ``meta`` JSON; raises ``TraceError`` naming ``where`` if it is not a valid one."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise TraceError(f"{where}: meta is not valid JSON ({error})") from None
        if not isinstance(document, dict):
            raise TraceError(f"{where}: meta must be a JSON object, got {type(document).__name__}")
        missing = [key for key in _META_KEYS if key not in document]
        if missing:
            raise TraceError(f"{where}: meta is missing key(s) {', '.join(missing)}")
        if document["format"] != TRACE_FORMAT:
            raise TraceError(
                f"{where}: meta format is {document['format']!r}, but this moeserve reads {TRACE_FORMAT!r}"
            )
        values = {key: document[key] for key in _META_KEYS if key != "format"}
        values["extra"] = {key: value for key, value in document.items() if key not in _META_KEYS}
        # Checked here first so that the error names the file rather than "trace meta".
        _check_meta_values(**values, where=where)
        return cls(**values)


def _check_meta_values(
    model: object,
    num_experts: object,
    top_k: object,
    phase: object,
    source: object,
    extra: object,
    where: str,
) -> None:
    for name, value in (("model", model), ("phase", phase), ("source", source)):
        if not isinstance(value, str):
            raise TraceError(f"{where}: meta {name} must be a string, got {value!r}")
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        # bool is an int subclass; True experts is a bug, not a count.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TraceError(f"{where}: meta {name} must be a positive integer, got {value!r}")
    assert isinstance(top_k, int) and isinstance(num_experts, int)
    if top_k > num_experts:
        raise TraceError(f"{where}: meta top_k is {top_k}, larger than num_experts {num_experts}")
    if not isinstance(extra, dict):
        raise TraceError(f"{where}: meta extra must be a dict, got {type(extra).__name__}")
    reserved = sorted(set(extra) & set(_META_KEYS))
    if reserved:
        raise TraceError(f"{where}: meta extra reuses reserved key(s) {', '.join(reserved)}")


@dataclass(frozen=True)
class TraceSequence:
    """One sequence of a trace: views (not copies) into the trace's arrays."""

    index: int
    """Position s of the sequence in the trace."""
    experts: np.ndarray
    """int16 [t, L, K] expert ids of this sequence's tokens; -1 where unknown."""
    weights: np.ndarray | None
    """float32 [t, L, K] gate weights, or None when the trace has none."""


@dataclass(frozen=True)
class Trace:
    """A validated routing trace held in memory.

    Contract (checked on construction, ``TraceError`` otherwise): ``experts`` is int16 [T, L, K]
    with K == ``meta.top_k`` and every id in ``[0, num_experts)`` or -1; ``offsets`` is int64
    [S+1], non-decreasing, from 0 to T (empty sequences are allowed); ``weights`` is None or
    float32 [T, L, K] and finite. The arrays are shared, not copied: do not modify them.
    """

    experts: np.ndarray
    """int16 [T, L, K] routed expert ids; -1 where unknown."""
    offsets: np.ndarray
    """int64 [S+1]; sequence s owns rows offsets[s]:offsets[s+1]."""
    meta: TraceMeta
    weights: np.ndarray | None = None
    """float32 [T, L, K] gate weights, or None."""

    def __post_init__(self) -> None:
        _check_arrays(self.experts, self.offsets, self.weights, self.meta, where="trace")

    @property
    def num_tokens(self) -> int:
        """T: tokens over all sequences."""
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        """L: MoE layers recorded per token."""
        return int(self.experts.shape[1])

    @property
    def num_sequences(self) -> int:
        """S: sequences (prompts or generations)."""
        return int(self.offsets.shape[0]) - 1

    def sequence(self, index: int) -> TraceSequence:
        """Sequence ``index`` (0 <= index < S) as views into the trace."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} out of range for a trace of {self.num_sequences}")
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        weights = None if self.weights is None else self.weights[start:stop]
        return TraceSequence(index=index, experts=self.experts[start:stop], weights=weights)

    def sequences(self) -> Iterator[TraceSequence]:
        """Every sequence in order, as views into the trace."""
        for index in range(self.num_sequences):
            yield self.sequence(index)


def _check_arrays(
    experts: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray | None,
    meta: TraceMeta,
    where: str,
) -> None:
    """Raise ``TraceError`` (message starting with ``where``) unless the arrays obey the format."""
    if not isinstance(meta, TraceMeta):
        raise TraceError(f"{where}: meta must be a TraceMeta, got {type(meta).__name__}")
    _check_array(experts, "experts", EXPERTS_DTYPE, ndim=3, where=where)
    _check_array(offsets, "offsets", OFFSETS_DTYPE, ndim=1, where=where)
    num_tokens, _, slots = experts.shape
    if slots != meta.top_k:
        raise TraceError(
            f"{where}: experts has {slots} slots per token (shape {experts.shape}), but meta top_k is {meta.top_k}"
        )
    if offsets.shape[0] < 1:
        raise TraceError(f"{where}: offsets is empty; it needs S+1 entries starting at 0")
    if offsets[0] != 0 or offsets[-1] != num_tokens:
        raise TraceError(
            f"{where}: offsets run from {offsets[0]} to {offsets[-1]}, but must cover the "
            f"{num_tokens} rows of experts (from 0 to {num_tokens})"
        )
    steps = np.diff(offsets)
    if (steps < 0).any():
        sequence = int(np.argmax(steps < 0))
        raise TraceError(
            f"{where}: offsets are not monotonic: offsets[{sequence}] = {offsets[sequence]} "
            f"> offsets[{sequence + 1}] = {offsets[sequence + 1]}"
        )
    _check_expert_ids(experts, meta.num_experts, where)
    if weights is not None:
        _check_array(weights, "weights", WEIGHTS_DTYPE, ndim=3, where=where)
        if weights.shape != experts.shape:
            raise TraceError(
                f"{where}: weights shape {weights.shape} does not match experts shape {experts.shape}"
            )
        if not np.isfinite(weights).all():
            raise TraceError(f"{where}: weights contain NaN or infinite values")


def _check_array(array: object, name: str, dtype: np.dtype, ndim: int, where: str) -> None:
    if not isinstance(array, np.ndarray):
        raise TraceError(f"{where}: {name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise TraceError(f"{where}: {name} has dtype {array.dtype}, expected {dtype}")
    if array.ndim != ndim:
        raise TraceError(
            f"{where}: {name} has {array.ndim} dimensions (shape {array.shape}), expected {ndim}"
        )


def _check_expert_ids(experts: np.ndarray, num_experts: int, where: str) -> None:
    # experts: [T, L, K]; report the first bad layer and its worst id, which is what a user needs
    # to find a num_experts or layer-mapping mistake.
    if experts.size == 0:
        return
    highest_per_layer = experts.max(axis=(0, 2))  # [L]
    lowest_per_layer = experts.min(axis=(0, 2))  # [L]
    bad_layers = np.flatnonzero((highest_per_layer >= num_experts) | (lowest_per_layer < UNKNOWN_EXPERT))
    if bad_layers.size == 0:
        return
    layer = int(bad_layers[0])
    if highest_per_layer[layer] >= num_experts:
        raise TraceError(
            f"{where}: layer {layer} has expert id {int(highest_per_layer[layer])}, "
            f"but num_experts is {num_experts}"
        )
    raise TraceError(
        f"{where}: layer {layer} has expert id {int(lowest_per_layer[layer])}; ids must be in "
        f"[0, {num_experts}) or {UNKNOWN_EXPERT} for unknown"
    )


def save_trace(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Write ``trace`` to ``path`` (compressed ``.npz``, exactly that name) and return the path.

    Parent folders are created. The file is written next to its destination and renamed into
    place, so a reader never sees a half-written trace.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Any, not np.ndarray: numpy's stubs type **kwds of savez_compressed like its allow_pickle flag.
    arrays: dict[str, Any] = {
        "experts": trace.experts,
        "offsets": trace.offsets,
        "meta": np.array(trace.meta.to_json()),  # 0-d str array, as in the published traces
    }
    if trace.weights is not None:
        arrays["weights"] = trace.weights
    partial = path.with_name(path.name + ".partial")
    # A file object stops numpy from appending ".npz" to names that lack it.
    try:
        with open(partial, "wb") as file:
            np.savez_compressed(file, **arrays)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and validate a ``moeserve-trace/1`` file.

    Raises ``TraceError`` naming the file and the problem when it is missing, is not an ``.npz``
    archive, lacks an array, has a wrong dtype or shape, inconsistent offsets or weights, a
    foreign format string, or expert ids outside ``[0, num_experts)`` (other than -1).
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise TraceError(f"{where}: no such trace file")
    if not zipfile.is_zipfile(path):
        raise TraceError(f"{where}: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in _REQUIRED_ARRAYS if name not in archive.files]
            if missing:
                found = ", ".join(archive.files) or "nothing"
                raise TraceError(f"{where}: missing array(s) {', '.join(missing)} (found {found})")
            experts = archive["experts"]
            offsets = archive["offsets"]
            meta_array = archive["meta"]
            weights = archive["weights"] if "weights" in archive.files else None
    except TraceError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        # ValueError is numpy refusing an object (pickled) array; the others are a damaged archive.
        raise TraceError(f"{where}: cannot read the .npz archive ({error})") from None
    meta = TraceMeta.from_json(_meta_text(meta_array, where), where=where)
    _check_arrays(experts, offsets, weights, meta, where=where)
    return Trace(experts=experts, offsets=offsets, meta=meta, weights=weights)


def _meta_text(meta_array: np.ndarray, where: str) -> str:
    """The JSON text of the ``meta`` array: a 0-d (or one-element) str or utf-8 bytes array."""
    if meta_array.size != 1 or meta_array.dtype.kind not in ("U", "S"):
        raise TraceError(
            f"{where}: meta must be a single JSON string, got a {meta_array.dtype} array of shape {meta_array.shape}"
        )
    value = meta_array.reshape(()).item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise TraceError(f"{where}: meta bytes are not utf-8") from None
    return str(value)


class TraceWriter:
    """Builds a ``Trace`` from sequences added one at a time (what a live recorder produces).

    ``add_sequence`` takes expert ids [t, L, K] of any integer dtype (e.g. a CPU tensor's
    ``.numpy()``) and optional gate weights of the same shape; either every sequence has weights
    or none does. Ids are checked against ``meta.num_experts`` when added, so a recorder bug is
    reported at the sequence that caused it. Arrays are copied; the caller may reuse buffers.
    """

    def __init__(self, meta: TraceMeta, num_layers: int | None = None) -> None:
        """``num_layers`` fixes L up front; left None, the first sequence sets it."""
        if num_layers is not None and num_layers < 1:
            raise TraceError(f"TraceWriter: num_layers must be positive, got {num_layers}")
        self.meta = meta
        self.num_layers = num_layers
        self._experts: list[np.ndarray] = []  # each int16 [t, L, K]
        self._weights: list[np.ndarray] = []  # each float32 [t, L, K], or empty when no weights
        self._has_weights: bool | None = None

    @property
    def num_sequences(self) -> int:
        return len(self._experts)

    @property
    def num_tokens(self) -> int:
        return sum(int(experts.shape[0]) for experts in self._experts)

    def add_sequence(self, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Append one sequence: ``experts`` [t, L, K] integer ids (-1 unknown), ``weights`` [t, L, K]."""
        where = f"TraceWriter sequence {self.num_sequences}"
        experts = np.asarray(experts)
        if experts.dtype.kind not in ("i", "u"):
            raise TraceError(f"{where}: expert ids must be integers, got dtype {experts.dtype}")
        if experts.ndim != 3 or experts.shape[2] != self.meta.top_k:
            raise TraceError(
                f"{where}: experts must have shape [t, L, {self.meta.top_k}], got {experts.shape}"
            )
        if self.num_layers is not None and experts.shape[1] != self.num_layers:
            raise TraceError(f"{where}: experts has {experts.shape[1]} layers, expected {self.num_layers}")
        # Checked before narrowing to int16, where a large id would wrap around silently.
        _check_expert_ids(experts, self.meta.num_experts, where)
        has_weights = weights is not None
        if self._has_weights is not None and has_weights != self._has_weights:
            expected = "weights" if self._has_weights else "no weights"
            raise TraceError(f"{where}: earlier sequences had {expected}; every sequence must match")
        if weights is not None:
            weights = np.asarray(weights, dtype=WEIGHTS_DTYPE)
            if weights.shape != experts.shape:
                raise TraceError(
                    f"{where}: weights shape {weights.shape} does not match experts shape {experts.shape}"
                )
            self._weights.append(weights.copy())
        self.num_layers = int(experts.shape[1])
        self._has_weights = has_weights
        self._experts.append(experts.astype(EXPERTS_DTYPE, copy=True))

    def build(self) -> Trace:
        """The validated trace of every sequence added so far (the writer stays usable)."""
        if self.num_layers is None:
            raise TraceError("TraceWriter: no sequences added and num_layers not given; L is unknown")
        lengths = [int(experts.shape[0]) for experts in self._experts]
        offsets = np.zeros(len(lengths) + 1, dtype=OFFSETS_DTYPE)  # [S+1]
        np.cumsum(lengths, out=offsets[1:])
        if self._experts:
            experts = np.concatenate(self._experts, axis=0)  # [T, L, K]
        else:
            experts = np.empty((0, self.num_layers, self.meta.top_k), dtype=EXPERTS_DTYPE)
        weights = np.concatenate(self._weights, axis=0) if self._has_weights else None  # [T, L, K]
        return Trace(experts=experts, offsets=offsets, meta=self.meta, weights=weights)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """``save_trace(self.build(), path)``."""
        return save_trace(self.build(), path)
