"""One emulated Lambda execution environment: a process that runs the deployed expert handler.

Started by :mod:`moeserve.serverless.emulator` as ``python -m moeserve.serverless.function_worker``
with the environment the exported SAM template would give the function (``MOESERVE_EXPERTS``,
``MOESERVE_WEIGHTS_PATH``) and one BLAS thread. It imports only the standard library, numpy
and :mod:`moeserve.serverless.handler_template` -- the very handler ``serverless export``
packages -- so its start-up time and resident memory are those of the deployed package, not of
moeserve (no torch).

Protocol (stdin -> requests, stdout -> replies; each message a frame: two big-endian uint32
lengths, a JSON header of the first length, a body of the second):

1. On start it loads its weights through ``handler_template.current_weights()`` (the INIT
   phase) and replies ``{"ready": true, "load_s": seconds spent loading}``.
2. Each request header is ``{"vcpus": v, "get_s": s, "put_s": s, "input_path": ...,
   "output_path": ...}`` with the Lambda event (JSON bytes) as body. Direct channel: the body is
   the event ``handler_template.handle`` takes. Object-store channel (``input_path`` set): the
   event names no ``x``; the worker runs ``handler_template.handle_object_store`` with local
   files for the store: it reads the raw float32 rows from ``input_path`` (the object's GET),
   writes the raw output to ``output_path`` (the PUT), and sleeps ``get_s`` and ``put_s``
   beside them -- S3 latency and bandwidth are modelled, a local file is not S3.
3. When the handler has computed its answer, before the CPU-share sleep, the worker sends
   ``{"computed": true}`` (no body): the emulator then lets another invocation compute on this
   host (its host slots, ``emulator.EmulatorConfig.host_slots``).
4. The reply header is ``{"wall_s", "cpu_s", "experts_cpu_s", "io_s", "throttle_s"}`` (and
   ``"error"``, ``"message"`` when the handler raised), the body the handler's response as the
   Lambda runtime returns it (:func:`marshal_response`: raw bytes as they are, else JSON).
   ``experts_cpu_s`` is the CPU time inside ``handler_template.run_experts`` (the expert
   matmuls); the rest of ``cpu_s`` is decoding the event and writing the response.

Requests also carry ``"limit"``, the payload limit in bytes the handler enforces on a
direct-channel response.

CPU share: a function with ``v < 1`` vCPU is throttled by a duty cycle: after the handler's
computation, the worker sleeps until ``wall >= cpu / v``, so it gets at most a ``v`` share of a
core over the invocation, as Lambda's CPU quota gives. The sleep comes after the work, not
interleaved with it (Lambda throttles within its quota periods), which changes when the work
happens, not how long the invocation takes. The emulator bills ``cpu / v`` from the reported
CPU time (``emulator.handler_duration_s``), so a host busier than the share leaves the bill
alone. Shares of 1 vCPU or more get one thread here (this host cannot give each function its
own cores); the emulator scales their duration by the modelled speedup.

It knows nothing of plans, prices or billing; the emulator measures and bills.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from moeserve.serverless.handler_template import MALLOC_ENVIRONMENT

_FRAME = struct.Struct(">II")


def read_frame(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """One (header, body) frame from ``stream``; None at end of stream."""
    prefix = stream.read(_FRAME.size)
    if len(prefix) < _FRAME.size:
        return None
    header_length, body_length = _FRAME.unpack(prefix)
    header = json.loads(stream.read(header_length)) if header_length else {}
    body = stream.read(body_length) if body_length else b""
    return header, body


def frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    """The bytes of one frame (see the module docstring)."""
    encoded = json.dumps(header).encode()
    return _FRAME.pack(len(encoded), len(body)) + encoded + body


class ExpertsTimer:
    """Wraps ``handler_template.run_experts`` to add up its CPU time (instrumentation, like a tracing span)."""

    def __init__(self, run_experts: Any) -> None:
        self.run_experts = run_experts
        self.cpu_s = 0.0

    def __call__(self, *args: Any) -> Any:
        start = time.thread_time()
        try:
            return self.run_experts(*args)
        finally:
            self.cpu_s += time.thread_time() - start


def json_response_bytes(response: bytes) -> int:
    """Bytes of ``response`` that were JSON-encoded: all of a JSON object's, none of raw bytes."""
    return len(response) if response[:1] == b"{" else 0


def marshal_response(result: Any) -> bytes:
    """The bytes the Lambda Python runtime returns for a handler's result: ``bytes`` as they are,
    anything else as JSON (awslambdaric's ``LambdaMarshaller.marshal_response``)."""
    if isinstance(result, bytes):
        return result
    return json.dumps(result).encode()


def serve_request(
    request: dict[str, Any],
    body: bytes,
    weights: Any,
    handler: Any,
    timer: ExpertsTimer,
    computed: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """Serve one request (header ``request``, event ``body``): the reply header and the response bytes.

    ``handler`` is the handler module, whose ``run_experts`` must be ``timer`` for
    ``experts_cpu_s`` to be counted. ``computed`` (if given) is called once the answer is
    computed, before the CPU-share sleep. Also used by ``perf.calibrate``, so the cost model is
    calibrated on exactly this code path.
    """
    start, cpu_start = time.perf_counter(), time.thread_time()
    timer.cpu_s = 0.0
    io_seconds = 0.0
    reply: dict[str, Any] = {}
    response = b""
    try:
        event = json.loads(body)
        if request.get("input_path"):
            # The deployed object-store path, with local files for S3 and the modelled GET/PUT slept.
            def read(path: str) -> bytes:
                nonlocal io_seconds
                with open(path, "rb") as handle:
                    raw = handle.read()
                time.sleep(request["get_s"])
                io_seconds += request["get_s"]
                return raw

            def write(path: str, data: bytes) -> None:
                nonlocal io_seconds
                with open(path, "wb") as handle:
                    handle.write(data)
                time.sleep(request["put_s"])
                io_seconds += request["put_s"]

            event = dict(event, input_key=request["input_path"], output_key=request["output_path"])
            response = marshal_response(handler.handle_object_store(event, weights, read, write))
        else:
            response = marshal_response(handler.handle(event, weights, limit=request["limit"]))
    except Exception as error:  # noqa: BLE001 - any handler failure is the invocation's error, as Lambda reports it
        reply = {"error": type(error).__name__, "message": str(error)}
        response = b""
    cpu = time.thread_time() - cpu_start
    if computed is not None:
        computed()
    busy_wall = time.perf_counter() - start - io_seconds
    throttle = 0.0
    vcpus = float(request["vcpus"])
    if vcpus < 1.0 and cpu / vcpus > busy_wall:
        throttle = cpu / vcpus - busy_wall
        time.sleep(throttle)
    reply.update(
        wall_s=time.perf_counter() - start,
        cpu_s=cpu,
        experts_cpu_s=timer.cpu_s,
        io_s=io_seconds,
        throttle_s=throttle,
    )
    return reply, response


def expert_loads(experts: int, mean_tokens: int, rng: Any) -> Any:
    """int64 [experts]: tokens per expert for one timed invocation, averaging ``mean_tokens``.

    ``mean_tokens == 1``: one token each (decode-sized batches). Otherwise each load is
    ``mean_tokens + d`` with integer ``d`` uniform in ``[-h, h]``, ``h = mean_tokens // 2``, in
    pairs ``+d, -d`` (with an odd number of experts, one of them gets ``mean_tokens``), so the
    loads of several experts sum to ``experts * mean_tokens`` exactly; a single expert gets
    ``d`` with a random sign, which averages ``mean_tokens`` over repeats. The row counts the
    matmuls see thus take every residue, as routed loads do.
    """
    import numpy as np

    half = mean_tokens // 2
    if half == 0:
        return np.full(experts, max(mean_tokens, 1), dtype=np.int64)
    if experts == 1:
        return np.array([mean_tokens + int(rng.integers(-half, half + 1))], dtype=np.int64)
    offsets = rng.integers(0, half + 1, size=experts // 2)  # [n // 2]
    paired = np.concatenate([offsets, -offsets, np.zeros(experts % 2, dtype=offsets.dtype)])  # [n]
    return (mean_tokens + rng.permutation(paired)).astype(np.int64)


def measure_handler(spec: dict[str, Any]) -> list[list[float]]:
    """Time :func:`serve_request` on direct-channel events; the timing half of ``perf.calibrate``.

    ``spec``: ``hidden``, ``intermediate`` (the expert shape), ``pool`` (experts held, used in
    rotation so each invocation reads cold weights), ``flush_bytes`` (a buffer written before
    each invocation to evict the caches), ``pairs`` ([experts, mean tokens per expert]),
    ``repeats`` (after one warm-up round), ``seed``. Pairs run round-robin. Returns one row per
    timed invocation: [experts, assignments, experts CPU s, rest CPU s, JSON bytes (request, and
    the response when it is JSON; a raw-bytes response is not encoded), experts given exactly one
    token]. ``dtype``: the wire dtype (default float32).

    Tokens per expert are unequal, as routing makes them (:func:`expert_loads`): a pair
    ``[n, t]`` with ``t > 1`` gives its experts loads spread around ``t``, drawn afresh each
    repeat. Equal loads at the grid's round values would time only the BLAS kernel's fastest
    case (row counts that are multiples of its unroll); real invocations mostly miss it.
    ``idle_s`` (default 0): seconds the process sleeps before each invocation, as an instance
    waits for its next request.
    """
    import math

    import numpy as np

    from moeserve.serverless import handler_template

    hidden, intermediate, pool = int(spec["hidden"]), int(spec["intermediate"]), int(spec["pool"])
    rng = np.random.default_rng(int(spec["seed"]))

    def matrices(rows: int, columns: int) -> Any:
        """[pool, rows, columns], input-major (``rows`` is the fan-in), as the handler holds them."""
        return rng.standard_normal((pool, rows, columns), dtype=np.float32) / np.float32(math.sqrt(rows))

    weights = handler_template.ExpertWeights(
        np.arange(pool, dtype=np.int64), matrices(hidden, 2 * intermediate), matrices(intermediate, hidden)
    )
    timer = ExpertsTimer(handler_template.run_experts)
    handler_template.run_experts = timer  # type: ignore[assignment]
    request = {"vcpus": 1.0, "limit": 2**62}
    scratch = np.empty(int(spec["flush_bytes"]), dtype=np.uint8)
    timings: list[list[float]] = []
    dtype = str(spec.get("dtype", "float32"))
    idle = float(spec.get("idle_s", 0.0))
    cursor = 0
    for round_index in range(int(spec["repeats"]) + 1):
        for n, t in spec["pairs"]:
            ids = (cursor + np.arange(n)) % pool  # [n], the next experts of the rotation
            cursor = (cursor + n) % pool
            loads = expert_loads(n, t, rng)  # [n] tokens per expert, spread around t
            count = int(loads.sum())
            # With two or more experts each token row goes to two of them (top-2 inside the
            # function), so rows per assignment vary across the grid as in real plans.
            tokens = (
                max(math.ceil(count / 2), int(loads.max())) if n > 1 else count
            )  # a row at most once per expert
            rows = (
                np.arange(count) % tokens
            )  # [A]: each expert's assignments are consecutive, so distinct rows
            order = np.argsort(rows, kind="stable")  # the gate sends assignments in token order
            rows, experts = rows[order], np.repeat(ids, loads)[order]  # [A], [A]
            x = rng.standard_normal((tokens, hidden), dtype=np.float32)  # [T, D]
            gate = rng.random(count, dtype=np.float32)  # [A]
            event = handler_template.encode_request(x, rows, experts, gate, dtype, limit=2**62)
            body = json.dumps(event).encode()
            # Between invocations an instance sleeps its duty cycle while other processes run:
            # it starts each one with cold caches, so the timing does too. It also starts each
            # after idling (waiting for its next request), which costs CPU time on this host
            # (measured: +4% after 50 ms, +8-10% after 0.2-0.5 s); ``idle_s`` idles first.
            scratch.fill(round_index & 0xFF)
            time.sleep(idle)
            reply, response = serve_request(request, body, weights, handler_template, timer)
            if "error" in reply:
                raise RuntimeError(f"the handler failed while calibrating: {reply['message']}")
            if round_index:
                experts_s = float(reply["experts_cpu_s"])
                timings.append(
                    [
                        n,
                        count,
                        experts_s,
                        float(reply["cpu_s"]) - experts_s,
                        len(body) + json_response_bytes(response),
                        int((loads == 1).sum()),
                    ]
                )
    return timings


ONE_THREAD_ENVIRONMENT = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    **MALLOC_ENVIRONMENT,
}
"""Set for every worker process: one BLAS thread, as ``perf.speedup`` models more vCPUs separately,
and the malloc settings the exported template gives every function (``handler_template.MALLOC_ENVIRONMENT``)."""


def main() -> None:
    """Run the INIT phase, then serve requests from stdin until it closes.

    With ``--calibrate``: read a :func:`measure_handler` spec (JSON) from stdin instead, and write
    its rows (JSON) to stdout.
    """
    if sys.argv[1:] == ["--calibrate"]:
        sys.stdout.write(json.dumps(measure_handler(json.loads(sys.stdin.read()))))
        return
    load_start = time.perf_counter()
    from moeserve.serverless import handler_template

    weights = handler_template.current_weights()
    timer = ExpertsTimer(handler_template.run_experts)
    # handle() looks run_experts up in its module at call time, so the timer sees every call.
    handler_template.run_experts = timer  # type: ignore[assignment]
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(frame({"ready": True, "load_s": time.perf_counter() - load_start}))
    stdout.flush()

    def computed() -> None:
        stdout.write(frame({"computed": True}))
        stdout.flush()

    while (message := read_frame(stdin)) is not None:
        header, response = serve_request(*message, weights, handler_template, timer, computed)
        stdout.write(frame(header, response))
        stdout.flush()


if __name__ == "__main__":
    main()
