"""Run a serverless plan locally: expert functions as worker processes, billed like Lambda.

Shape legend: L MoE layers run, T tokens, B tokens per batch, K experts per token (top_k),
D hidden size, E experts per layer, G functions of a layer, r replicas, m micro-batches.

Every function of the plan (:class:`~moeserve.serverless.plan.FunctionPlan`) becomes a pool
of ``replicas`` instances; an instance is a process running the handler ``serverless export``
deploys (:mod:`function_worker`, numpy only) with that function's experts written to a weights
file, as the exported package holds them. Lambda's rules are emulated:

* **memory**: a watchdog thread reads every instance's peak resident size (``VmHWM`` in
  ``/proc``, so Linux only) every few ms and after each invocation; above the function's memory
  it kills the process and the invocation (or cold start) fails with ``out_of_memory``;
* **CPU share**: below 1 vCPU (``memory / 1,769 MB``) the worker sleeps after computing until
  its wall time is ``cpu time / share`` (a duty cycle; see :mod:`function_worker`), and that
  is the billed duration (:func:`handler_duration_s`): the handler's measured CPU time at the
  function's share. Wall time above it is this host's contention -- 2 cores shared by every
  function and whatever else runs -- which Lambda would not bill; the report gives the ratio.
  At 1 vCPU or more a worker still has one thread (this host cannot give functions their own
  cores) and the CPU time is divided by the modelled ``perf.speedup`` (lines marked ``scaled``);
* **cold starts**: process start plus imports plus weight load, measured from spawning the
  process to its first reply, billed as INIT duration (see :mod:`ledger`);
* **payload**: direct-channel requests are the handler's JSON events, refused above the 6 MB
  synchronous limit (:class:`PayloadLimitError`) before anything is sent; the handler refuses
  responses above it;
* **timeout**: an invocation not answered within ``timeout_s`` is killed, billed for the
  timeout and fails with ``timeout``;
* **concurrency**: at most ``concurrency_limit`` invocations run at once across all functions
  (waits are counted as throttles), and a function never has more instances than replicas.

The gate replays routing -- the reference model's own (each MoE layer's input, router
decision and in-process output captured by hooks) or a trace's (random inputs) -- and drives
the pipelined scatter-gather: per layer and batch, each function's token-assignments are split
over its replicas and each replica's share into ``m`` micro-batches; a replica's lane encodes
(and, with ``network="modelled"``, waits the modelled transfer time of) micro-batch ``j + 1``
while ``j`` computes, and gathers ``j`` while ``j + 1`` computes. Layers run as a pipeline: a
batch enters layer ``l`` once layer ``l - 1`` has finished it, so different layers work on
different batches, as the cost model assumes.

What is measured and what is modelled (the report says it again): handler CPU and wall time,
cold starts, resident memory, outputs and the bill computed from them are measured here; the
CPU share turns measured CPU time into billed time (a duty cycle also shapes the wall time
below 1 vCPU; above it the speedup is modelled); network and object-store transfer times are
the cost model's constants, slept, not measured; and the host is a shared 2-core machine, not
Lambda, so measured throughput is this host's. The prediction next to the measurement comes
from :func:`moeserve.serverless.plan.evaluate_plan` on the same plan and the loads the run
actually replayed, with the calibration ``serverless plan`` uses (``perf.cached_calibration``:
the deployed handler timed on this machine at the plan's shape); the report also re-evaluates
it with the handler constants fitted to this run's measured times and re-prices the bill
without payload (de)serialisation, so a gap can be traced to calibration, to serialisation,
or to neither. ``moeserve serverless run``
is the command line for :func:`emulate_plan`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from moeserve.env import available_cores
from moeserve.errors import MoeserveError
from moeserve.serverless import handler_template
from moeserve.serverless.function_worker import ONE_THREAD_ENVIRONMENT, frame
from moeserve.serverless.ledger import Ledger, LedgerEntry, line_cost
from moeserve.serverless.perf import (
    DEFAULT_CALIBRATION,
    DEFAULT_CALIBRATION_PATH,
    Calibration,
    PerfConstants,
    cached_calibration,
    compute_seconds,
    device_name,
    fit_expert_seconds,
    fit_nonnegative,
    handler_overhead_seconds,
    handler_payload,
    speedup,
    transfer_seconds,
)
from moeserve.serverless.plan import (
    CostModel,
    DeploymentPlan,
    FunctionPlan,
    PlanEvaluation,
    Workload,
    evaluate_plan,
)
from moeserve.serverless.prices import BYTES_PER_MB
from moeserve.serverless.shapes import ExpertShape, checkpoint_shape, shape_mismatch
from moeserve.serverless.weights import CheckpointWeights, ExpertWeightsSource, RandomWeights

NETWORK_MODES = ("modelled", "none")
BILL_TOLERANCE = 0.10
"""The bar: the measured bill within this fraction of the cost model's prediction."""
_FRAME_HEADER = 8
_HOST_MEMORY_SHARE = 0.8
"""Most of the host's available memory the instances' weights may take."""


class EmulatorError(MoeserveError):
    """The emulator cannot run this plan as asked (shapes disagree, not enough host memory, ...)."""


class PayloadLimitError(EmulatorError):
    """A direct-channel request would exceed Lambda's synchronous payload limit."""


class FunctionFailedError(EmulatorError):
    """An invocation or cold start failed: ``outcome`` is timeout, out_of_memory or error; ``entry`` its ledger line."""

    def __init__(self, message: str, outcome: str, entry: LedgerEntry | None) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.entry = entry


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator enforces Lambda's rules. Every field is validated on construction."""

    timeout_s: float = 60.0
    """Invocation timeout (the exported template's default); > 0 and at most Lambda's 900 s."""
    init_timeout_s: float = 10.0
    """Longest cold start (Lambda limits the INIT phase of on-demand functions to 10 s)."""
    concurrency_limit: int | None = None
    """Invocations in flight at once across all functions; None: the price file's account default (1,000)."""
    network: str = "modelled"
    """``modelled``: the gate waits the cost model's transfer times; ``none``: local pipes only."""
    prewarm: bool = True
    """Start every instance before the replay, so the timed replay is warm (cold starts still billed)."""
    bill_init: bool = True
    """Bill cold starts (INIT) as duration, as Lambda does for on-demand functions since 2025-08."""
    watchdog_interval_s: float = 0.005
    """How often the memory watchdog reads every instance's resident size."""
    parallel_starts: int = 2
    """Instances started at once while prewarming (this host has 2 cores)."""
    host_slots: int | None = None
    """Invocations that may compute at once on this host; None: the cores this process may run
    on; 0: no limit. Lambda gives every function its own CPU share; here the emulated functions
    share the host's cores, and more of them computing than there are cores time-slice each other,
    which costs CPU time in refilled caches (four calibration-style workers on two cores: +4.2%
    per invocation, measured) that a function would not pay. Invocations past the slots wait for
    one (unbilled: the wait lowers the measured throughput, not the bill); a slot is freed when
    the handler has computed, before its CPU-share sleep."""
    work_dir: Path | None = None
    """Where the functions' weights files and object-store exchange go; None: a temporary folder."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= 900):
            raise ValueError(f"timeout_s must be in (0, 900], got {self.timeout_s}")
        if not (math.isfinite(self.init_timeout_s) and self.init_timeout_s > 0):
            raise ValueError(f"init_timeout_s must be > 0, got {self.init_timeout_s}")
        if self.concurrency_limit is not None and self.concurrency_limit < 1:
            raise ValueError(f"concurrency_limit must be >= 1, got {self.concurrency_limit}")
        if self.network not in NETWORK_MODES:
            raise ValueError(f"network must be one of {NETWORK_MODES}, got {self.network!r}")
        if not self.watchdog_interval_s > 0:
            raise ValueError(f"watchdog_interval_s must be > 0, got {self.watchdog_interval_s}")
        if self.parallel_starts < 1:
            raise ValueError(f"parallel_starts must be >= 1, got {self.parallel_starts}")
        if self.host_slots is not None and self.host_slots < 0:
            raise ValueError(f"host_slots must be >= 0 (0: no limit), got {self.host_slots}")


# -- what the gate replays -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayInputs:
    """Per MoE layer: its input rows, the router's decision, and (when known) its in-process output.

    Contract: ``hidden`` float32 [L, T, D]; ``topk_ids`` int64 [L, T, K] (-1: unknown, not sent);
    ``topk_weights`` float32 [L, T, K]; ``reference`` None or float32 [L, T, D].
    """

    hidden: np.ndarray
    topk_ids: np.ndarray
    topk_weights: np.ndarray
    reference: np.ndarray | None
    source: str
    """Where the routing and inputs came from, for reports."""

    def __post_init__(self) -> None:
        layers, tokens, _ = self.hidden.shape
        if self.topk_ids.shape[:2] != (layers, tokens) or self.topk_weights.shape != self.topk_ids.shape:
            raise ValueError(
                f"topk_ids and topk_weights must be [{layers}, {tokens}, K], got {self.topk_ids.shape} "
                f"and {self.topk_weights.shape}"
            )
        if self.reference is not None and self.reference.shape != self.hidden.shape:
            raise ValueError(f"reference must be {self.hidden.shape}, got {self.reference.shape}")

    @property
    def num_layers(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[1])


def model_replay(model: Any, token_ids: Any, layers: int | None = None, chunk: int = 1024) -> ReplayInputs:
    """Capture every MoE layer's input, routing and output while ``model`` (a ``MoEModel``) runs ``token_ids``.

    ``token_ids`` int [T] is run as sequences of at most ``chunk`` tokens. Forward hooks on the
    model's :class:`~moeserve.moe.layer.MoELayer` modules see exactly what the in-process layer
    computes; ``reference`` is its output, which the emulated layer must reproduce.
    """
    import torch

    count = len(model.layers) if layers is None else layers
    captured: list[list[tuple[Any, ...]]] = [[] for _ in range(count)]

    def hook(index: int) -> Callable[..., None]:
        def record(_module: Any, args: tuple[Any, ...], output: Any) -> None:
            hidden, routing = args
            captured[index].append((hidden, routing.topk_ids, routing.topk_weights, output))

        return record

    handles = [model.layers[i].register_forward_hook(hook(i)) for i in range(count)]
    try:
        with torch.inference_mode():
            for start in range(0, len(token_ids), chunk):
                model.hf_model(input_ids=token_ids[None, start : start + chunk], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    def stack(position: int, dtype: Any) -> np.ndarray:
        return np.stack(
            [torch.cat([call[position] for call in calls]).to(dtype).numpy() for calls in captured]
        )

    return ReplayInputs(
        hidden=stack(0, torch.float32),
        topk_ids=stack(1, torch.int64),
        topk_weights=stack(2, torch.float32),
        reference=stack(3, torch.float32),
        source=f"{model.name}'s own routing on {len(token_ids)} tokens (inputs and outputs captured in process)",
    )


def trace_replay(trace: Any, shape: ExpertShape, tokens: int, layers: int, seed: int = 0) -> ReplayInputs:
    """Routing of the first ``tokens`` tokens of ``trace`` (layers reused cyclically), random inputs.

    Gate weights are the trace's when it has them, else 1/K. Inputs are standard normal float32
    rows (seeded): a trace holds no hidden states, so outputs are not checked against a model.
    """
    if trace.meta.num_experts != shape.num_experts:
        raise EmulatorError(
            f"the trace has {trace.meta.num_experts} experts per layer, the plan's shape {shape.num_experts}"
        )
    if trace.num_tokens < tokens:
        raise EmulatorError(f"the trace has {trace.num_tokens} tokens, fewer than the {tokens} asked for")
    order = [layer % trace.num_layers for layer in range(layers)]
    ids = np.asarray(trace.experts[:tokens][:, order], dtype=np.int64).transpose(1, 0, 2)  # [L, T, K]
    if trace.weights is not None:
        weights = np.asarray(trace.weights[:tokens][:, order], dtype=np.float32).transpose(1, 0, 2)
    else:
        weights = np.full(ids.shape, 1.0 / ids.shape[2], dtype=np.float32)
    weights = np.where(ids >= 0, weights, 0.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((layers, tokens, shape.hidden_size), dtype=np.float32)
    note = f" ({trace.num_layers} trace layers reused cyclically)" if layers > trace.num_layers else ""
    return ReplayInputs(
        hidden, ids, weights, None, f"{trace.meta.model} trace, first {tokens} tokens{note}; random inputs"
    )


def handler_duration_s(
    cpu_s: float, experts_cpu_s: float, io_s: float, vcpus: float, constants: PerfConstants
) -> float:
    """Billed seconds of a handler that used ``cpu_s`` CPU seconds (one thread, ``experts_cpu_s`` of
    them in the expert matmuls) at a share of ``vcpus``.

    ``io_s + experts_cpu_s / perf.speedup(vcpus) + (cpu_s - experts_cpu_s) / min(vcpus, 1)``:
    below 1 vCPU the CPU time stretched by the share (what the worker's duty cycle makes its
    wall time when this host is not oversubscribed); from 1 vCPU up the matmuls shortened by the
    modelled multi-thread speedup, JSON and base64 not (they run on one thread), as the cost
    model has it. Wall time beyond this is contention on this host (other functions and
    processes sharing 2 cores), which Lambda would not bill.
    """
    rest = max(cpu_s - experts_cpu_s, 0.0)
    return io_s + experts_cpu_s / float(speedup(vcpus, constants)) + rest / min(vcpus, 1.0)


# -- function instances --------------------------------------------------------------------------


def _proc_status_kib(pid: int, key: str) -> int:
    """``key`` (e.g. VmHWM) of process ``pid`` in KiB from /proc; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


@dataclass(frozen=True)
class _FunctionSpec:
    layer: int
    index: int
    plan: FunctionPlan
    channel: str
    weights_path: Path
    vcpus: float

    @property
    def name(self) -> str:
        return f"layer {self.layer} function {self.index}"


class _Instance:
    """One worker process: an execution environment of a function. Serves one invocation at a time."""

    def __init__(self, spec: _FunctionSpec, replica: int, stderr_path: Path) -> None:
        self.spec = spec
        self.replica = replica
        self.stderr_path = stderr_path
        self.process: subprocess.Popen[bytes] | None = None
        self.killed_for: str | None = None
        """``out_of_memory`` or ``timeout`` once the emulator killed it."""
        self.peak_rss_kib = 0

    @property
    def cap_kib(self) -> int:
        return self.spec.plan.memory_mb * BYTES_PER_MB // 1024

    def start(self, deadline: float) -> tuple[float, float]:
        """Spawn the process and wait for its INIT; (cold start seconds, of which weight load). Raises on failure."""
        # The function's environment is the runtime's plus what the exported template sets; one
        # BLAS thread, because a share of at most one vCPU is what the duty cycle enforces.
        environment = {
            **os.environ,
            "MOESERVE_EXPERTS": ",".join(str(e) for e in self.spec.plan.experts),
            "MOESERVE_WEIGHTS_PATH": str(self.spec.weights_path),
            **ONE_THREAD_ENVIRONMENT,
        }
        self.stop()
        self.killed_for, self.peak_rss_kib = None, 0
        started = time.perf_counter()
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moeserve.serverless.function_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=environment,
            )
        header, _ = self._read(deadline)
        return time.perf_counter() - started, float(header["load_s"])

    def invoke(
        self, header: dict[str, Any], body: bytes, deadline: float, computed: Callable[[], None] = lambda: None
    ) -> tuple[dict[str, Any], bytes]:
        """Send one request; the reply. ``computed`` runs when the worker says it has computed (before its CPU-share sleep)."""
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write(frame(header, body))
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise EOFError("the instance's process is gone") from None
        marker, _ = self._read(deadline)
        if not marker.get("computed"):
            raise EOFError(f"the instance's process broke the protocol: {marker!r} instead of the computed marker")
        computed()
        reply = self._read(deadline)
        self.peak_rss_kib = max(self.peak_rss_kib, _proc_status_kib(self.process.pid, "VmHWM"))
        if self.peak_rss_kib > self.cap_kib and self.killed_for is None:
            # The spike fell between two watchdog reads; Lambda would have killed it mid-invocation.
            self.kill("out_of_memory")
            raise EOFError("killed for memory")
        return reply

    def _read(self, deadline: float) -> tuple[dict[str, Any], bytes]:
        """One reply frame; ``TimeoutError`` past ``deadline``, ``EOFError`` if the process died."""
        assert self.process is not None and self.process.stdout is not None
        descriptor = self.process.stdout.fileno()
        prefix = self._read_exact(descriptor, _FRAME_HEADER, deadline)
        header_length, body_length = int.from_bytes(prefix[:4], "big"), int.from_bytes(prefix[4:], "big")
        header = json.loads(self._read_exact(descriptor, header_length, deadline))
        return header, self._read_exact(descriptor, body_length, deadline)

    @staticmethod
    def _read_exact(descriptor: int, count: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        remaining = count
        while remaining:
            wait = deadline - time.perf_counter()
            if wait <= 0 or not select.select([descriptor], [], [], wait)[0]:
                raise TimeoutError
            chunk = os.read(descriptor, min(remaining, 1 << 20))
            if not chunk:
                raise EOFError("the instance's process exited")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def poll_memory(self) -> None:
        """The watchdog's check: kill the process if its peak resident size passed the function's memory."""
        process = self.process
        if process is None or process.poll() is not None or self.killed_for is not None:
            return
        self.peak_rss_kib = max(self.peak_rss_kib, _proc_status_kib(process.pid, "VmHWM"))
        if self.peak_rss_kib > self.cap_kib:
            self.kill("out_of_memory")

    def kill(self, reason: str) -> None:
        self.killed_for = reason
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(BrokenPipeError, ValueError, OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.kill("stopped")
                self.process.wait()
        for stream in (self.process.stdout, self.process.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def stderr_tail(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""
        return text[-600:]


# -- the emulator --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerTiming:
    layer: int
    batch: int
    started_s: float
    ended_s: float

    @property
    def seconds(self) -> float:
        return self.ended_s - self.started_s


@dataclass
class _RunState:
    """Mutable state of one run, shared by the gate's threads."""

    started: float
    outputs: np.ndarray
    timings: list[LayerTiming] = field(default_factory=list)
    throttled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Emulator:
    """Emulated Lambda functions for one plan; use as a context manager (instances are processes).

    ``plan`` may have more layers than are run; layer ``l`` of the run uses ``plan.layers[l]``.
    ``weights`` supplies each function's experts. Construction writes every function's weights
    file (``EmulatorError`` if their instances would not fit the host's available memory).
    """

    def __init__(
        self,
        plan: DeploymentPlan,
        shape: ExpertShape,
        weights: ExpertWeightsSource,
        layers: int,
        model: CostModel | None = None,
        config: EmulatorConfig | None = None,
    ) -> None:
        if not 1 <= layers <= len(plan.layers):
            raise EmulatorError(f"layers must be in 1..{len(plan.layers)} (the plan's layers), got {layers}")
        self.plan = DeploymentPlan(plan.layers[:layers], plan.found_by)
        self.shape = dataclasses.replace(shape, num_layers=layers)
        self.weights = weights
        self.model = model or CostModel()
        self.config = config or EmulatorConfig()
        self.limits = self.model.prices.lambda_prices
        self.ledger = Ledger(self.limits, self.model.architecture)
        self.concurrency_limit = self.config.concurrency_limit or self.limits.default_concurrency
        self._slots = threading.BoundedSemaphore(self.concurrency_limit)
        self.host_slots = (
            available_cores() if self.config.host_slots is None else self.config.host_slots
        )
        self._host = threading.BoundedSemaphore(self.host_slots) if self.host_slots else None
        self._throttle_lock = threading.Lock()
        self.throttled = 0
        """Invocations that found every concurrency slot taken and waited."""
        self._check_plan()
        self._temporary = None
        if self.config.work_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="moeserve-emulator-")
            self.work_dir = Path(self._temporary.name)
        else:
            self.work_dir = Path(self.config.work_dir)
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.specs = self._write_weights()
        self.instances: dict[tuple[int, int], list[_Instance]] = {
            (s.layer, s.index): [
                _Instance(s, r, self.work_dir / f"layer{s.layer}-function{s.index}-replica{r}.stderr")
                for r in range(s.plan.replicas)
            ]
            for s in self.specs
        }
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="memory-watchdog", daemon=True)
        self._watchdog.start()

    # -- set-up --

    def _check_plan(self) -> None:
        for index, layer in enumerate(self.plan.layers):
            held = sorted(e for f in layer.functions for e in f.experts)
            if held != list(range(self.shape.num_experts)):
                raise EmulatorError(
                    f"plan layer {index} does not hold experts 0..{self.shape.num_experts - 1} once each"
                )
            for g, function in enumerate(layer.functions):
                try:
                    self.limits.check_memory(function.memory_mb)
                except ValueError as error:
                    raise EmulatorError(f"layer {index} function {g}: {error}") from None
        needed = sum(
            len(f.experts) * self.shape.expert_bytes * f.replicas
            for layer in self.plan.layers
            for f in layer.functions
        )
        available = _proc_meminfo_bytes("MemAvailable")
        if available and needed > _HOST_MEMORY_SHARE * available:
            raise EmulatorError(
                f"the instances of {len(self.plan.layers)} layer(s) hold {needed / 2**30:.1f} GiB of weights; this host "
                f"has {available / 2**30:.1f} GiB available; run fewer layers"
            )

    def _write_weights(self) -> list[_FunctionSpec]:
        """Write each function's weights file, flushed to disk before any instance starts.

        Without the flush the kernel writes the files back ~30 s later (its dirty-page expiry),
        in the middle of the timed replay: gigabytes of writeback competing with the functions
        for this host's CPUs and memory bandwidth (seen: 2.3 GB dirty during a DeepSeek run).
        """
        specs = []
        for index, layer in enumerate(self.plan.layers):
            for g, function in enumerate(layer.functions):
                path = self.work_dir / f"layer{index}-function{g}.npz"
                weights = self.weights.function_weights(index, function.experts)
                with path.open("wb") as handle:
                    handler_template.save_weights(handle, weights)
                    handle.flush()
                    os.fsync(handle.fileno())
                specs.append(
                    _FunctionSpec(
                        index, g, function, layer.channel, path, self.limits.vcpu_share(function.memory_mb)
                    )
                )
        return specs

    def _watch(self) -> None:
        while not self._stop.wait(self.config.watchdog_interval_s):
            for pool in self.instances.values():
                for instance in pool:
                    instance.poll_memory()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every instance and the watchdog; remove the temporary folder."""
        self._stop.set()
        for pool in self.instances.values():
            for instance in pool:
                instance.stop()
        self._watchdog.join(timeout=1)
        if self._temporary is not None:
            self._temporary.cleanup()

    def _now(self) -> float:
        return time.perf_counter() - self._started

    # -- cold starts --

    def start_instance(self, instance: _Instance) -> None:
        """Cold-start ``instance`` (measured and billed); ``FunctionFailedError`` if INIT fails."""
        spec = instance.spec
        began = self._now()
        outcome, message = "ok", ""
        load = 0.0
        try:
            cold, load = instance.start(time.perf_counter() + self.config.init_timeout_s)
        except TimeoutError:
            cold = self._now() - began
            instance.kill("timeout")
            outcome = "timeout"
            message = f"{spec.name} replica {instance.replica}: INIT took longer than {self.config.init_timeout_s} s"
        except (EOFError, json.JSONDecodeError, KeyError):
            cold = self._now() - began
            if instance.killed_for == "out_of_memory":
                outcome = "out_of_memory"
                message = (
                    f"{spec.name} replica {instance.replica}: out of memory during INIT: peak resident "
                    f"{instance.peak_rss_kib / 1024:.0f} MB over the function's {spec.plan.memory_mb} MB; it was killed"
                )
            else:
                outcome = "error"
                message = f"{spec.name} replica {instance.replica}: INIT failed: {instance.stderr_tail()}"
        entry = None
        if self.config.bill_init or outcome != "ok":
            entry = self.ledger.bill(
                "init",
                spec.plan.memory_mb,
                cold * 1000.0,
                outcome,
                layer=spec.layer,
                function=spec.index,
                replica=instance.replica,
                batch=-1,
                micro_batch=-1,
                wall_s=cold,
                io_s=load,
                max_rss_mb=_proc_status_kib(instance.process.pid, "VmHWM") / 1024
                if instance.process
                else 0.0,
                started_s=began,
                ended_s=self._now(),
            )
        if outcome != "ok":
            raise FunctionFailedError(message, outcome, entry)

    def prewarm(self) -> None:
        """Cold-start every instance of every function, ``parallel_starts`` at a time."""
        everything = [instance for pool in self.instances.values() for instance in pool]
        with ThreadPoolExecutor(self.config.parallel_starts) as pool:
            for future in [pool.submit(self.start_instance, i) for i in everything]:
                future.result()

    # -- invocations --

    def invoke(
        self,
        layer: int,
        function: int,
        replica: int,
        x: np.ndarray,
        experts: np.ndarray,
        batch: int = 0,
        micro_batch: int = 0,
        rows: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> np.ndarray:
        """Invoke one instance on token rows ``x`` float32 [T, D] and assignments ``experts`` int [A]; outputs float32 [T, D].

        Assignment ``a`` sends row ``rows[a]`` (default: ``a``, one assignment per row) to
        ``experts[a]`` with routing weight ``weights[a]`` (default 1); output row ``t`` is the
        weighted sum of its experts' outputs, in the layer's wire dtype.

        Cold-starts the instance first if it is not running. Raises :class:`PayloadLimitError`
        before sending a direct-channel request over the synchronous limit, and
        :class:`FunctionFailedError` (after billing the line) on timeout, out of memory or a
        handler error.
        """
        return self._deliver(
            layer,
            function,
            replica,
            self._encode(
                layer,
                function,
                x,
                np.arange(len(experts)) if rows is None else rows,
                experts,
                np.ones(len(experts), dtype=np.float32) if weights is None else weights,
            ),
            batch,
            micro_batch,
        )

    def _encode(
        self,
        layer: int,
        function: int,
        x: np.ndarray,
        rows: np.ndarray,
        experts: np.ndarray,
        weights: np.ndarray,
    ) -> _Request:
        spec = self._spec(layer, function)
        dtype = self.plan.layers[layer].wire_dtype
        tokens = int(x.shape[0])
        loads = np.unique(experts, return_counts=True)[1]  # [touched] assignments per expert
        touched, singles = int(loads.size), int((loads == 1).sum())
        if spec.channel == "direct":
            try:
                event = handler_template.encode_request(
                    x, rows, experts, weights, dtype, limit=self.limits.payload_limit_bytes("synchronous")
                )
            except handler_template.PayloadTooLargeError as error:
                raise PayloadLimitError(f"{spec.name}: {error}") from None
            body = json.dumps(event).encode()
            return _Request(spec, tokens, len(experts), touched, dtype, body, None, singles)
        data = handler_template.rows_to_wire(x, dtype)
        event = handler_template.encode_assignments(x.shape, rows, experts, weights, dtype)
        return _Request(spec, tokens, len(experts), touched, dtype, json.dumps(event).encode(), data, singles)

    def _spec(self, layer: int, function: int) -> _FunctionSpec:
        return self.instances[(layer, function)][0].spec

    def _deliver(
        self, layer: int, function: int, replica: int, request: _Request, batch: int, micro_batch: int
    ) -> np.ndarray:
        instance = self.instances[(layer, function)][replica]
        if instance.process is None or instance.process.poll() is not None:
            # Never started, or killed (timeout, memory): Lambda gives the next call a new environment.
            self.start_instance(instance)
        spec = instance.spec
        if not self._slots.acquire(blocking=False):
            # Lambda answers a synchronous invoke over the limit with a throttle; the gate retries.
            with self._throttle_lock:
                self.throttled += 1
            self._slots.acquire()
        try:
            return self._run_invocation(instance, spec, request, batch, micro_batch)
        finally:
            self._slots.release()

    def _host_slot(self) -> Callable[[], None]:
        """Wait for a host slot (``EmulatorConfig.host_slots``); the function that frees it (idempotent)."""
        host = self._host
        if host is None:
            return lambda: None
        host.acquire()
        freed = threading.Event()

        def free() -> None:
            if not freed.is_set():
                freed.set()
                host.release()

        return free

    def _run_invocation(
        self, instance: _Instance, spec: _FunctionSpec, request: _Request, batch: int, micro_batch: int
    ) -> np.ndarray:
        header: dict[str, Any] = {
            "vcpus": spec.vcpus,
            "limit": self.limits.payload_limit_bytes("synchronous"),
        }
        if request.data is not None:
            stem = (
                self.work_dir
                / f"exchange-l{spec.layer}-f{spec.index}-r{instance.replica}-b{batch}-m{micro_batch}"
            )
            Path(f"{stem}.in").write_bytes(request.data)
            _, get_s = transfer_seconds(len(request.data), "object_store", self.model.constants)
            put_s, _ = transfer_seconds(len(request.data), "object_store", self.model.constants)
            header.update(
                input_path=f"{stem}.in", output_path=f"{stem}.out", get_s=float(get_s), put_s=float(put_s)
            )
        free_host_slot = self._host_slot()
        began = self._now()
        outcome, body = "ok", b""
        reply: dict[str, Any] = {}
        try:
            reply, body = instance.invoke(
                header, request.body, time.perf_counter() + self.config.timeout_s, free_host_slot
            )
        except TimeoutError:
            instance.kill("timeout")
            outcome = "timeout"
        except EOFError:
            outcome = "out_of_memory" if instance.killed_for == "out_of_memory" else "error"
        finally:
            free_host_slot()
        ended = self._now()
        if outcome == "ok" and "error" in reply:
            outcome = "error"
        wall = float(reply.get("wall_s", ended - began))
        duration, scaled = wall, False
        if outcome == "timeout":
            duration = self.config.timeout_s
        elif "cpu_s" in reply:  # the handler ran to an answer (a result or its own error)
            duration = handler_duration_s(
                float(reply["cpu_s"]),
                float(reply["experts_cpu_s"]),
                float(reply["io_s"]),
                spec.vcpus,
                self.model.constants,
            )
            scaled = spec.vcpus >= 1.0
        entry = self.ledger.bill(
            "invoke",
            spec.plan.memory_mb,
            duration * 1000.0,
            outcome,
            layer=spec.layer,
            function=spec.index,
            replica=instance.replica,
            batch=batch,
            micro_batch=micro_batch,
            tokens=request.assignments,
            experts_touched=request.experts_touched,
            single_token_experts=request.single_token_experts,
            rows=request.tokens,
            request_bytes=len(request.body) + (len(request.data) if request.data is not None else 0),
            response_bytes=len(body),
            json_bytes=len(request.body) + (len(body) if request.data is not None else 0),
            wall_s=wall,
            cpu_s=float(reply.get("cpu_s", 0.0)),
            experts_cpu_s=float(reply.get("experts_cpu_s", 0.0)),
            io_s=float(reply.get("io_s", 0.0)),
            scaled=scaled,
            max_rss_mb=instance.peak_rss_kib / 1024,
            started_s=began,
            ended_s=ended,
        )
        where = f"{spec.name} replica {instance.replica} (batch {batch}, micro-batch {micro_batch})"
        if outcome == "timeout":
            raise FunctionFailedError(
                f"{where}: timed out after {self.config.timeout_s} s; the instance was killed", outcome, entry
            )
        if outcome == "out_of_memory":
            raise FunctionFailedError(
                f"{where}: out of memory: peak resident {instance.peak_rss_kib / 1024:.0f} MB over the function's "
                f"{spec.plan.memory_mb} MB; the instance was killed",
                outcome,
                entry,
            )
        if outcome == "error":
            detail = f"{reply['error']}: {reply['message']}" if "error" in reply else instance.stderr_tail()
            raise FunctionFailedError(f"{where}: the handler failed: {detail}", outcome, entry)
        shape = (request.tokens, self.shape.hidden_size)
        if request.data is not None:
            out_path = Path(json.loads(body)["output_key"])
            y = handler_template.rows_from_wire(out_path.read_bytes(), request.dtype, shape)
            out_path.unlink()
            Path(header["input_path"]).unlink()
            return y
        return handler_template.rows_from_wire(body, request.dtype, shape)

    # -- the gate --

    def run(self, inputs: ReplayInputs, batch_tokens: int) -> EmulatorRun:
        """Replay ``inputs`` in batches of ``batch_tokens`` through every layer; the measured run.

        Tokens beyond the last whole batch are not sent. Raises what :meth:`invoke` raises.
        """
        if inputs.num_layers != len(self.plan.layers):
            raise EmulatorError(f"inputs cover {inputs.num_layers} layers, the run {len(self.plan.layers)}")
        if inputs.hidden.shape[2] != self.shape.hidden_size:
            raise EmulatorError(
                f"inputs have D={inputs.hidden.shape[2]}, the plan's shape {self.shape.hidden_size}"
            )
        if inputs.topk_ids.max() >= self.shape.num_experts:
            raise EmulatorError(
                f"routing names expert {inputs.topk_ids.max()}; the plan's shape has {self.shape.num_experts}"
            )
        batches = inputs.num_tokens // batch_tokens
        if batches < 1:
            raise EmulatorError(f"{inputs.num_tokens} tokens do not fill one batch of {batch_tokens}")
        if self.config.prewarm:
            self.prewarm()
        layers = len(self.plan.layers)
        state = _RunState(
            started=time.perf_counter(),
            outputs=np.zeros((layers, batches * batch_tokens, self.shape.hidden_size), dtype=np.float32),
        )
        throttled_before = self.throttled
        done = [[threading.Event() for _ in range(batches)] for _ in range(layers)]
        failed = threading.Event()
        lanes = max(sum(f.replicas for f in layer.functions) for layer in self.plan.layers)
        with (
            ThreadPoolExecutor(layers, thread_name_prefix="layer") as stages,
            ThreadPoolExecutor(4 * lanes * layers, thread_name_prefix="lane") as helpers,
        ):

            def stage(layer: int) -> None:
                try:
                    for batch in range(batches):
                        if layer > 0:
                            done[layer - 1][batch].wait()
                        if failed.is_set():
                            return
                        began = self._now()
                        self._layer_batch(inputs, state, helpers, layer, batch, batch_tokens)
                        with state.lock:
                            state.timings.append(LayerTiming(layer, batch, began, self._now()))
                        done[layer][batch].set()
                except BaseException:
                    failed.set()
                    for events in done:
                        for event in events:
                            event.set()
                    raise

            futures = [stages.submit(stage, layer) for layer in range(layers)]
            errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        elapsed = time.perf_counter() - state.started
        return EmulatorRun(
            emulator=self,
            inputs=inputs,
            batch_tokens=batch_tokens,
            batches=batches,
            outputs=state.outputs,
            timings=tuple(sorted(state.timings, key=lambda t: (t.layer, t.batch))),
            elapsed_s=elapsed,
            throttled=self.throttled - throttled_before,
        )

    def _layer_batch(
        self,
        inputs: ReplayInputs,
        state: _RunState,
        helpers: ThreadPoolExecutor,
        layer: int,
        batch: int,
        batch_tokens: int,
    ) -> None:
        rows = slice(batch * batch_tokens, (batch + 1) * batch_tokens)
        hidden = inputs.hidden[layer, rows]  # [B, D]
        ids = inputs.topk_ids[layer, rows]  # [B, K]
        weights = inputs.topk_weights[layer, rows]  # [B, K]
        combined = np.zeros((batch_tokens, self.shape.hidden_size), dtype=np.float32)  # [B, D]
        lock = threading.Lock()
        plan_layer = self.plan.layers[layer]
        lanes: list[Future[None]] = []
        for g, function in enumerate(plan_layer.functions):
            token2hit = np.isin(
                ids, function.experts
            )  # [B, K]: which of a token's choices this function holds
            tokens = np.flatnonzero(token2hit.any(axis=1))  # distinct tokens, each sent once to the function
            for replica, share in enumerate(np.array_split(tokens, function.replicas)):
                micro = [chunk for chunk in np.array_split(share, plan_layer.micro_batches)]
                lanes.append(
                    helpers.submit(
                        self._lane,
                        helpers,
                        layer,
                        g,
                        replica,
                        batch,
                        micro,
                        _LayerBatch(hidden, ids, weights, token2hit, combined, lock),
                    )
                )
        for lane in lanes:
            lane.result()
        state.outputs[layer, rows] = combined

    def _lane(
        self,
        helpers: ThreadPoolExecutor,
        layer: int,
        function: int,
        replica: int,
        batch: int,
        micro: list[np.ndarray],
        data: _LayerBatch,
    ) -> None:
        """One replica's share of a batch: micro-batches in order, the next encoded (and sent) while one computes."""
        spec = self._spec(layer, function)
        chunks = [
            (j, chunk) for j, chunk in enumerate(micro) if chunk.size
        ]  # an empty micro-batch is not sent

        def send(chunk: np.ndarray) -> _Request:
            row2token, slot = np.nonzero(data.token2hit[chunk])  # [A], [A]: assignments in token order
            request = self._encode(
                layer,
                function,
                data.hidden[chunk],
                row2token,
                data.ids[chunk[row2token], slot],
                data.weights[chunk[row2token], slot],
            )
            if self.config.network == "modelled":
                sent, _ = transfer_seconds(
                    len(request.body) + len(request.data or b""), spec.channel, self.model.constants
                )
                time.sleep(float(sent))
            return request

        def gather(chunk: np.ndarray, y: np.ndarray, wire: int) -> None:
            if self.config.network == "modelled":
                if spec.channel == "object_store":
                    received = float(transfer_seconds(wire, spec.channel, self.model.constants)[1])
                else:
                    # As the cost model's gather: bytes at the invoke bandwidth, its latency already paid.
                    received = wire / self.model.constants.direct_bandwidth_bytes_per_s
                time.sleep(received)
            with data.lock:  # functions' partial sums for the same tokens add up here
                data.combined[chunk] += y

        if not chunks:
            return
        pending = helpers.submit(send, chunks[0][1])
        gathers = []
        for position, (j, chunk) in enumerate(chunks):
            request = pending.result()
            if position + 1 < len(chunks):
                pending = helpers.submit(send, chunks[position + 1][1])
            y = self._deliver(layer, function, replica, request, batch, j)
            wire = y.shape[0] * y.shape[1] * handler_template.wire_bytes(request.dtype)
            gathers.append(helpers.submit(gather, chunk, y, wire))
        for future in gathers:
            future.result()


@dataclass(frozen=True)
class _LayerBatch:
    """One layer's batch as the gate scatters it: rows [B, D], routing ids and weights [B, K], and
    ``token2hit`` [B, K] (which choices one function holds); ``combined`` [B, D] gathers outputs."""

    hidden: np.ndarray
    ids: np.ndarray
    weights: np.ndarray
    token2hit: np.ndarray
    combined: np.ndarray
    lock: threading.Lock


@dataclass(frozen=True)
class _Request:
    spec: _FunctionSpec
    tokens: int
    """Distinct token rows sent."""
    assignments: int
    experts_touched: int
    dtype: str
    """The wire dtype of the rows and outputs."""
    body: bytes
    """The event's JSON bytes (what the payload limit applies to)."""
    data: bytes | None
    """Raw rows (wire dtype) for the object-store channel; None for direct."""
    single_token_experts: int = 0
    """Of ``experts_touched``, those given exactly one token."""


def _proc_meminfo_bytes(key: str) -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


# -- the measured run and its prediction ---------------------------------------------------------


def replayed_workload(
    inputs: ReplayInputs,
    shape: ExpertShape,
    batch_tokens: int,
    batches: int,
    levels: tuple[float, ...] = (0.5, 0.9, 0.99),
) -> Workload:
    """The loads the run actually replayed, as a cost-model workload: per batch, per layer and expert.

    ``expected`` is the mean over batches of each expert's token-assignments, ``quantiles`` their
    quantiles over batches. The throughput target is a placeholder (1 token/s): the prediction
    is read for cost and time, not judged against a target.
    """
    ids = inputs.topk_ids[:, : batches * batch_tokens].reshape(inputs.num_layers, batches, -1)  # [L, n, B*K]
    counts = np.zeros((batches, inputs.num_layers, shape.num_experts))  # [n, L, E]
    for layer in range(inputs.num_layers):
        for batch in range(batches):
            known = ids[layer, batch][ids[layer, batch] >= 0]
            counts[batch, layer] = np.bincount(known, minlength=shape.num_experts)
    quantiles = np.quantile(counts, levels, axis=0)  # [Q, L, E]
    return Workload(
        shape, batch_tokens, 1.0, counts.mean(axis=0), levels, quantiles, f"replayed: {inputs.source}"
    )


def fit_handler_calibration(entries: Sequence[LedgerEntry], shape: ExpertShape) -> Calibration | None:
    """The cost model's handler constants fitted to this run's measured CPU times (ok invocations).

    Two fits of the forms ``perf.calibrate`` fits (relative least squares, coefficients >= 0):
    ``experts_cpu_s = (experts_touched - singles) * call_overhead + singles * single_token_expert
    + (tokens - singles) * flops_per_token / flops_per_second`` (tokens: token-assignments;
    singles: experts given one token; ``perf.fit_expert_seconds``) and ``cpu_s - experts_cpu_s = invocation_overhead + json_bytes *
    payload_seconds_per_byte`` (the JSON the handler parsed or wrote, as the ledger records it).
    When noise leaves no per-token cost, all expert time is counted per token. None with fewer
    than two invocations or no positive rate.
    """
    ok = [e for e in entries if e.kind == "invoke" and e.outcome == "ok"]
    if len(ok) < 2:
        return None
    experts_seconds = np.array([e.experts_cpu_s for e in ok])
    touched = np.array([e.experts_touched for e in ok], dtype=np.float64)
    tokens = np.array([e.tokens for e in ok], dtype=np.float64)
    singles = np.array([e.single_token_experts for e in ok], dtype=np.float64)
    per_expert, per_single, per_flop = fit_expert_seconds(touched, tokens, singles, experts_seconds, shape)
    if per_flop <= 0:
        # Noise swamped the per-token trend (small invocations are mostly per-expert overhead):
        # keep a rate, all time counted per token.
        per_expert, per_single = 0.0, 0.0
        per_flop = float(experts_seconds.sum() / (tokens.sum() * shape.flops_per_token))
    if per_flop <= 0:
        return None

    rest = np.array([max(e.cpu_s - e.experts_cpu_s, 0.0) for e in ok])
    per_invocation, per_byte = fit_nonnegative(
        np.array([[1.0, float(e.json_bytes)] for e in ok], dtype=np.float64), rest
    )
    return Calibration(
        flops_per_second=1.0 / per_flop,
        call_overhead_s=float(per_expert),
        measured=True,
        probe=(shape.hidden_size, shape.intermediate_size),
        invocation_overhead_s=float(per_invocation),
        payload_seconds_per_byte=float(per_byte),
        weights_streamed=True,
        device=device_name(),
        single_token_expert_s=per_single,
    )


@dataclass(frozen=True)
class EmulatorRun:
    """What one replay measured: the ledger (on the emulator), per layer-batch timings and outputs."""

    emulator: Emulator
    inputs: ReplayInputs
    batch_tokens: int
    batches: int
    outputs: np.ndarray
    """float32 [L, n*B, D]: the emulated layers' outputs."""
    timings: tuple[LayerTiming, ...]
    elapsed_s: float
    """Wall seconds of the replay (warm: prewarming is not included)."""
    throttled: int
    """Invocations that waited for a free concurrency slot."""

    @property
    def tokens(self) -> int:
        return self.batches * self.batch_tokens

    def max_abs_error(self) -> float | None:
        """Largest |emulated - in-process| over every output value; None without reference outputs."""
        if self.inputs.reference is None:
            return None
        return float(np.abs(self.outputs - self.inputs.reference[:, : self.tokens]).max())

    def layer_seconds(self) -> np.ndarray:
        """float64 [L]: median over batches of each layer's scatter-to-gather seconds (measured)."""
        table = np.zeros((self.emulator.shape.num_layers, self.batches))
        for timing in self.timings:
            table[timing.layer, timing.batch] = timing.seconds
        return np.median(table, axis=1)

    def report(self) -> EmulatorReport:
        emulator = self.emulator
        workload = replayed_workload(self.inputs, emulator.shape, self.batch_tokens, self.batches)
        prediction = evaluate_plan(emulator.plan, workload, emulator.model, level=0.5)
        return EmulatorReport(self, workload, prediction)


@dataclass(frozen=True)
class EmulatorReport:
    """Measured bill and throughput of a run next to the cost model's prediction for the same plan and loads."""

    run: EmulatorRun
    workload: Workload
    prediction: PlanEvaluation
    """``evaluate_plan`` on the run's layers with the replayed loads; time at their median (level 0.5)."""

    @property
    def measured_invoke_cost(self) -> float:
        return self.run.emulator.ledger.total("invoke")

    @property
    def predicted_invoke_cost(self) -> float:
        return sum(self.prediction.layer_cost_per_batch) * self.run.batches

    @property
    def bill_ratio(self) -> float:
        """Measured / predicted billed cost of the invocations (cold starts excluded from both)."""
        return self.measured_invoke_cost / self.predicted_invoke_cost

    def refitted_prediction(self) -> tuple[Calibration, PlanEvaluation] | None:
        """``evaluate_plan`` again with handler constants fitted to this run's measured handler
        (:func:`fit_handler_calibration`), and those constants: what gap is left is not calibration
        but the model's form (expected experts touched, loads, rounding)."""
        emulator = self.run.emulator
        fitted = fit_handler_calibration(emulator.ledger.entries, emulator.shape)
        if fitted is None:
            return None
        model = dataclasses.replace(emulator.model, calibration=fitted)
        return fitted, evaluate_plan(emulator.plan, self.workload, model, level=0.5)

    @property
    def invoke_cost_without_serialisation(self) -> float:
        """The invocations' bill had the handler spent no CPU decoding and encoding payloads.

        Each ok line re-billed from its measured expert-matmul CPU time alone (same share, same
        rounding, same prices); failed lines as billed. The gap to :attr:`measured_invoke_cost`
        is what payload (de)serialisation costs (the cost model counts it from its calibration).
        """
        emulator = self.run.emulator
        limits, constants = emulator.limits, emulator.model.constants
        price = limits.price_per_gb_second[emulator.model.architecture]
        total = 0.0
        for entry in emulator.ledger.entries:
            if entry.kind != "invoke":
                continue
            if entry.outcome != "ok":
                total += entry.cost_usd
                continue
            seconds = handler_duration_s(
                entry.experts_cpu_s,
                entry.experts_cpu_s,
                entry.io_s,
                limits.vcpu_share(entry.memory_mb),
                constants,
            )
            billed = limits.billed_duration_ms(seconds * 1000.0)
            total += line_cost(limits, price, "invoke", entry.memory_mb, billed)
        return total

    def compute_check(self) -> dict[str, float]:
        """Where the handler's time goes, against the cost model's (ok invocations, CPU seconds at one vCPU).

        ``experts_cpu_s`` is the expert matmuls, ``serialisation_cpu_s`` the rest of the handler's
        CPU time (parsing the event, writing the response); ``modelled_compute_s`` and
        ``modelled_serialisation_s`` are the calibration's figures for the same invocations
        (tokens, rows, experts touched and JSON bytes as measured). Per JSON byte the measured
        rest is ``serialisation_ns_per_byte``.
        """
        emulator = self.run.emulator
        entries = [e for e in emulator.ledger.entries if e.kind == "invoke" and e.outcome == "ok"]
        calibration = emulator.model.calibration
        tokens = np.array([e.tokens for e in entries], dtype=np.float64)
        modelled = compute_seconds(
            emulator.shape,
            tokens,
            np.array([e.experts_touched for e in entries], dtype=np.float64),
            1.0,
            calibration,
            emulator.model.constants,
            np.array([e.single_token_experts for e in entries], dtype=np.float64),
        )
        modelled_rest = 0.0
        for entry in entries:
            layer = emulator.plan.layers[entry.layer]
            payload_bytes = handler_payload(
                emulator.shape, entry.tokens, entry.rows, layer.channel, layer.wire_dtype
            )
            modelled_rest += float(handler_overhead_seconds(payload_bytes.json_bytes, 1.0, calibration))
        cpu = sum(e.cpu_s for e in entries)
        experts = sum(e.experts_cpu_s for e in entries)
        payload = sum(e.json_bytes for e in entries)
        modelled_total = float(modelled.sum()) + modelled_rest
        return {
            "invocations_measured": float(len(entries)),
            "invocations_predicted": self.prediction.invocations_per_token * self.run.tokens,
            "handler_cpu_s": cpu,
            "experts_cpu_s": experts,
            "serialisation_cpu_s": cpu - experts,
            "serialisation_ns_per_byte": (cpu - experts) / payload * 1e9 if payload else math.nan,
            "modelled_compute_s": float(modelled.sum()),
            "modelled_serialisation_s": modelled_rest,
            "experts_over_modelled": experts / float(modelled.sum()) if modelled.sum() > 0 else math.nan,
            "serialisation_over_modelled": (cpu - experts) / modelled_rest if modelled_rest > 0 else math.nan,
            "handler_over_modelled": cpu / modelled_total if modelled_total > 0 else math.nan,
        }

    def to_dict(self) -> dict[str, Any]:
        run, emulator = self.run, self.run.emulator
        ledger = emulator.ledger
        inits = [e for e in ledger.entries if e.kind == "init" and e.outcome == "ok"]
        peak_by_function = {
            f"layer {s.layer} function {s.index}": {
                "memory_mb": s.plan.memory_mb,
                "vcpus": s.vcpus,
                "peak_rss_mb": max(i.peak_rss_kib for i in emulator.instances[(s.layer, s.index)]) / 1024,
            }
            for s in emulator.specs
        }
        layer_seconds = run.layer_seconds()
        refitted: dict[str, Any] | None = None
        if (refit := self.refitted_prediction()) is not None:
            fitted, evaluation = refit
            refit_cost = sum(evaluation.layer_cost_per_batch) * run.batches
            refitted = {
                "calibration": fitted.to_dict(),
                "invoke_cost_usd": refit_cost,
                "bill_ratio": self.measured_invoke_cost / refit_cost,
            }
        ok = [e for e in ledger.entries if e.kind == "invoke" and e.outcome == "ok"]
        # Wall time over billed time: 1 when every function had its CPU share; more when this
        # host's cores were oversubscribed (which slows the measured throughput, not the bill).
        host_contention = sum(e.wall_s for e in ok) / max(sum(e.duration_ms for e in ok) / 1000.0, 1e-12)
        steady = run.batch_tokens / float(layer_seconds.max())
        max_error = run.max_abs_error()
        return {
            "plan_found_by": emulator.plan.found_by,
            "shape": emulator.shape.to_dict(),
            "layers": len(emulator.plan.layers),
            "tokens": run.tokens,
            "batch_tokens": run.batch_tokens,
            "batches": run.batches,
            "inputs": run.inputs.source,
            "weights": emulator.weights.description,
            "config": {
                "timeout_s": emulator.config.timeout_s,
                "concurrency_limit": emulator.concurrency_limit,
                "host_slots": emulator.host_slots,
                "network": emulator.config.network,
                "prewarm": emulator.config.prewarm,
            },
            "measured": {
                "invoke_cost_usd": self.measured_invoke_cost,
                "invoke_cost_per_million_tokens_usd": self.measured_invoke_cost / run.tokens * 1e6,
                "init_cost_usd": ledger.total("init"),
                "ledger": ledger.summary(),
                "throughput_steady_tokens_per_s": steady,
                "throughput_end_to_end_tokens_per_s": run.tokens / run.elapsed_s,
                "layer_seconds_median": layer_seconds.tolist(),
                "cold_start_s_median": float(np.median([e.wall_s for e in inits])) if inits else None,
                "cold_start_s_max": max((e.wall_s for e in inits), default=None),
                "invoke_cost_without_serialisation_usd": self.invoke_cost_without_serialisation,
                "host_contention": host_contention,
                "throttled_invocations": run.throttled,
                "scaled_invocations": sum(1 for e in ledger.entries if e.scaled),
                "functions": peak_by_function,
                "max_abs_error_vs_in_process": max_error,
                "outputs_allclose": None
                if max_error is None
                else bool(
                    np.allclose(run.outputs, run.inputs.reference[:, : run.tokens], rtol=1e-4, atol=1e-5)  # type: ignore[index]
                ),
                "compute_check": self.compute_check(),
            },
            "modelled": {
                "invoke_cost_usd": self.predicted_invoke_cost,
                "invoke_cost_per_million_tokens_usd": self.prediction.cost_per_million_tokens,
                "throughput_tokens_per_s": self.prediction.throughput_tokens_per_s,
                "layer_seconds": list(self.prediction.layer_seconds),
                "cold_start_s_max": self.prediction.max_cold_start_s,
                "calibration": emulator.model.calibration.to_dict(),
                "workload": self.workload.source,
            },
            "refitted": refitted,
            "bill_ratio_measured_over_modelled": self.bill_ratio,
            "serialisation_share_of_bill": 1.0
            - self.invoke_cost_without_serialisation / self.measured_invoke_cost,
            "bill_within_tolerance": abs(self.bill_ratio - 1.0) <= BILL_TOLERANCE,
            "tolerance": BILL_TOLERANCE,
            "notes": self.notes(),
        }

    def notes(self) -> list[str]:
        emulator = self.run.emulator
        notes = [
            "measured: handler CPU and wall time, cold starts (process start + imports + weight load), peak "
            "resident memory, outputs, and the bill computed from them at the price file's rates",
            "modelled, not measured: the network (transfer times are the cost model's constants, slept by the gate"
            + (")" if emulator.config.network == "modelled" else "; disabled in this run)")
            + "; object-store GET/PUT time inside handlers; CPU shares of 1 vCPU or more (one thread here, "
            "duration = CPU time / modelled speedup)",
            "billed durations are the handler's measured CPU time at the function's CPU share (below 1 vCPU "
            "the worker also sleeps its idle share, a duty cycle); wall time above that is contention on this "
            "2-core shared host, reported as host contention and not billed; it lowers the measured throughput",
            (
                f"at most {emulator.host_slots} invocations compute at once on this host (host slots), so the "
                "emulated functions do not time-slice its cores against each other; the others wait, unbilled"
                if emulator.host_slots
                else "host slots off: invocations past the host's cores time-slice them (their CPU time includes it)"
            ),
            "payload (de)serialisation: the deployed handler decodes base64 JSON events (each token row once per "
            "function) and returns raw bytes; the cost model counts it per invocation and per JSON byte from its "
            "calibration (the bill is also "
            "re-priced without it, to show its share)",
            "prediction: evaluate_plan on the same plan layers with the loads this run replayed (cold starts "
            "excluded from both bills)",
        ]
        if isinstance(emulator.weights, RandomWeights):
            notes.append("weights are random, of the planned shapes: no checkpoint was given")
        return notes

    def render_table(self) -> Table:
        data = self.to_dict()
        measured, modelled = data["measured"], data["modelled"]
        table = Table(
            title=f"Serverless emulator: {data['layers']} layer(s), {data['tokens']} tokens in {data['batches']} batches"
        )
        table.add_column("figure")
        table.add_column("measured", justify="right")
        table.add_column("modelled", justify="right")
        table.add_row(
            "billed cost of invocations (USD)",
            f"{measured['invoke_cost_usd']:.4e}",
            f"{modelled['invoke_cost_usd']:.4e}",
        )
        table.add_row(
            "per 1M tokens (USD)",
            f"{measured['invoke_cost_per_million_tokens_usd']:.5f}",
            f"{modelled['invoke_cost_per_million_tokens_usd']:.5f}",
        )
        check = measured["compute_check"]
        table.add_row(
            "invocations", str(measured["ledger"]["invocations"]), f"{check['invocations_predicted']:.0f}"
        )
        table.add_row(
            "throughput (tokens/s, steady state)",
            f"{measured['throughput_steady_tokens_per_s']:.1f}",
            f"{modelled['throughput_tokens_per_s']:.1f}",
        )
        table.add_row(
            "expert compute CPU seconds (1 vCPU)",
            f"{check['experts_cpu_s']:.4f}",
            f"{check['modelled_compute_s']:.4f}",
        )
        table.add_row(
            "payload (de)serialisation CPU seconds (1 vCPU)",
            f"{check['serialisation_cpu_s']:.4f}",
            f"{check['modelled_serialisation_s']:.4f}",
        )
        cold = measured["cold_start_s_max"]
        table.add_row(
            "longest cold start (s)",
            "-" if cold is None else f"{cold:.2f}",
            f"{modelled['cold_start_s_max']:.2f}",
        )
        table.add_row("cold-start (INIT) bill (USD)", f"{measured['init_cost_usd']:.4e}", "not modelled")
        table.add_row("max concurrent invocations", str(measured["ledger"]["max_concurrency"]), "")
        error = measured["max_abs_error_vs_in_process"]
        table.add_row("max |emulated - in-process| output", "-" if error is None else f"{error:.2e}", "")
        table.add_row(
            "bill without payload (de)serialisation (USD)",
            f"{measured['invoke_cost_without_serialisation_usd']:.4e}",
            f"share {data['serialisation_share_of_bill']:.1%}",
        )
        if data["refitted"] is not None:
            refitted = data["refitted"]
            table.add_row(
                "modelled with the handler refitted to this run (USD)",
                f"ratio {refitted['bill_ratio']:.3f}",
                f"{refitted['invoke_cost_usd']:.4e}",
            )
        table.add_row("host contention (wall / billed time)", f"{measured['host_contention']:.2f}", "")
        table.add_row(
            "bill measured / modelled",
            f"{data['bill_ratio_measured_over_modelled']:.3f}",
            "within 10%" if data["bill_within_tolerance"] else "outside 10%",
        )
        return table


# -- the entry point behind `moeserve serverless run` ---------------------------------------------


def emulate_plan(
    plan_path: str | Path,
    model_path: str | Path | None = None,
    trace_path: str | Path | None = None,
    tokens: int | None = None,
    layers: int | None = None,
    batch_tokens: int | None = None,
    config: EmulatorConfig | None = None,
    calibrate_here: bool = True,
    seed: int = 0,
    calibration_path: str | Path = DEFAULT_CALIBRATION_PATH,
    recalibrate: bool = False,
) -> EmulatorReport:
    """Run the plan in ``plan_path`` (any form ``export.load_plan_json`` reads) and report it.

    Steps: 1. weights: ``model_path``'s checkpoint; else the reference model when the plan is
    for its shape (or names none); else random weights of the plan's shape. 2. routing: the
    trace in ``trace_path`` (random inputs); else the model's own routing on the standard
    library's held-out split (needs a checkpoint). 3. the first ``layers`` layers (default:
    all the plan has, at most the model's), ``tokens`` tokens (default: 4 batches) in batches of
    ``batch_tokens`` (default: the plan file's, else 256). 4. the cost model's calibration for
    the shape on this device from ``calibration_path`` (``perf.cached_calibration``: measured
    and stored there if absent or ``recalibrate``), the same data ``serverless plan`` uses;
    with ``calibrate_here`` False, the plan file's recorded calibration, else perf's default.
    """
    from moeserve.models.loader import REFERENCE_MODEL
    from moeserve.serverless.export import load_plan_json
    from moeserve.serverless.shapes import reference_shape

    try:
        plan_file = load_plan_json(plan_path)
        document = json.loads(Path(plan_path).read_text())
    except (OSError, ValueError, TypeError) as error:
        raise EmulatorError(f"{plan_path}: cannot read the plan: {error}") from None
    workload = document.get("workload") if isinstance(document, dict) else None
    batch_tokens = batch_tokens or (int(workload["batch_tokens"]) if isinstance(workload, dict) else 256)
    tokens = tokens or 4 * batch_tokens
    if batch_tokens < 1 or tokens < batch_tokens:
        raise EmulatorError(f"need tokens >= batch tokens >= 1, got {tokens} and {batch_tokens}")
    shape = plan_file.shape
    checkpoint = Path(model_path) if model_path is not None else None
    if checkpoint is None and (shape is None or shape.name == "tiny-moe"):
        checkpoint = REFERENCE_MODEL
    source: ExpertWeightsSource
    if checkpoint is not None:
        weights = CheckpointWeights(checkpoint)
        found = checkpoint_shape(checkpoint, reference_shape().name if checkpoint == REFERENCE_MODEL else None)
        mismatch = shape_mismatch(shape, found, checkpoint) if shape is not None else None
        if mismatch:
            raise EmulatorError(mismatch)
        shape, source = found, weights
    else:
        assert shape is not None
        source = RandomWeights(shape, seed)
    count = min(len(plan_file.plan.layers), shape.num_layers) if layers is None else layers
    if not 1 <= count <= min(len(plan_file.plan.layers), shape.num_layers):
        raise EmulatorError(
            f"layers must be in 1..{min(len(plan_file.plan.layers), shape.num_layers)} "
            f"(the plan has {len(plan_file.plan.layers)}, the shape {shape.num_layers}), got {count}"
        )
    if trace_path is not None:
        from moeserve.traces.format import load_trace

        inputs = trace_replay(load_trace(trace_path), shape, tokens, count, seed)
    elif checkpoint is not None:
        from moeserve.models.loader import load_model
        from moeserve.models.reference import reference_split_tokens

        moe_model = load_model(checkpoint)
        if moe_model.tokenizer is None:
            raise EmulatorError(f"{checkpoint} has no tokenizer; give --trace for the routing")
        token_ids = reference_split_tokens(moe_model.tokenizer, held_out=True, max_tokens=tokens)[:tokens]
        inputs = model_replay(moe_model, token_ids, count)
    else:
        raise EmulatorError(
            f"the plan is for {shape.name} and no checkpoint was given: pass --trace for its routing "
            "(the experts get random weights of the planned shapes) or --model"
        )
    if calibrate_here:
        wire_dtypes = {layer.wire_dtype for layer in plan_file.plan.layers[:count]}
        if len(wire_dtypes) > 1:
            raise EmulatorError(
                f"the layers run use several wire dtypes {sorted(wire_dtypes)}; one calibration fits one"
            )
        calibration = cached_calibration(shape, calibration_path, recalibrate, wire_dtypes.pop())
    elif isinstance(document.get("calibration"), dict):
        calibration = Calibration.from_dict(document["calibration"])
    else:
        calibration = DEFAULT_CALIBRATION
    model = CostModel(calibration=calibration, architecture=plan_file.architecture)
    with Emulator(plan_file.plan, shape, source, count, model, config) as emulator:
        return emulator.run(inputs, min(batch_tokens, inputs.num_tokens)).report()
