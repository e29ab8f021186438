"""Measure the expert-parallelism simulator's costs on this machine, and store them as data.

``calibrate_costs(shape)`` times, on one torch thread (what each ``moeserve bench ep`` worker
uses by default):

1. **Expert worker invocation** at the workload's expert shape, through the runtime's own
   ``moeserve.ep.experts.ExpertShard.run`` (group rows by expert, run the registered CPU
   backend ``resolve_backend`` picks, as ``moeserve.ep`` expert workers do, restore arrival
   order) over a synthetic shard of ``shape.experts_per_worker`` experts per layer. A
   least-squares fit of the median times over a grid of (rows, active experts) gives ``t =
   call + a * active_experts + b * rows``.
2. **Attention-side layer call** over T tokens, what the trace workload's attention worker runs
   per MoE layer, through the runtime's own code: an RMS norm and a D x D mixer (the workload's
   stand-in for attention), the routing lookup, ``moeserve.ep.dispatch.plan_dispatch`` over the
   run's expert workers and ``combine_outputs`` (the experts' answer taken as given). Fit:
   ``t = c + d * tokens``. Expert and attention calls rotate over ``shape.layers`` layers'
   weights, as a run does.
3. **Hand-off of the async attention worker's compute slot**: a round trip between two threads
   through ``threading.Event`` (``attention_switch_s``).
4. **Processors left to us**: the aggregate speed-up of k concurrent CPU-bound processes over
   one (``effective_cores``; a shared machine gives fewer than it has).
5. **Messages and the sync exchange among real processes** (as many as the run has,
   ``shape.processes``): torch.distributed gloo (TCP on loopback). Messages go through the
   runtime's own transport (``moeserve.ep.serialize``): rank 0 sends a Dispatch of each row count
   to every other rank at once, each answers with a Combine; every process's processor time per
   message end, fitted as ``message_cpu_s + bytes * message_cpu_per_byte_s``, and what is left
   of the round trip as ``latency + bytes / bandwidth``. ``collective_latency_s`` and
   ``collective_bandwidth_bytes_per_s`` (sync) are fitted from the sync mode's own layer exchange
   (three ``all_to_all_single`` over all ranks) timed at the workload's sizes: every rank takes
   part in each collective, so on a machine with fewer cores than processes it costs far more
   than one message. Every fit minimises relative errors.

The result is a :class:`Calibration`: the fitted :class:`~moeserve.sim.ep.SimCosts` (its
``measured`` names the fields measured here) plus the raw medians, the shape and the machine,
written as JSON (``save_calibration``) and read back by ``load_calibration``; the simulator's
defaults in code stay the assumed GPU-class costs (STYLE 13: tuned numbers are data).

It knows nothing of the simulator's modes. Figures from a loaded shared machine move by tens of
percent between runs; the JSON keeps the load average at measurement time.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from moeserve.sim.ep import SimCosts

CALIBRATION_FORMAT = "moeserve-sim-costs/1"
ROW_ID_BYTES = 8
"""int64 expert id sent with every dispatched row."""
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
CONTROL_WIDTH = 66
"""int64 entries of the sync mode's control row per rank: stop, layer, 64 expert counts."""


@dataclass(frozen=True)
class CalibrationShape:
    """The workload whose costs are measured. Invalid values raise ``ValueError``.

    Defaults are ``moeserve bench ep --trace``'s synthetic model on DeepSeek-V2-Lite routing:
    D=128, I=160, 64 experts per layer, top-6, float32.
    """

    hidden: int = 128
    """D: hidden size."""
    intermediate: int = 160
    """I: expert intermediate size."""
    experts_per_worker: int = 64
    """Experts one worker holds at a layer (rows are spread over these)."""
    top_k: int = 6
    """k: assignments per token (rows per token at the attention side)."""
    row_counts: tuple[int, ...] = (8, 32, 96, 256, 768, 1536)
    """Rows per expert-worker invocation to time."""
    token_counts: tuple[int, ...] = (4, 16, 64, 256, 512)
    """Tokens per attention-side layer call to time."""
    message_rows: tuple[int, ...] = (0, 16, 128, 1024)
    """Rows per message to time (0: a header-only message); times the expert workers, the rows of
    the sync exchanges timed."""
    processes: int = 2
    """Processes of the real run this calibrates, as ``bench ep`` runs them: one attention worker
    (rank 0) and ``processes - 1`` expert workers; messages and the sync exchange are timed
    among this many gloo ranks."""
    layers: int = 1
    """MoE layers whose experts every worker holds: expert invocations rotate over this many
    layers' weights, so a call reads weights the previous calls did not leave in cache, as in a
    run that visits its layers in turn (one layer's weights stay cached: 10-12% faster calls
    here at 22 experts of D=128, I=160)."""
    repeats: int = 25
    """Timed rounds over all points (median per point taken) after one warm-up round."""
    device: str = "cpu"
    """Where expert and attention-side calls are timed: ``cpu`` or ``cuda`` (``cuda:N``). On CUDA
    each call is timed to completion (synchronized), the messages and the sync exchange are not
    measured (gloo on loopback says nothing of a GPU cluster's links: the GPU-class defaults stay),
    and every worker counts as having its own device (``effective_cores`` 0)."""
    dtype: str = "float32"
    """Element type of the timed experts, activations and messages: ``float32`` (what ``bench ep``
    runs) or ``bfloat16`` (what a GPU deployment serves in)."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPE_BYTES)}, got {self.dtype!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 2:
            raise ValueError(f"processes must be an integer >= 2, got {self.processes!r}")
        for name in ("hidden", "intermediate", "experts_per_worker", "top_k", "repeats", "layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("row_counts", "token_counts", "message_rows"):
            values = getattr(self, name)
            if len(set(values)) < 2 or any(v < 0 for v in values):
                raise ValueError(f"{name} needs at least two distinct values >= 0, got {values!r}")
        if min(self.row_counts) < 1 or min(self.token_counts) < 1:
            raise ValueError("row_counts and token_counts must be >= 1")

    @property
    def bytes_per_row(self) -> int:
        """Message bytes per dispatched row: the activations plus the int64 expert id."""
        return _DTYPE_BYTES[self.dtype] * self.hidden + ROW_ID_BYTES

    def covering(self, requests: int, prompt_tokens: int, attention_workers: int, expert_workers: int,
                 micro_batches: int) -> CalibrationShape:
        """This shape with its grids extended to the calls a request workload makes.

        The default grids stop at 512 tokens and 1,536 rows; a workload of many requests calls
        the attention side with up to ``requests / attention_workers`` decode tokens (a
        ``prompt_tokens`` multiple of that at prefill) and the expert side with ``top_k`` rows per
        token spread over ``expert_workers``, in one batch (sync) or ``micro_batches`` (async).
        Costs per token and row are not constant over such a range (caches), so a fit timed
        only at small sizes extrapolates badly; this adds the workload's own sizes (both modes,
        decode and prefill) to the grids. The repeats stay as they are.
        """
        for name, value in (("requests", requests), ("prompt_tokens", prompt_tokens),
                            ("attention_workers", attention_workers), ("expert_workers", expert_workers),
                            ("micro_batches", micro_batches)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        per_worker = max(1, requests // attention_workers)
        batches = {per_worker, max(1, per_worker // micro_batches)}  # sync, async
        tokens = {size * steps for size in batches for steps in (1, prompt_tokens)}  # decode, prefill
        rows = {max(1, size * self.top_k * attention_workers // expert_workers) for size in tokens}
        messages = {max(1, size * self.top_k // expert_workers) for size in tokens}
        return replace(
            self,
            row_counts=tuple(sorted(set(self.row_counts) | rows)),
            token_counts=tuple(sorted(set(self.token_counts) | tokens)),
            message_rows=tuple(sorted(set(self.message_rows) | messages)),
        )


@dataclass(frozen=True)
class Calibration:
    """Costs measured on this machine, with what they were measured on."""

    costs: SimCosts
    shape: CalibrationShape
    machine: str
    load_average: tuple[float, float, float]
    """1/5/15-minute load average when the measurement started (other work on the machine)."""
    effective_cores: int = 0
    """Processors this machine gave our processes together when measured: the rounded best
    aggregate speed-up of k concurrent CPU-bound processes over one (0: not measured). The
    simulator's ``cores`` for a run on this machine."""
    samples: dict[str, list[list[float]]] = field(default_factory=dict)
    """Raw medians: ``expert`` [rows, active, s], ``attention`` [tokens, s],
    ``message_round_trip`` [bytes, s of a fan-out round], ``message_cpu`` [bytes, s per message end],
    ``exchange`` [rows, s of one sync layer exchange]."""

    def to_dict(self) -> dict[str, Any]:
        costs = asdict(self.costs)
        costs["measured"] = list(self.costs.measured)
        shape = asdict(self.shape)
        return {
            "format": CALIBRATION_FORMAT,
            "machine": self.machine,
            "load_average": list(self.load_average),
            "effective_cores": self.effective_cores,
            "shape": shape,
            "costs": costs,
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Calibration:
        if document.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"not a {CALIBRATION_FORMAT} document (format {document.get('format')!r})")
        known = {item.name for item in fields(SimCosts)}
        raw = dict(document["costs"])
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"costs has unknown field(s) {', '.join(unknown)}")
        raw["measured"] = tuple(raw.get("measured", ()))
        shape: dict[str, Any] = {
            key: tuple(value) if isinstance(value, list) else value for key, value in document["shape"].items()
        }
        return cls(
            costs=SimCosts(**raw),
            shape=CalibrationShape(**shape),
            machine=str(document.get("machine", "")),
            load_average=tuple(document.get("load_average", (0.0, 0.0, 0.0))),  # type: ignore[arg-type]
            effective_cores=int(document.get("effective_cores", 0)),
            samples=document.get("samples", {}),
        )


def save_calibration(calibration: Calibration, path: str | Path) -> None:
    Path(path).write_text(json.dumps(calibration.to_dict(), indent=1) + "\n")


def load_calibration(path: str | Path) -> Calibration:
    """Read a ``moeserve-sim-costs/1`` file; ``ValueError`` if it is not one."""
    try:
        document = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    return Calibration.from_dict(document)


def calibrate_costs(shape: CalibrationShape | None = None, measure_messages: bool = True) -> Calibration:
    """Measure :class:`SimCosts` for ``shape`` on this machine (see the module docstring).

    Steps: 0. the thread hand-off; 1. gloo messages and the sync exchange among ``shape.processes``
    processes (first, before this process's torch thread pool is busy, and only if
    ``measure_messages``; otherwise the GPU-class defaults stay and are not named in ``measured``); 2. expert invocations; 3. attention-side layer calls; 4. fit;
    5. the aggregate speed-up of concurrent processes (``effective_cores``).
    Takes about 5-15 s on a loaded 2-core machine.
    """
    import torch

    from moeserve.bench.machine import machine_description

    shape = shape or CalibrationShape()
    on_gpu = shape.device != "cpu"
    if on_gpu:
        if not torch.cuda.is_available():
            raise ValueError(f"device {shape.device!r} asked, but torch sees no CUDA device here")
        measure_messages = False
    load = os.getloadavg()
    samples: dict[str, list[list[float]]] = {}
    defaults = SimCosts()
    latency, bandwidth = defaults.message_latency_s, defaults.bandwidth_bytes_per_s
    collective, collective_bandwidth = defaults.collective_latency_s, defaults.collective_bandwidth_bytes_per_s
    message_cpu, message_cpu_per_byte = defaults.message_cpu_s, defaults.message_cpu_per_byte_s
    measured = [
        "expert_call_overhead_s",
        "expert_overhead_s",
        "expert_per_token_s",
        "attention_overhead_s",
        "attention_per_token_s",
    ]
    switch = measure_thread_switch(shape.repeats * 4)
    samples["switch"] = [[switch]]
    measured.append("attention_switch_s")
    if measure_messages:
        workers = shape.processes - 1
        exchange_rows = sorted({max(1, rows) * workers for rows in shape.message_rows})
        gloo = measure_gloo(list(shape.message_rows), exchange_rows, shape.hidden, 3 * shape.repeats, shape.processes)
        samples["message_round_trip"] = [  # [body bytes, s of a fan-out round]
            [float(rows * shape.bytes_per_row), seconds]
            for rows, seconds in zip(shape.message_rows, gloo.round_trip_s, strict=True)
        ]
        samples["message_cpu"] = [  # [body bytes, s per message end]: what fit_message_cpu fits
            [float(rows * shape.bytes_per_row), seconds]
            for rows, seconds in zip(shape.message_rows, gloo.message_cpu_s, strict=True)
        ]
        samples["exchange"] = [[float(rows), seconds] for rows, seconds in zip(exchange_rows, gloo.exchange_s, strict=True)]
        message_cpu, message_cpu_per_byte = fit_message_cpu(list(shape.message_rows), gloo.message_cpu_s, shape.bytes_per_row)
        fitted_cpu = [message_cpu + rows * shape.bytes_per_row * message_cpu_per_byte for rows in shape.message_rows]
        latency, bandwidth = fit_message_latency(  # with the processor time the simulator will charge
            list(shape.message_rows), gloo.round_trip_s, workers, fitted_cpu, shape.bytes_per_row
        )
        # The sync exchange is measured among the run's processes, not derived from one message:
        # every rank takes part in each collective, and on 2 cores four processes' collectives
        # cost ~25x one message (a message-derived latency made 4-process sync 2.5x too fast).
        collective, collective_bandwidth = fit_collective(exchange_rows, gloo.exchange_s, workers, shape.bytes_per_row)
        measured += [
            "message_latency_s", "message_cpu_s", "message_cpu_per_byte_s", "collective_latency_s",
            "collective_bandwidth_bytes_per_s", "bandwidth_bytes_per_s",
        ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples["expert"] = _time_experts(shape)
        samples["attention"] = _time_attention(shape)
    finally:
        torch.set_num_threads(threads)
    expert = np.array(samples["expert"])  # [points, 3]: rows, active, seconds
    design = np.stack([np.ones(len(expert)), expert[:, 1], expert[:, 0]], axis=1)  # [points, 3]
    call, per_expert, per_row = _nonnegative_least_squares(design, expert[:, 2])
    attention = np.array(samples["attention"])  # [points, 2]: tokens, seconds
    fixed, per_token = _nonnegative_least_squares(
        np.stack([np.ones(len(attention)), attention[:, 0]], axis=1), attention[:, 1]
    )
    costs = SimCosts(
        expert_call_overhead_s=call,
        expert_overhead_s=per_expert,
        expert_per_token_s=max(per_row, 1e-12),
        attention_overhead_s=fixed,
        attention_per_token_s=max(per_token, 1e-12),
        attention_switch_s=switch,
        message_latency_s=latency,
        message_cpu_s=message_cpu,
        message_cpu_per_byte_s=message_cpu_per_byte,
        collective_latency_s=collective,
        collective_bandwidth_bytes_per_s=collective_bandwidth,
        bandwidth_bytes_per_s=bandwidth,
        bytes_per_token=shape.bytes_per_row,
        measured=tuple(measured),
    )
    if on_gpu:  # one device per worker: the simulator's processors are not shared
        return Calibration(costs, shape, machine_description(shape.device), load, 0, samples)
    speedups = measure_parallel_speedup()
    samples["parallel_speedup"] = [[float(k), speedup] for k, speedup in enumerate(speedups, start=1)]
    effective_cores = max(1, min(round(max(speedups)), os.cpu_count() or 1))
    return Calibration(costs, shape, machine_description(), load, effective_cores, samples)


# --------------------------------------------------------------------------------------------
# compute


def _median_times(functions: list[Callable[[], Any]], repeats: int, device: str = "cpu") -> list[float]:
    """Median seconds of each function, timed round-robin (one call of each per round) after a
    warm-up round, so a burst of other work on the machine hits every point alike. On a CUDA
    ``device`` each call is timed until its kernels finished (synchronized before and after)."""
    import torch

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize(device)

    for function in functions:
        function()
    times = np.zeros((repeats, len(functions)))  # [repeats, points]
    for round_index in range(repeats):
        for index, function in enumerate(functions):
            sync()
            start = time.perf_counter()
            function()
            sync()
            times[round_index, index] = time.perf_counter() - start
    return [float(value) for value in np.median(times, axis=0)]


def _time_experts(shape: CalibrationShape) -> list[list[float]]:
    """[rows, active experts, median s] of one expert-worker invocation per grid point: the
    runtime's own :meth:`moeserve.ep.experts.ExpertShard.run` (group by expert, run the CPU
    backend, restore arrival order) over a synthetic shard of ``shape.layers`` layers with
    ``experts_per_worker`` experts each, every call on the next layer's weights."""
    import torch

    from moeserve.ep.experts import ExpertShard, ShardLayer, synthetic_expert

    generator = torch.Generator().manual_seed(0)
    held, hidden, intermediate, device = shape.experts_per_worker, shape.hidden, shape.intermediate, shape.device
    dtype = getattr(torch, shape.dtype)
    shard = ExpertShard(
        [
            ShardLayer(
                num_experts=held,
                held={expert: _on(synthetic_expert(0, layer, expert, hidden, intermediate), device, dtype)
                      for expert in range(held)},
            )
            for layer in range(shape.layers)
        ],
        torch.nn.functional.silu,
    )
    position = [0]
    points: list[list[float]] = []
    calls: list[Callable[[], Any]] = []
    for rows in shape.row_counts:
        for active in sorted({min(rows, held), max(1, min(rows, held) // 4)}):
            x = torch.randn(rows, hidden, generator=generator).to(device, dtype)  # [n, D]
            expert_ids = torch.randint(0, active, (rows,), generator=generator).to(device)  # [n]

            def invoke(x: torch.Tensor = x, expert_ids: torch.Tensor = expert_ids) -> torch.Tensor:
                layer = position[0] = (position[0] + 1) % shape.layers
                return shard.run(layer, x, expert_ids)  # [n, D]

            active_count = int((torch.bincount(expert_ids, minlength=held) > 0).sum())
            points.append([float(rows), float(active_count)])
            calls.append(invoke)
    with torch.inference_mode():
        medians = _median_times(calls, shape.repeats, device)
    return [[*point, seconds] for point, seconds in zip(points, medians, strict=True)]


def _on(weights: tuple[Any, Any], device: str, dtype: Any) -> tuple[Any, Any]:
    """An expert's (gate_up, down) moved to ``device`` in ``dtype``."""
    gate_up, down = weights
    return gate_up.to(device, dtype), down.to(device, dtype)


def _time_attention(shape: CalibrationShape) -> list[list[float]]:
    """[tokens, median s] of one attention-side layer call of ``bench ep``'s trace workload, through
    the runtime's own code with the expert workers' answer taken as given: the synthetic model's
    mixer step, the routing lookup, :func:`moeserve.ep.dispatch.plan_dispatch` over the run's
    expert workers and :func:`~moeserve.ep.dispatch.combine_outputs`; each call on the next of
    ``shape.layers`` layers' weights."""
    import torch

    from moeserve.ep.dispatch import combine_outputs, plan_dispatch
    from moeserve.ep.workload import rms_norm
    from moeserve.moe.types import RouterOutput

    generator = torch.Generator().manual_seed(1)
    hidden, top_k, workers, device = shape.hidden, shape.top_k, shape.processes - 1, shape.device
    dtype = getattr(torch, shape.dtype)
    num_experts = shape.experts_per_worker * workers
    expert2worker = (torch.arange(num_experts) // shape.experts_per_worker).to(device)  # [E]
    mixers = (torch.randn(shape.layers, hidden, hidden, generator=generator) * hidden**-0.5).to(device, dtype)  # [L, D, D]
    position = [0]
    calls: list[Callable[[], Any]] = []
    for tokens in shape.token_counts:
        h = torch.randn(tokens, hidden, generator=generator).to(device, dtype)  # [T, D]
        table = torch.stack(
            [torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)]
        ).to(device)  # [T, k] distinct experts per token
        weights = torch.full((tokens, top_k), 1.0 / top_k, device=device, dtype=dtype)  # [T, k]

        def call(h: torch.Tensor = h, table: torch.Tensor = table, weights: torch.Tensor = weights) -> torch.Tensor:
            layer = position[0] = (position[0] + 1) % shape.layers
            mixed = h + torch.nn.functional.linear(rms_norm(h), mixers[layer])  # [T, D]
            routing = RouterOutput(topk_ids=table[torch.arange(h.shape[0], device=h.device)], topk_weights=weights)
            plan = plan_dispatch(layer, rms_norm(mixed), routing, expert2worker, workers)
            return mixed + combine_outputs(plan, plan.groups.rows, h.shape[0])  # [T, D]

        calls.append(call)
    with torch.inference_mode():
        medians = _median_times(calls, shape.repeats, device)
    return [[float(tokens), seconds] for tokens, seconds in zip(shape.token_counts, medians, strict=True)]


RELATIVE_FIT_FLOOR_S = 1e-6
"""Targets below this count as this in the relative-error fits (a time of 0 has no relative error)."""


def _nonnegative_least_squares(design: np.ndarray, target: np.ndarray, relative_to: np.ndarray | None = None) -> list[float]:
    """Coefficients >= 0 of ``design @ x ~ target``: least squares on errors relative to
    ``relative_to`` (default: the target; each point weighs the same, so a grid of calls from 1 to
    200,000 rows does not fit only its largest), dropping negative columns until none are left."""
    scale = 1.0 / np.maximum(target if relative_to is None else relative_to, RELATIVE_FIT_FLOOR_S)  # [points]
    design, target = design * scale[:, None], target * scale
    columns = list(range(design.shape[1]))
    coefficients = np.zeros(design.shape[1])
    while columns:
        solution, *_ = np.linalg.lstsq(design[:, columns], target, rcond=None)
        if (solution >= 0).all():
            coefficients[columns] = solution
            break
        columns.pop(int(np.argmin(solution)))
    return [float(value) for value in coefficients]


# --------------------------------------------------------------------------------------------
# processors, hand-offs and messages


def _spin(iterations: int, results: Any) -> None:
    start = time.perf_counter()
    total = 0
    for index in range(iterations):
        total += index * index
    results.put(time.perf_counter() - start)


def measure_parallel_speedup(max_processes: int | None = None, iterations: int = 1_500_000) -> list[float]:
    """[k] aggregate speed-up of k = 1..max_processes concurrent CPU-bound processes over one.

    Each process runs the same pure-Python loop (no thread pools, so forking is safe);
    speed-up_k = k * time_1 / mean time_k. On an idle machine it follows min(k, cores); on a
    shared one it says how many processors other work leaves to ours. Default max_processes:
    ``os.cpu_count() + 1``.
    """
    import multiprocessing

    context = multiprocessing.get_context("fork")
    count = max_processes or (os.cpu_count() or 1) + 1
    means = []
    for processes in range(1, count + 1):
        results = context.Queue()
        workers = [context.Process(target=_spin, args=(iterations, results), daemon=True) for _ in range(processes)]
        for worker in workers:
            worker.start()
        times = [results.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(timeout=10)
        means.append(float(np.mean(times)))
    return [processes * means[0] / mean for processes, mean in enumerate(means, start=1)]


def measure_thread_switch(repeats: int = 60) -> float:
    """Median seconds of one hand-off to another thread and back (two ``threading.Event`` wake-ups).

    What the async attention worker pays per micro-batch layer call to give its compute slot to
    the micro-batch's thread and get it back; on a loaded machine it is scheduler wake-up latency.
    """
    import threading

    go, back = threading.Event(), threading.Event()
    stop = False

    def partner() -> None:
        while True:
            go.wait()
            go.clear()
            back.set()
            if stop:
                return

    thread = threading.Thread(target=partner, daemon=True)
    thread.start()
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        go.set()
        back.wait()
        back.clear()
        if index:
            times.append(time.perf_counter() - start)
    stop = True
    go.set()
    thread.join(timeout=5)
    return float(np.median(times))



def _gloo_peer(port: int, rank: int, processes: int, folder: str, message_rows: list[int], capacity: int,
               exchange_rows: list[int], hidden: int, rounds: int) -> None:
    """Ranks 1..R-1 of :func:`measure_gloo`: answer each Dispatch with a Combine of its rows through the
    runtime's transport, report the processor time that took, then play an expert worker's side of
    the sync exchange (no compute between receiving the rows and sending them back)."""
    import torch
    import torch.distributed as dist

    from moeserve.ep.messages import Combine, Dispatch, Shutdown, Stopped
    from moeserve.ep.serialize import Doorbell, InboxSet, Outbox

    torch.set_num_threads(1)
    doorbell = Doorbell(folder, rank)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=processes, timeout=GLOO_TIMEOUT
    )
    try:
        inbox = InboxSet(doorbell, [0], capacity, TRANSPORT_DEPTH, GLOO_TIMEOUT.total_seconds())
        outbox = Outbox(rank=rank, depth=TRANSPORT_DEPTH, doorbell=doorbell)
        dist.barrier()  # every rank's receives are posted
        index_of = {rows: index for index, rows in enumerate(message_rows)}
        cpu = torch.zeros(len(message_rows), dtype=torch.float64)  # [sizes] seconds over all rounds
        mark = time.process_time()
        while True:
            message = inbox.receive()
            if isinstance(message, Shutdown):
                break
            assert isinstance(message, Dispatch), f"calibration peer got {message!r}"
            outbox.send(Combine(message.micro_batch, message.layer, rank, message.rows), 0)
            now = time.process_time()  # taking this message and sending its answer: two ends
            cpu[index_of[message.rows.shape[0]]] += now - mark
            mark = now
        outbox.send_final(Stopped(sender=rank), 0)
        outbox.flush()
        dist.send(cpu / (2 * rounds), dst=0)  # per message end
        nothing = [0] * processes
        control = torch.zeros(processes, CONTROL_WIDTH, dtype=torch.int64)
        for _ in range(rounds):
            for total in exchange_rows:
                count = _worker_rows(total, processes - 1)[rank - 1]
                dist.all_to_all_single(torch.empty_like(control), control)
                rows = torch.empty(count, hidden)
                from_attention = [count] + [0] * (processes - 1)
                dist.all_to_all_single(rows, torch.empty(0, hidden), from_attention, nothing)
                dist.all_to_all_single(torch.empty(0, hidden), rows, nothing, from_attention)
    finally:
        dist.destroy_process_group()
        doorbell.close()


TRANSPORT_DEPTH = 2
"""Receives each rank keeps posted in the calibration's message rounds (one in flight, one final)."""
GLOO_TIMEOUT = timedelta(seconds=120)
"""How long a calibration rank waits for a peer (a dead peer ends the calibration with an error)."""


def _worker_rows(total: int, workers: int) -> list[int]:
    """``total`` rows split as evenly as possible over ``workers`` (the first ones get the remainder)."""
    return [total // workers + (1 if index < total % workers else 0) for index in range(workers)]


@dataclass(frozen=True)
class GlooTimings:
    """What :func:`measure_gloo` measured among R processes on this machine."""

    processes: int
    round_trip_s: list[float]
    """Per message row count: median seconds for rank 0 to send a Dispatch to every other rank and
    take every answering Combine back."""
    message_cpu_s: list[float]
    """Per message row count: processor time one message costs at one end (sending or taking it),
    the mean of rank 0's and the other ranks' figures."""
    exchange_s: list[float]
    """Per total row count: median seconds of one sync-mode layer exchange (three collectives)."""


def measure_gloo(
    message_rows: list[int], exchange_rows: list[int] | None = None, hidden: int = 128, repeats: int = 15,
    processes: int = 2,
) -> GlooTimings:
    """Time gloo (TCP on loopback) among ``processes`` ranks: this process is rank 0, the others forked here.

    1. **Messages, through the runtime's own transport** (:mod:`moeserve.ep.serialize`: one
       gloo send into receives posted ahead, and a doorbell ring): per row count, rank 0 sends a
       Dispatch of that many rows of ``hidden`` float32 to every other rank at once, and each
       answers with a Combine of the same rows; the median round trip. Every process's
       processor time over these rounds (its gloo threads included) gives the processor time
       per message end: rank 0's over ``2 x (R - 1)`` ends a round, the others' over two.
    2. **The sync exchange** (``moeserve.ep.sync``): per total row count N, the three
       ``all_to_all_single`` of one layer call over all ranks (a control row per rank, N rows
       split evenly from rank 0 to the others, and the same rows back), with nothing computed
       in between; the median seconds. Every rank takes part in each collective, so its cost
       grows with the number of processes (on 2 cores: about 1.2 ms for 2 processes, 3.3 ms
       for 3, 7.9 ms for 4 at 192 rows, against about 0.3 ms for a message round trip).

    Points are timed round-robin after a warm-up round. On a loaded machine the times are
    bimodal (a peer gets a core at once or waits for the scheduler); the median over many rounds
    says which is typical now. This process must not already be in a default process group
    (``RuntimeError`` otherwise); ``processes`` must be >= 2 (``ValueError``).
    """
    import multiprocessing
    import shutil
    import tempfile

    import torch
    import torch.distributed as dist

    from moeserve.ep.launch import stop_processes
    from moeserve.ep.messages import Combine, Dispatch, Shutdown, Stopped
    from moeserve.ep.serialize import Doorbell, InboxSet, Outbox, message_capacity

    if processes < 2:
        raise ValueError(f"measure_gloo needs at least 2 processes, got {processes}")
    if dist.is_initialized():
        raise RuntimeError("measure_gloo needs a process outside any torch.distributed group")
    exchange_rows = list(exchange_rows or [])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    rounds = repeats + 1
    capacity = message_capacity(max(message_rows), hidden)
    folder = tempfile.mkdtemp(prefix="moeserve-calibrate-")
    doorbell = Doorbell(folder, 0)
    context = multiprocessing.get_context("fork")
    peers = [
        context.Process(
            target=_gloo_peer,
            args=(port, rank, processes, folder, message_rows, capacity, exchange_rows, hidden, rounds),
            daemon=True,
        )
        for rank in range(1, processes)
    ]
    for peer in peers:
        peer.start()
    others = list(range(1, processes))
    round_trip = np.zeros((repeats, len(message_rows)))  # [repeats, row counts]
    exchange = np.zeros((repeats, len(exchange_rows)))  # [repeats, row counts]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=processes, timeout=GLOO_TIMEOUT
        )
        try:
            inbox = InboxSet(doorbell, others, capacity, TRANSPORT_DEPTH, GLOO_TIMEOUT.total_seconds())
            outbox = Outbox(rank=0, depth=TRANSPORT_DEPTH, doorbell=doorbell)
            dist.barrier()  # every rank's receives are posted
            messages = [
                Dispatch(0, 0, torch.zeros(rows, hidden), torch.zeros(rows, dtype=torch.int64)) for rows in message_rows
            ]
            rank0_cpu = np.zeros(len(messages))  # [sizes] seconds over all rounds
            for round_index in range(rounds):
                for index, message in enumerate(messages):
                    start, cpu_started = time.perf_counter(), time.process_time()
                    for rank in others:
                        outbox.send(message, rank)
                    for _ in others:
                        assert isinstance(inbox.receive(), Combine)
                    outbox.flush()
                    rank0_cpu[index] += time.process_time() - cpu_started
                    if round_index:
                        round_trip[round_index - 1, index] = time.perf_counter() - start
            rank0_cpu /= rounds * 2 * len(others)  # per message end
            for rank in others:
                outbox.send_final(Shutdown(), rank)
            stopped = 0
            while stopped < len(others):
                stopped += isinstance(inbox.receive(), Stopped)
            outbox.flush()
            peer_cpu = np.zeros(len(messages))  # [sizes] mean over the other ranks, per message end
            for rank in others:
                report = torch.zeros(len(messages), dtype=torch.float64)
                dist.recv(report, src=rank)
                peer_cpu += report.numpy() / len(others)
            nothing = [0] * processes
            control = torch.zeros(processes, CONTROL_WIDTH, dtype=torch.int64)
            for round_index in range(rounds):
                for index, total in enumerate(exchange_rows):
                    rows = torch.zeros(total, hidden)  # [N, D]
                    splits = [0, *_worker_rows(total, processes - 1)]
                    start = time.perf_counter()
                    dist.all_to_all_single(torch.empty_like(control), control)
                    dist.all_to_all_single(torch.empty(0, hidden), rows, nothing, splits)
                    dist.all_to_all_single(torch.empty_like(rows), torch.empty(0, hidden), splits, nothing)
                    if round_index:
                        exchange[round_index - 1, index] = time.perf_counter() - start
        finally:
            dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads)
        doorbell.close()
        deadline = time.monotonic() + 10  # for all peers together
        for peer in peers:
            peer.join(timeout=max(0.0, deadline - time.monotonic()))
        stop_processes(peers)  # any still running after that
        shutil.rmtree(folder, ignore_errors=True)
    return GlooTimings(
        processes=processes,
        round_trip_s=[float(value) for value in np.median(round_trip, axis=0)],
        message_cpu_s=[float(value) for value in (rank0_cpu + peer_cpu) / 2],
        exchange_s=[float(value) for value in np.median(exchange, axis=0)] if exchange_rows else [],
    )


def fit_message_cpu(message_rows: list[int], message_cpu_s: list[float], bytes_per_row: int) -> tuple[float, float]:
    """(``message_cpu_s``, ``message_cpu_per_byte_s``) of the simulator from measured processor time
    per message end at each row count: ``c + bytes * c_byte`` with bytes = rows x bytes per row,
    fitted on relative errors."""
    sizes = np.array([rows * bytes_per_row for rows in message_rows], dtype=np.float64)
    fixed, per_byte = _nonnegative_least_squares(np.stack([np.ones(sizes.size), sizes], axis=1), np.array(message_cpu_s))
    return fixed, per_byte


def fit_message_latency(
    message_rows: list[int], round_trip_s: list[float], workers: int, message_cpu_s: list[float], bytes_per_row: int
) -> tuple[float, float]:
    """(``message_latency_s``, ``bandwidth_bytes_per_s``) from measured fan-out round trips, in the simulator's terms.

    The simulator charges each message its processor time ``c`` (``message_cpu_s`` here, per row
    count) at both ends and, in between, a latency plus its bytes over the sender's one link,
    where messages leave one after another. A fan-out round to W workers then takes ``2 (W + 1)
    c`` of processing on the critical path (rank 0's W sends and W takes, one worker's take and
    send), the W dispatches' bytes leaving rank 0 in turn and the last worker's answer coming
    back: ``round trip = 2 (W + 1) c + 2 latency + (W + 1) bytes / bandwidth`` with bytes = rows x
    bytes per row (the simulator's message bytes; the 64-byte header is in the latency), fitted on
    errors relative to the round trip (a flight is the difference of two measured times: relative
    to itself, a flight near 0 would outweigh every other point). Row counts whose processing alone exceeds
    the round trip (on a machine with fewer cores than processes, processing overlaps) are left
    out; none left: latency 1 ns and no per-byte cost (bandwidth 1e15).
    """
    sizes = np.array([rows * bytes_per_row for rows in message_rows], dtype=np.float64)
    trips = np.array(round_trip_s)  # [sizes]
    flights = trips - 2 * (workers + 1) * np.array(message_cpu_s)  # [sizes]
    kept = flights > 0
    if not kept.any():
        return 1e-9, 1e15
    if np.unique(sizes[kept]).size < 2:  # one size: nothing to say about bandwidth
        (latency,) = _nonnegative_least_squares(np.full((int(kept.sum()), 1), 2.0), flights[kept], trips[kept])
        return max(latency, 1e-9), 1e15
    design = np.stack([np.full(int(kept.sum()), 2.0), (workers + 1) * sizes[kept]], axis=1)  # [kept, 2]
    latency, per_byte = _nonnegative_least_squares(design, flights[kept], trips[kept])
    return max(latency, 1e-9), 1.0 / max(per_byte, 1e-15)


def fit_collective(exchange_rows: list[int], exchange_s: list[float], workers: int, bytes_per_row: int) -> tuple[float, float]:
    """(``collective_latency_s``, ``collective_bandwidth_bytes_per_s``) from measured sync exchanges,
    in the simulator's own terms.

    The simulator charges one sync layer exchange of N rows over W expert workers (one attention
    worker) as three collective latencies plus the busiest links' bytes: the dispatch's N rows
    leaving the attention worker and the combine's largest worker block coming back, ``t = 3 L +
    (N + ceil(N / W)) * bytes_per_row / bandwidth``; fitted on relative errors (L at least 1 ns;
    no per-byte term measured: bandwidth 1e15).
    """
    moved = np.array([(rows + -(-rows // workers)) * bytes_per_row for rows in exchange_rows], dtype=np.float64)
    design = np.stack([np.full(moved.size, 3.0), moved], axis=1)  # [points, 2]
    latency, per_byte = _nonnegative_least_squares(design, np.array(exchange_s))
    return max(latency, 1e-9), 1.0 / max(per_byte, 1e-15)
