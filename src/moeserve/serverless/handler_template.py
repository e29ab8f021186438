"""AWS Lambda handler for one expert function of a serverless MoE plan (numpy only, no torch).

This module's source is copied verbatim into the exported package as ``handler.py``
(:func:`moeserve.serverless.export.export_plan`), so it imports only the standard library and
numpy (and ``boto3``, which the Lambda Python runtime provides, lazily for the object store).
It is also importable from ``moeserve`` so tests run the very code that is deployed.

Expert: one SiLU-gated MLP without biases, ``y = down(silu(gate(x)) * up(x))`` with
``gate``/``up`` [I, D] and ``down`` [D, I] in the checkpoint (``moeserve.serverless.shapes``); the
weights file holds them transposed (below).

Environment (set by the exported template):

* ``MOESERVE_LAYER``: the MoE layer index; ``MOESERVE_FUNCTION``: the function's index in it;
* ``MOESERVE_EXPERTS``: comma-separated expert ids this function holds;
* weights, one of: ``MOESERVE_WEIGHTS_PATH`` (a file; relative paths are taken from the
  directory of this file, i.e. the package root), or ``MOESERVE_WEIGHTS_BUCKET`` +
  ``MOESERVE_WEIGHTS_KEY`` (an S3 object, downloaded once to ``/tmp`` per execution
  environment). The file is an ``.npz`` with ``experts`` int [n], ``gate_up`` float32
  [n, D, 2I] (each expert's gate projection in columns 0..I-1, its up projection in I..2I-1) and
  ``down`` float32 [n, I, D]: the projections transposed, input-major, so that rows multiply
  them on the left (``x @ gate_up``) as one contiguous matrix each; it must hold every expert in
  ``MOESERVE_EXPERTS`` (it may hold more);
* ``MOESERVE_EXCHANGE_BUCKET``: the bucket of the object-store channel (absent for direct).

Request (the event; all arrays little-endian, base64 of the raw bytes, row-major). Each token
row travels once per function however many of its experts the function holds, and the function
combines its experts' outputs for a row with the gate's routing weights:

* ``tokens``: T >= 0 distinct token rows, ``assignments``: A >= 0 token-assignments,
  ``hidden_size``: D, ``dtype``: the wire dtype of the rows, one of :data:`WIRE_DTYPES`
  (``float32``, the default and exact; ``float16`` or ``bfloat16`` halve the bytes and round the
  rows and outputs; the experts always compute in float32);
* ``rows``: int32 [A], the row (0..T-1) of each assignment; ``experts``: int32 [A], its expert
  (held by this function; a row appears at most once per expert); ``weights``: float32 [A],
  its routing weight;
* direct channel: ``x``: rows [T, D] in the wire dtype;
* object-store channel instead of ``x``: ``input_key``, an S3 key in the exchange bucket whose
  object is the raw rows [T, D] in the wire dtype; the output is written to ``output_key``
  (given by the caller, or ``input_key + ".out"``).

Response: direct channel, the raw little-endian bytes of ``y`` [T, D] in the wire dtype, where
``y[t] = sum over assignments a of row t: weights[a] * expert_a(x[t])`` -- returned as
``bytes``, which the Lambda Python runtime (awslambdaric's ``LambdaMarshaller.marshal_response``)
passes through unencoded, so no base64 or JSON is spent on it; object store, ``{"tokens",
"hidden_size", "output_key"}`` with ``y`` in the output object. A synchronous Lambda payload is
limited to 6 MB each way (:data:`SYNC_PAYLOAD_LIMIT_BYTES`); base64 makes the request's arrays
4/3 larger. :func:`encode_request` and the handler raise :class:`PayloadTooLargeError` rather
than send or return more.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MALLOC_ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(64 << 20),
}
"""Environment the exported template sets for every function (glibc reads it at process start):
payload-sized buffers (up to 32 MB) come from the heap and freed ones stay there, so a warm
instance stops paying page faults for each invocation's event, rows and response."""

SYNC_PAYLOAD_LIMIT_BYTES = 6 * 1024 * 1024
"""Lambda's synchronous invocation payload limit, each way (6 MB)."""


class PayloadTooLargeError(ValueError):
    """A request or response would exceed the synchronous payload limit."""


def _check_payload(kind: str, size: int, tokens: int, limit: int) -> None:
    if size > limit:
        raise PayloadTooLargeError(
            f"{kind} of {tokens} tokens is {size} bytes, over Lambda's synchronous payload limit of "
            f"{limit} bytes; send fewer tokens per invocation (more micro-batches or replicas) or "
            "use the object_store channel"
        )


WIRE_DTYPES = ("float32", "float16", "bfloat16")
"""Dtypes token rows may travel in; float32 is exact, the others round (see the module docstring)."""


def wire_bytes(dtype: str) -> int:
    """Bytes per value of a wire dtype; ``ValueError`` for an unknown one."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}; known: {', '.join(WIRE_DTYPES)}")
    return 4 if dtype == "float32" else 2


def rows_to_wire(x: np.ndarray, dtype: str) -> bytes:
    """Raw little-endian bytes of float rows ``x`` in wire ``dtype`` (bfloat16: round to nearest even)."""
    wire_bytes(dtype)
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(x, dtype="<f4").view("<u4")
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        return rounded.astype("<u2").tobytes()
    return np.ascontiguousarray(x, dtype="<f4" if dtype == "float32" else "<f2").tobytes()


def rows_from_wire(raw: bytes, dtype: str, shape: tuple[int, int]) -> np.ndarray:
    """float32 rows of ``shape`` from :func:`rows_to_wire`'s bytes; ``ValueError`` if the size does not fit."""
    size = wire_bytes(dtype)
    if len(raw) != shape[0] * shape[1] * size:
        raise ValueError(f"rows are {len(raw)} bytes, expected {shape[0]} x {shape[1]} {dtype} values")
    if dtype == "float32":
        return np.frombuffer(raw, dtype="<f4").reshape(shape)
    if dtype == "float16":
        return np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)
    widened = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << np.uint32(16)
    return widened.view(np.float32).reshape(shape)


def encode_array(array: np.ndarray, dtype: str) -> str:
    """Base64 of ``array`` as little-endian ``dtype`` ("<f4" or "<i4"), row-major."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def decode_array(text: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`encode_array`; ``ValueError`` if the byte count does not fit ``shape``."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    array = np.frombuffer(raw, dtype=dtype)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"array has {array.size} {dtype} values, expected shape {shape}")
    return array.reshape(shape)


def encode_request(
    x: np.ndarray,
    rows: np.ndarray,
    experts: np.ndarray,
    weights: np.ndarray,
    dtype: str = "float32",
    limit: int = SYNC_PAYLOAD_LIMIT_BYTES,
) -> dict[str, Any]:
    """The direct-channel event for token rows ``x`` float [T, D] and assignments ``rows``, ``experts``, ``weights`` [A].

    Raises :class:`PayloadTooLargeError` if its JSON exceeds ``limit`` bytes.
    """
    event = encode_assignments(x.shape, rows, experts, weights, dtype)
    event["x"] = base64.b64encode(rows_to_wire(x, dtype)).decode("ascii")
    _check_payload("request", len(json.dumps(event)), event["tokens"], limit)
    return event


def encode_assignments(
    shape: tuple[int, ...], rows: np.ndarray, experts: np.ndarray, weights: np.ndarray, dtype: str = "float32"
) -> dict[str, Any]:
    """The event without its rows (the object-store channel's; :func:`encode_request` adds ``x``).

    ``ValueError`` unless ``shape`` is [T, D] and ``rows``, ``experts``, ``weights`` are [A] with rows in 0..T-1.
    """
    wire_bytes(dtype)
    count = np.shape(rows)[0] if np.ndim(rows) == 1 else -1
    if len(shape) != 2 or count < 0 or np.shape(experts) != (count,) or np.shape(weights) != (count,):
        raise ValueError(
            f"x must be [T, D] and rows, experts, weights [A], got {tuple(shape)}, {np.shape(rows)}, "
            f"{np.shape(experts)}, {np.shape(weights)}"
        )
    if count and (np.min(rows) < 0 or np.max(rows) >= shape[0]):
        raise ValueError(f"rows must be in 0..{shape[0] - 1}")
    return {
        "tokens": int(shape[0]),
        "assignments": int(count),
        "hidden_size": int(shape[1]),
        "dtype": dtype,
        "rows": encode_array(rows, "<i4"),
        "experts": encode_array(experts, "<i4"),
        "weights": encode_array(weights, "<f4"),
    }


@dataclass(frozen=True)
class ExpertWeights:
    """The experts of one function: ids int [n], gate_up float32 [n, D, 2I], down float32 [n, I, D].

    Input-major (transposed from the checkpoint's [I, D] and [D, I]) and contiguous per expert:
    BLAS multiplies ``rows @ matrix`` for a handful of rows faster from a contiguous [D, 2I]
    matrix than from a transposed view, and one fused gate/up product instead of two halves the
    calls (measured, DeepSeek-V2-Lite shape, one thread, cold weights: 1.10x at about 24 rows
    per expert, 1.18x at 8; docs/benchmarks.md). :meth:`from_projections` builds it from the
    checkpoint's layout.
    """

    experts: np.ndarray
    gate_up: np.ndarray
    down: np.ndarray

    def __post_init__(self) -> None:
        n = self.experts.shape[0]
        if self.gate_up.ndim != 3 or self.gate_up.shape[0] != n or self.gate_up.shape[2] % 2:
            raise ValueError(f"gate_up must be [{n}, D, 2I], got {self.gate_up.shape}")
        _, hidden, twice = self.gate_up.shape
        if self.down.shape != (n, twice // 2, hidden):
            raise ValueError(f"down must be [{n}, {twice // 2}, {hidden}], got {self.down.shape}")

    @classmethod
    def from_projections(
        cls, experts: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray
    ) -> ExpertWeights:
        """From the checkpoint's layout: ``gate``, ``up`` [n, I, D], ``down`` [n, D, I] (float32 copies)."""
        n = experts.shape[0]
        if gate.ndim != 3 or gate.shape[0] != n or up.shape != gate.shape:
            raise ValueError(f"gate and up must both be [{n}, I, D], got {gate.shape} and {up.shape}")
        _, intermediate, hidden = gate.shape
        if down.shape != (n, hidden, intermediate):
            raise ValueError(f"down must be [{n}, {hidden}, {intermediate}], got {down.shape}")
        gate_up = np.empty((n, hidden, 2 * intermediate), dtype=np.float32)
        gate_up[:, :, :intermediate] = gate.transpose(0, 2, 1)
        gate_up[:, :, intermediate:] = up.transpose(0, 2, 1)
        down_t = np.ascontiguousarray(down.transpose(0, 2, 1), dtype=np.float32)
        return cls(np.asarray(experts, dtype=np.int64), gate_up, down_t)

    @property
    def hidden_size(self) -> int:
        return int(self.gate_up.shape[1])

    @property
    def intermediate_size(self) -> int:
        return int(self.down.shape[1])

    def slot(self, expert: int) -> int:
        """Index of ``expert`` in the arrays; ``KeyError`` if not held."""
        found = np.flatnonzero(self.experts == expert)
        if not found.size:
            raise KeyError(f"expert {expert} is not in this weights file (holds {self.experts.tolist()})")
        return int(found[0])


def save_weights(handle: Any, weights: ExpertWeights) -> None:
    """Write ``weights`` as the ``.npz`` :func:`load_weights` reads (``handle``: a path or binary file)."""
    np.savez(handle, experts=weights.experts, gate_up=weights.gate_up, down=weights.down)


def load_weights(path: str) -> ExpertWeights:
    """Read a weights ``.npz`` (format in the module docstring), as float32."""
    with np.load(path) as data:
        if "gate_up" not in data.files:
            raise ValueError(
                f"{path} holds {sorted(data.files)}, not experts/gate_up/down: a weights file of an older "
                "export (gate/up/down in the checkpoint's layout); export the plan again"
            )
        return ExpertWeights(
            experts=np.asarray(data["experts"], dtype=np.int64),
            gate_up=np.asarray(data["gate_up"], dtype=np.float32),
            down=np.asarray(data["down"], dtype=np.float32),
        )


def silu(z: np.ndarray) -> np.ndarray:
    """``z * sigmoid(z)``, with the sigmoid as ``(1 + tanh(z / 2)) / 2`` (no overflow)."""
    return z * (0.5 * (1.0 + np.tanh(0.5 * z)))


def run_experts(
    weights: ExpertWeights, x: np.ndarray, rows: np.ndarray, experts: np.ndarray, gate_weights: np.ndarray
) -> np.ndarray:
    """float32 [T, D]: row t is the sum over assignments a with ``rows[a] == t`` of ``gate_weights[a] * expert_a(x[t])``.

    ``x`` [T, D], ``rows``, ``experts``, ``gate_weights`` [A]; a row appears at most once per
    expert. ``KeyError`` for an expert not held. Assignments are grouped by expert once (a
    stable argsort), so the work per expert is its own rows, not a mask over all of them.
    """
    x = np.asarray(x, dtype=np.float32)  # [T, D]
    experts = np.asarray(experts)  # [A]
    intermediate = weights.intermediate_size
    y = np.zeros_like(x)  # [T, D]
    order = np.argsort(experts, kind="stable")  # [A], assignments grouped by expert
    ids, starts = np.unique(experts[order], return_index=True)  # [n], [n]
    ends = np.append(starts[1:], order.size)  # [n]
    for expert, start, end in zip(ids.tolist(), starts.tolist(), ends.tolist(), strict=True):
        slot = weights.slot(expert)
        group = order[start:end]  # [a] assignments of this expert
        targets = rows[group]  # [a] distinct rows
        h = x[targets]  # [a, D]
        projected = h @ weights.gate_up[slot]  # [a, 2I]: gate | up
        hidden = silu(projected[:, :intermediate])  # [a, I]
        hidden *= projected[:, intermediate:]
        out = hidden @ weights.down[slot]  # [a, D]
        out *= gate_weights[group, None]
        y[targets] += out  # distinct targets within one expert, so no lost updates
    return y


_CACHE: dict[str, ExpertWeights] = {}


def _weights_file() -> str:
    path = os.environ.get("MOESERVE_WEIGHTS_PATH")
    if path:
        return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    bucket, key = os.environ.get("MOESERVE_WEIGHTS_BUCKET"), os.environ.get("MOESERVE_WEIGHTS_KEY")
    if not (bucket and key):
        raise RuntimeError("set MOESERVE_WEIGHTS_PATH, or MOESERVE_WEIGHTS_BUCKET and MOESERVE_WEIGHTS_KEY")
    local = os.path.join("/tmp", key.replace("/", "_"))
    if not os.path.exists(local):
        import boto3  # provided by the Lambda Python runtime

        boto3.client("s3").download_file(bucket, key, local)
    return local


def held_experts() -> set[int]:
    """The expert ids in ``MOESERVE_EXPERTS`` (empty if unset: then any expert in the weights file)."""
    text = os.environ.get("MOESERVE_EXPERTS", "").strip()
    return {int(part) for part in text.split(",") if part.strip()}


def current_weights() -> ExpertWeights:
    """The function's weights, loaded once per execution environment."""
    path = _weights_file()
    if path not in _CACHE:
        _CACHE[path] = load_weights(path)
    return _CACHE[path]


def serve(weights: ExpertWeights, x: np.ndarray, event: dict[str, Any]) -> np.ndarray:
    """The function's combined outputs float32 [T, D] for rows ``x`` [T, D] and the event's assignments.

    ``ValueError`` for a malformed event or an expert this function does not hold
    (``MOESERVE_EXPERTS``, or the weights file when that is unset).
    """
    tokens, count = int(event["tokens"]), int(event["assignments"])
    rows = decode_array(event["rows"], "<i4", (count,))
    experts = decode_array(event["experts"], "<i4", (count,))
    gate_weights = decode_array(event["weights"], "<f4", (count,))
    if count and (rows.min() < 0 or rows.max() >= tokens):
        raise ValueError(f"rows must be in 0..{tokens - 1}")
    held = held_experts()
    # A set, not np.unique: its first call imports numpy.ma (~10 ms of CPU in a fresh environment).
    stray = sorted(set(experts.tolist()) - held) if held else []
    if stray:
        raise ValueError(f"experts {stray} are not held by this function (holds {sorted(held)})")
    try:
        return run_experts(weights, x, rows, experts, gate_weights)
    except KeyError as error:
        raise ValueError(str(error)) from error


def _check_event(event: dict[str, Any], weights: ExpertWeights) -> tuple[int, int, str]:
    tokens, hidden, dtype = (
        int(event["tokens"]),
        int(event["hidden_size"]),
        str(event.get("dtype", "float32")),
    )
    if hidden != weights.hidden_size:
        raise ValueError(f"hidden_size {hidden} does not match the weights' {weights.hidden_size}")
    wire_bytes(dtype)
    return tokens, hidden, dtype


def handle(event: dict[str, Any], weights: ExpertWeights, limit: int = SYNC_PAYLOAD_LIMIT_BYTES) -> bytes:
    """Serve one direct-channel event with ``weights``: the raw bytes of ``y`` (module docstring).

    ``ValueError`` for a malformed event or an expert this function does not hold;
    :class:`PayloadTooLargeError` if the response would exceed ``limit`` bytes.
    """
    tokens, hidden, dtype = _check_event(event, weights)
    _check_payload("response", tokens * hidden * wire_bytes(dtype), tokens, limit)
    x = rows_from_wire(base64.b64decode(event["x"], validate=True), dtype, (tokens, hidden))
    return rows_to_wire(serve(weights, x, event), dtype)


def handle_object_store(
    event: dict[str, Any],
    weights: ExpertWeights,
    read: Callable[[str], bytes],
    write: Callable[[str, bytes], None],
) -> dict[str, Any]:
    """Serve one object-store event: rows from ``read(input_key)``, outputs to ``write(output_key, bytes)``.

    The rows travel as raw little-endian bytes of the wire dtype both ways (no base64). ``read``
    and ``write`` are the store: S3 in :func:`lambda_handler`, local files in the emulator.
    """
    tokens, hidden, dtype = _check_event(event, weights)
    x = rows_from_wire(read(event["input_key"]), dtype, (tokens, hidden))
    y = serve(weights, x, event)
    output_key = event.get("output_key") or event["input_key"] + ".out"
    write(output_key, rows_to_wire(y, dtype))
    return {"tokens": tokens, "hidden_size": hidden, "output_key": output_key}


def _s3_store() -> tuple[Callable[[str], bytes], Callable[[str, bytes], None]]:
    import boto3  # provided by the Lambda Python runtime

    bucket = os.environ["MOESERVE_EXCHANGE_BUCKET"]
    s3 = boto3.client("s3")

    def read(key: str) -> bytes:
        body: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def write(key: str, data: bytes) -> None:
        s3.put_object(Bucket=bucket, Key=key, Body=data)

    return read, write


def lambda_handler(event: dict[str, Any], context: Any = None) -> dict[str, Any] | bytes:
    """The Lambda entry point (``handler.lambda_handler``): direct (returns bytes) or object-store event."""
    weights = current_weights()
    if "input_key" in event:
        return handle_object_store(event, weights, *_s3_store())
    return handle(event, weights)
