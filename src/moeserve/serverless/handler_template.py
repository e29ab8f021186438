"""AWS Lambda handler for one expert function of a serverless MoE plan (numpy only, no torch).

This module's source is copied verbatim into the exported package as ``handler.py``
(:func:`moeserve.serverless.export.export_plan`), so it imports only the standard library and
numpy (and ``boto3``, which the Lambda Python runtime provides, lazily for the object store).
It is also importable from ``moeserve`` so tests run the very code that is deployed.

Expert: one SiLU-gated MLP without biases, ``y = down(silu(gate(x)) * up(x))`` with
``gate``/``up`` [I, D] and ``down`` [D, I] (``moeserve.serverless.shapes``).

Environment (set by the exported template):

* ``MOESERVE_LAYER``: the MoE layer index; ``MOESERVE_FUNCTION``: the function's index in it;
* ``MOESERVE_EXPERTS``: comma-separated expert ids this function holds;
* weights, one of: ``MOESERVE_WEIGHTS_PATH`` (a file; relative paths are taken from the
  directory of this file, i.e. the package root), or ``MOESERVE_WEIGHTS_BUCKET`` +
  ``MOESERVE_WEIGHTS_KEY`` (an S3 object, downloaded once to ``/tmp`` per execution
  environment). The file is an ``.npz`` with ``experts`` int [n], ``gate`` float32 [n, I, D],
  ``up`` float32 [n, I, D], ``down`` float32 [n, D, I]; it must hold every expert in
  ``MOESERVE_EXPERTS`` (it may hold more);
* ``MOESERVE_EXCHANGE_BUCKET``: the bucket of the object-store channel (absent for direct).

Request (the event; all arrays little-endian, base64 of the raw bytes, row-major):

* ``tokens``: T >= 0, ``hidden_size``: D;
* ``experts``: int32 [T], the expert id each row goes to (must be held by this function);
* ``rows``: int32 [T], the caller's row index per token (echoed back untouched; optional);
* direct channel: ``x``: float32 [T, D];
* object-store channel instead of ``x``: ``input_key``, an S3 key in the exchange bucket whose
  object is the raw float32 [T, D] bytes; the output is written to ``output_key`` (given by
  the caller, or ``input_key + ".out"``).

Response: ``{"tokens": T, "hidden_size": D, "rows": ..., "y": base64 float32 [T, D]}`` for
the direct channel, or ``{"tokens", "hidden_size", "rows", "output_key"}`` for the object store.
A synchronous Lambda payload is limited to 6 MB each way (:data:`SYNC_PAYLOAD_LIMIT_BYTES`);
base64 makes the arrays 4/3 larger, so a direct request carries at most about
``6e6 * 3 / 4 / (4 * D + 8)`` tokens. :func:`encode_request` and the handler raise
:class:`PayloadTooLargeError` rather than send or return more.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    experts: np.ndarray,
    rows: np.ndarray | None = None,
    limit: int = SYNC_PAYLOAD_LIMIT_BYTES,
) -> dict[str, Any]:
    """The direct-channel event for ``x`` float [T, D] routed to ``experts`` int [T].

    Raises :class:`PayloadTooLargeError` if its JSON exceeds ``limit`` bytes.
    """
    x = np.asarray(x)
    if x.ndim != 2 or np.shape(experts) != (x.shape[0],):
        raise ValueError(f"x must be [T, D] and experts [T], got {x.shape} and {np.shape(experts)}")
    event: dict[str, Any] = {
        "tokens": int(x.shape[0]),
        "hidden_size": int(x.shape[1]),
        "experts": encode_array(experts, "<i4"),
        "x": encode_array(x, "<f4"),
    }
    if rows is not None:
        event["rows"] = encode_array(rows, "<i4")
    _check_payload("request", len(json.dumps(event)), event["tokens"], limit)
    return event


@dataclass(frozen=True)
class ExpertWeights:
    """The experts of one function: ids int [n], gate/up float32 [n, I, D], down float32 [n, D, I]."""

    experts: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray

    def __post_init__(self) -> None:
        n = self.experts.shape[0]
        if self.gate.ndim != 3 or self.gate.shape[0] != n or self.up.shape != self.gate.shape:
            raise ValueError(
                f"gate and up must both be [{n}, I, D], got {self.gate.shape} and {self.up.shape}"
            )
        _, intermediate, hidden = self.gate.shape
        if self.down.shape != (n, hidden, intermediate):
            raise ValueError(f"down must be [{n}, {hidden}, {intermediate}], got {self.down.shape}")

    @property
    def hidden_size(self) -> int:
        return int(self.gate.shape[2])

    def slot(self, expert: int) -> int:
        """Index of ``expert`` in the arrays; ``KeyError`` if not held."""
        found = np.flatnonzero(self.experts == expert)
        if not found.size:
            raise KeyError(f"expert {expert} is not in this weights file (holds {self.experts.tolist()})")
        return int(found[0])


def load_weights(path: str) -> ExpertWeights:
    """Read a weights ``.npz`` (format in the module docstring), as float32."""
    with np.load(path) as data:
        return ExpertWeights(
            experts=np.asarray(data["experts"], dtype=np.int64),
            gate=np.asarray(data["gate"], dtype=np.float32),
            up=np.asarray(data["up"], dtype=np.float32),
            down=np.asarray(data["down"], dtype=np.float32),
        )


def silu(z: np.ndarray) -> np.ndarray:
    """``z * sigmoid(z)``, with the sigmoid as ``(1 + tanh(z / 2)) / 2`` (no overflow)."""
    return z * (0.5 * (1.0 + np.tanh(0.5 * z)))


def run_experts(weights: ExpertWeights, x: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """float32 [T, D]: row t is expert ``experts[t]`` applied to ``x[t]``; ``KeyError`` for an expert not held.

    Rows are grouped by expert once (a stable argsort), so the work per expert is its own rows,
    not a mask over all T rows.
    """
    x = np.asarray(x, dtype=np.float32)  # [T, D]
    experts = np.asarray(experts)  # [T]
    y = np.empty_like(x)  # [T, D]
    order = np.argsort(experts, kind="stable")  # [T], rows grouped by expert
    ids, starts = np.unique(experts[order], return_index=True)  # [n], [n]
    ends = np.append(starts[1:], order.size)  # [n]
    for expert, start, end in zip(ids.tolist(), starts.tolist(), ends.tolist(), strict=True):
        slot = weights.slot(expert)
        rows = order[start:end]  # [t] rows of this expert
        h = x[rows]  # [t, D]
        hidden = silu(h @ weights.gate[slot].T) * (h @ weights.up[slot].T)  # [t, I]
        y[rows] = hidden @ weights.down[slot].T  # [t, D]
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


def serve(weights: ExpertWeights, x: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """The function's outputs float32 [T, D] for rows ``x`` [T, D] routed to ``experts`` int [T].

    ``ValueError`` for an expert this function does not hold (``MOESERVE_EXPERTS``, or the
    weights file when that is unset).
    """
    held = held_experts()
    stray = sorted(set(np.unique(experts).tolist()) - held) if held else []
    if stray:
        raise ValueError(f"experts {stray} are not held by this function (holds {sorted(held)})")
    try:
        return run_experts(weights, x, experts)
    except KeyError as error:
        raise ValueError(str(error)) from error


def handle(
    event: dict[str, Any], weights: ExpertWeights, limit: int = SYNC_PAYLOAD_LIMIT_BYTES
) -> dict[str, Any]:
    """Serve one direct-channel event with ``weights`` (the request/response contract is in the module docstring).

    ``ValueError`` for a malformed event or an expert this function does not hold;
    :class:`PayloadTooLargeError` if the response would exceed ``limit`` bytes.
    """
    tokens, hidden = int(event["tokens"]), int(event["hidden_size"])
    if hidden != weights.hidden_size:
        raise ValueError(f"hidden_size {hidden} does not match the weights' {weights.hidden_size}")
    experts = decode_array(event["experts"], "<i4", (tokens,))
    x = decode_array(event["x"], "<f4", (tokens, hidden))
    y = serve(weights, x, experts)
    response: dict[str, Any] = {"tokens": tokens, "hidden_size": hidden, "y": ""}
    if "rows" in event:
        response["rows"] = event["rows"]
    # Base64 needs no JSON escaping, so the response's size is known without serialising it
    # (the runtime serialises it once, on return).
    encoded = encode_array(y, "<f4")
    _check_payload("response", len(json.dumps(response)) + len(encoded), tokens, limit)
    response["y"] = encoded
    return response


def handle_object_store(
    event: dict[str, Any],
    weights: ExpertWeights,
    read: Callable[[str], bytes],
    write: Callable[[str, bytes], None],
) -> dict[str, Any]:
    """Serve one object-store event: rows from ``read(input_key)``, outputs to ``write(output_key, bytes)``.

    The rows travel as raw little-endian float32 bytes both ways (no base64). ``read`` and
    ``write`` are the store: S3 in :func:`lambda_handler`, local files in the emulator.
    """
    tokens, hidden = int(event["tokens"]), int(event["hidden_size"])
    if hidden != weights.hidden_size:
        raise ValueError(f"hidden_size {hidden} does not match the weights' {weights.hidden_size}")
    experts = decode_array(event["experts"], "<i4", (tokens,))
    raw = read(event["input_key"])
    x = np.frombuffer(raw, dtype="<f4")
    if x.size != tokens * hidden:
        raise ValueError(f"input object has {x.size} float32 values, expected {tokens} x {hidden}")
    y = serve(weights, x.reshape(tokens, hidden), experts)
    output_key = event.get("output_key") or event["input_key"] + ".out"
    write(output_key, np.ascontiguousarray(y, dtype="<f4").tobytes())
    response: dict[str, Any] = {"tokens": tokens, "hidden_size": hidden, "output_key": output_key}
    if "rows" in event:
        response["rows"] = event["rows"]
    return response


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


def lambda_handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """The Lambda entry point (``handler.lambda_handler``): direct or object-store event."""
    weights = current_weights()
    if "input_key" in event:
        return handle_object_store(event, weights, *_s3_store())
    return handle(event, weights)
