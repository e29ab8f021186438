"""Discrete-event simulator of expert parallelism: barrier (``sync``) against mu-queues (``async``).

Roles (DESIGN 5): A attention workers run embeddings, attention, router and KV cache for their
share of the in-flight tokens; E expert workers hold the experts a placement gives them
(``expert2rank`` per layer). Routing is replayed from a trace (each token's experts per layer)
or drawn by :func:`synthetic_routing`. Two workloads: decode-only (every trace row is one
decode token; in-flight token slots take rows in trace order, cycling, ``passes`` times) and
:class:`RequestWorkload` (requests with a prefill and decode steps, as ``moeserve bench ep`` runs
them, so the simulator can be checked against the real runtime at the same description).

- ``sync``: per layer, every attention worker runs attention on its whole batch, the split
  sizes are exchanged (one message latency), a barrier all-to-all dispatches, every expert worker runs its tokens, and the combine waits for the
  slowest expert worker before the next layer starts. Attention workers idle meanwhile.
- ``async`` (AMoE, arXiv 2505.08944, DESIGN 1C): each attention worker splits its tokens into
  micro-batches that move through the layers independently (a heapq event queue). Dispatched
  tokens wait in per-layer mu-queues at expert workers; a free expert worker asks a layer
  scheduler (:data:`~moeserve.sim.schedulers.LAYER_SCHEDULERS`) which layer to run and re-batches
  everything queued for it. A layer runs once it holds ``hold_tokens_per_expert`` per resident expert or its oldest entry
  waited ``flush_after_s``.

Costs (:class:`SimCosts`): an expert-worker invocation costs ``call + a + b * tokens`` per
expert that has tokens (so tiny batches pay the fixed overhead), an attention layer ``c + d *
tokens`` (async: plus a hand-off per micro-batch layer call), and a message ``latency + bytes /
bandwidth`` plus, in async, ``message_cpu_s + bytes * message_cpu_per_byte_s`` of processor
time at each end (charged to the sending and the receiving worker's computations; sync's collectives are charged as measured
wholes, ``collective_latency_s``). Costs are the assumed GPU-class defaults or measured on this machine
(:mod:`moeserve.sim.calibrate`). With ``cores`` > 0 all computations share that many processors
first-come first-served (the real runs here put every worker process on the same cores). Each worker has one outgoing link: its messages leave one
after another (a FIFO link resource), so a dispatch or combine of N bytes from one worker takes
``latency + N / bandwidth`` for its last message; different workers' links run in parallel and
receivers are not a bottleneck.

The simulator knows nothing of numerics (outputs are the same in both modes by construction), of
memory or of queueing in the network; it is a model, and its figures are simulator figures, not
measurements of a real run.

Shape legend: T trace tokens, L MoE layers, K = top_k, E experts per layer, W expert workers,
A attention workers, b tokens in a batch.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from moeserve.placement.balance import greedy_placement
from moeserve.sim.schedulers import DEFRAG_HISTORY, LAYER_SCHEDULERS, QueueSnapshot
from moeserve.traces.format import UNKNOWN_EXPERT, Trace

MODES = ("sync", "async")


@dataclass(frozen=True)
class SimCosts:
    """Time costs of the simulated machine, in seconds and bytes.

    The defaults are assumed, not measured: one H100-class GPU per worker serving
    DeepSeek-V2-Lite-sized layers in bf16 with a 400 Gb/s NIC each. Reasoning: an expert's
    weights (3 x 2048 x 1408 x 2 B = 17 MB) stream at ~3 TB/s plus a launch (a = 10 us) and 17
    MFLOP per token run at ~200 TFLOP/s (b = 0.1 us); attention reads ~2k tokens of MLA cache
    (576 x 2 B each, 2.3 MB per token and layer) and runs the shared experts (d = 0.8 us), plus
    weights and launches per batch (c = 20 us); a message costs 10 us plus bytes at 50 GB/s.
    :func:`moeserve.sim.calibrate.calibrate_costs` measures this machine instead and names what
    it measured in ``measured``. Every value must be finite and >= 0 (bandwidth > 0); ``ValueError`` otherwise.
    """

    expert_call_overhead_s: float = 0.0
    """Fixed time of one expert-worker invocation with any tokens, however many experts it runs
    (grouping rows, host dispatch); 0 by default: on a GPU it is one of the per-expert launches."""
    expert_overhead_s: float = 10e-6
    """a: fixed time per expert invocation with at least one token (weights read, launch)."""
    expert_per_token_s: float = 0.1e-6
    """b: time per token routed to one expert."""
    attention_overhead_s: float = 20e-6
    """c: fixed time of one attention layer on one batch (weights, launch, shared experts)."""
    attention_per_token_s: float = 0.8e-6
    """d: attention time per token of the batch (KV cache reads, projections)."""
    attention_switch_s: float = 0.0
    """async only: time to hand the attention worker to another micro-batch and back, once per
    micro-batch layer call (the real runtime's thread hand-offs); 0 by default: a GPU worker
    switches micro-batches by launching on another stream."""
    message_latency_s: float = 10e-6
    """Fixed time of one point-to-point message between an attention and an expert worker (async)."""
    message_cpu_s: float = 0.0
    """async: fixed processor time one message costs at each end (encoding or decoding it, system
    calls, the doorbell, the transport's event-loop thread), taken from the worker's compute:
    the attention worker pays it for every dispatch it sends and combine it takes, an expert
    worker for every dispatch it takes and combine it sends. 0 by default: on a GPU server a NIC
    and a CPU core beside the GPU do this work."""
    message_cpu_per_byte_s: float = 0.0
    """async: processor time per byte of a message at each end (its copies), added to ``message_cpu_s``."""
    collective_latency_s: float = 10e-6
    """Fixed time of one all-to-all over all workers (sync: the split sizes, the dispatch and the
    combine are one each); by default the same as a message."""
    bandwidth_bytes_per_s: float = 50e9
    """Outgoing link bandwidth of one worker, shared by its messages."""
    collective_bandwidth_bytes_per_s: float = 0.0
    """sync: bytes per second of the busiest link in an all-to-all; 0: ``bandwidth_bytes_per_s``
    (measured separately on this machine, where a collective's bytes and a message's do not
    cost the same)."""
    bytes_per_token: int = 4096
    """Activation bytes per token and expert assignment (hidden 2048 x bf16)."""
    measured: tuple[str, ...] = ()
    """Names of the fields measured on this machine; the others are assumed."""

    def __post_init__(self) -> None:
        for item in fields(self):
            if item.name == "measured":
                continue
            value = getattr(self, item.name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{item.name} must be a finite number >= 0, got {value!r}")
        if self.bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s!r}")
        unknown = sorted(set(self.measured) - {item.name for item in fields(self)})
        if unknown:
            raise ValueError(f"measured names unknown field(s) {', '.join(unknown)}")

    def expert_time(self, tokens_per_expert: np.ndarray) -> float:
        """Seconds for one worker to run tokens_per_expert [E'] (zeros are not invoked)."""
        active = tokens_per_expert[tokens_per_expert > 0]
        if not active.size:
            return 0.0
        return float(
            self.expert_call_overhead_s + active.size * self.expert_overhead_s + active.sum() * self.expert_per_token_s
        )

    def attention_time(self, tokens: int) -> float:
        """Seconds of one attention layer over a batch of ``tokens`` tokens."""
        return self.attention_overhead_s + tokens * self.attention_per_token_s

    def message_cpu_time(self, assignments: int) -> float:
        """Processor seconds one message carrying ``assignments`` token activations costs at one end."""
        return self.message_cpu_s + assignments * self.bytes_per_token * self.message_cpu_per_byte_s

    def transfer_time(self, assignments: int) -> float:
        """Seconds of one message carrying ``assignments`` token activations."""
        return self.message_latency_s + assignments * self.bytes_per_token / self.bandwidth_bytes_per_s

    def collective_time(self, assignments: int) -> float:
        """Seconds of one all-to-all in which the busiest link carries ``assignments`` token activations."""
        bandwidth = self.collective_bandwidth_bytes_per_s or self.bandwidth_bytes_per_s
        return self.collective_latency_s + assignments * self.bytes_per_token / bandwidth


@dataclass(frozen=True)
class RequestWorkload:
    """Requests as ``moeserve bench ep`` runs them. Invalid values raise ``ValueError``.

    Request r replays trace rows from ``r * (prompt_tokens + new_tokens)`` on (modulo T): a
    prefill step over its ``prompt_tokens`` rows yields its first token, then ``new_tokens - 1``
    decode steps of one row each. Requests are split evenly over attention workers; in ``sync``
    each attention worker runs its requests as one batch, in ``async`` as
    ``micro_batches_per_worker`` micro-batches. Throughput counts generated tokens
    (``requests * new_tokens``) over the whole run, prefill included; latency percentiles are over
    decode tokens, each taking its step's duration (as the real benchmark records them).
    """

    requests: int = 32
    prompt_tokens: int = 16
    new_tokens: int = 16

    def __post_init__(self) -> None:
        for name in ("requests", "prompt_tokens", "new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class EPSimConfig:
    """What to simulate. Invalid values raise ``ValueError`` naming them."""

    attention_workers: int
    """A >= 1."""
    expert_workers: int
    """W >= 1, at most E (every worker holds an expert)."""
    mode: str = "async"
    """``sync`` (barrier all-to-all per layer) or ``async`` (mu-queues)."""
    tokens_per_attention_worker: int = 256
    """In-flight tokens (decode slots) each attention worker holds, in both modes."""
    micro_batches_per_worker: int = 4
    """async: micro-batches the in-flight tokens are split into (must divide into >= 1 token each)."""
    scheduler: str = "defrag"
    """async: name in ``LAYER_SCHEDULERS``."""
    hold_tokens_per_expert: float = 32.0
    """async: a layer runs once its mu-queue holds this many assignments per expert the worker
    holds at that layer (the threshold scales with the worker's share of experts) ..."""
    flush_after_s: float = 20e-6
    """async: ... or once its oldest entry has waited this long."""
    passes: int = 4
    """Forward passes (decode steps) every in-flight token makes; throughput counts them all."""
    workload: RequestWorkload | None = None
    """Requests with a prefill then decode steps, as ``moeserve bench ep`` runs them; when given,
    ``tokens_per_attention_worker`` and ``passes`` are ignored (see :class:`RequestWorkload`)."""
    cores: int = 0
    """Processors all workers share (0: every worker has its own). With C > 0, attention and
    expert computations queue first-come first-served for C processors: the real runs on this
    machine put every worker process on the same few cores."""

    def __post_init__(self) -> None:
        for name in (
            "attention_workers",
            "expert_workers",
            "tokens_per_attention_worker",
            "micro_batches_per_worker",
            "passes",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        LAYER_SCHEDULERS.get(self.scheduler)
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 0:
            raise ValueError(f"cores must be an integer >= 0, got {self.cores!r}")
        if self.workload is not None:
            per_worker = self.workload.requests // self.attention_workers
            needed = self.micro_batches_per_worker if self.mode == "async" else 1
            if per_worker < needed:
                raise ValueError(
                    f"requests {self.workload.requests} give {per_worker} per attention worker, fewer "
                    f"than the {needed} batch(es) each must hold"
                )
        elif self.micro_batches_per_worker > self.tokens_per_attention_worker:
            raise ValueError(
                f"micro_batches_per_worker {self.micro_batches_per_worker} exceeds "
                f"tokens_per_attention_worker {self.tokens_per_attention_worker}"
            )
        hold = self.hold_tokens_per_expert
        if isinstance(hold, bool) or not (
            isinstance(hold, int | float) and math.isfinite(hold) and hold >= 0
        ):
            raise ValueError(f"hold_tokens_per_expert must be a finite number >= 0, got {hold!r}")
        if not (
            isinstance(self.flush_after_s, int | float)
            and math.isfinite(self.flush_after_s)
            and self.flush_after_s >= 0
        ):
            raise ValueError(f"flush_after_s must be a finite number >= 0, got {self.flush_after_s!r}")


@dataclass(frozen=True)
class SimResult:
    """Figures of one simulated run (simulator figures, not measurements)."""

    mode: str
    attention_workers: int
    expert_workers: int
    scheduler: str | None
    """async: the layer scheduler; sync: None."""
    tokens: int
    """Tokens produced: decode-only, token forward passes completed; with a workload, generated tokens."""
    makespan_s: float
    throughput_tokens_per_s: float
    latency_p50_s: float
    """Per-token latency of one forward pass (decode step) through all L layers; a prefill is not counted."""
    latency_p90_s: float
    latency_p99_s: float
    expert_utilisation: tuple[float, ...]
    """[W] busy time / makespan per expert worker."""
    attention_utilisation: float
    """Mean busy time / makespan over attention workers."""
    mean_barrier_wait_s: float
    """sync: per expert worker and layer, mean time it waited for the slowest; async: 0."""
    mean_queue_depth: float
    """async: mean tokens (assignments / top_k) waiting at a worker at its decisions; sync: 0."""
    max_queue_depth: float
    mean_expert_batch: float
    """Mean tokens per expert invocation."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; keys are the field names plus ``mean_expert_utilisation``."""
        document: dict[str, Any] = {item.name: getattr(self, item.name) for item in fields(self)}
        document["expert_utilisation"] = list(self.expert_utilisation)
        document["mean_expert_utilisation"] = float(np.mean(self.expert_utilisation))
        return document

    def render_table(self) -> str:
        """Plain-text two-column table of the headline figures."""
        rows = [
            ("mode", self.mode + (f" ({self.scheduler})" if self.scheduler else "")),
            ("workers (attention + expert)", f"{self.attention_workers} + {self.expert_workers}"),
            ("tokens", str(self.tokens)),
            ("throughput (tokens/s, simulated)", f"{self.throughput_tokens_per_s:,.0f}"),
            (
                "latency p50 / p90 / p99 (ms)",
                f"{self.latency_p50_s * 1e3:.3f} / {self.latency_p90_s * 1e3:.3f} / {self.latency_p99_s * 1e3:.3f}",
            ),
            (
                "expert utilisation mean / max",
                f"{np.mean(self.expert_utilisation):.2f} / {max(self.expert_utilisation):.2f}",
            ),
            ("attention utilisation", f"{self.attention_utilisation:.2f}"),
            ("mean barrier wait (us)", f"{self.mean_barrier_wait_s * 1e6:.1f}"),
            (
                "mu-queue depth mean / max (tokens)",
                f"{self.mean_queue_depth:.1f} / {self.max_queue_depth:.1f}",
            ),
            ("mean tokens per expert invocation", f"{self.mean_expert_batch:.1f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def synthetic_routing(
    num_tokens: int, num_layers: int, num_experts: int, top_k: int, skew: float = 1.0, seed: int = 0
) -> np.ndarray:
    """int16 [T, L, K]: each token's top_k distinct experts per layer, drawn with Zipf(skew) popularity.

    Expert popularity is ``rank ** -skew`` over a random permutation per layer (skew 0: uniform).
    """
    if top_k > num_experts:
        raise ValueError(f"top_k {top_k} exceeds num_experts {num_experts}")
    rng = np.random.default_rng(seed)
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(skew)  # [E]
    routing = np.empty((num_tokens, num_layers, top_k), dtype=np.int16)
    for layer in range(num_layers):
        popularity = weights[rng.permutation(num_experts)]  # [E]
        # Gumbel top-k draws k distinct experts with probabilities proportional to popularity.
        keys = np.log(popularity)[None, :] - np.log(-np.log(rng.random((num_tokens, num_experts))))  # [T, E]
        routing[:, layer, :] = np.argsort(-keys, axis=1)[:, :top_k]
    return routing


def greedy_expert2rank(routing: np.ndarray, num_experts: int, expert_workers: int) -> np.ndarray:
    """int64 [L, E]: per layer, ``greedy_placement`` of the routing's expert loads on the workers."""
    num_layers = routing.shape[1]
    placement = np.empty((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        ids = routing[:, layer, :]
        loads = np.bincount(ids[ids != UNKNOWN_EXPERT].astype(np.int64), minlength=num_experts)  # [E]
        placement[layer] = greedy_placement(loads.astype(np.float64), expert_workers)
    return placement


def simulate_trace(trace: Trace, config: EPSimConfig, costs: SimCosts | None = None) -> SimResult:
    """:func:`simulate_ep` on a trace's routing, experts placed greedily from the trace's loads
    (with a workload: from its requests' prompt rows, as the real runtime places them)."""
    if config.workload is not None:
        placement = request_expert2rank(
            trace.experts, trace.meta.num_experts, config.expert_workers, config.workload
        )
    else:
        placement = greedy_expert2rank(trace.experts, trace.meta.num_experts, config.expert_workers)
    return simulate_ep(trace.experts, trace.meta.num_experts, config, costs, placement)


def simulate_ep(
    routing: np.ndarray,
    num_experts: int,
    config: EPSimConfig,
    costs: SimCosts | None = None,
    expert2rank: np.ndarray | None = None,
) -> SimResult:
    """Simulate ``config`` replaying ``routing`` int16 [T, L, K] (-1 entries are skipped).

    ``expert2rank`` int64 [L, E] maps experts to expert workers (default: greedy from the
    routing's loads). Deterministic: same inputs, same result.
    """
    costs = costs or SimCosts()
    routing = np.asarray(routing)
    if routing.ndim != 3 or routing.shape[0] == 0:
        raise ValueError(f"routing must be [T, L, K] with T >= 1, got shape {routing.shape}")
    if config.expert_workers > num_experts:
        raise ValueError(
            f"expert_workers {config.expert_workers} exceeds the {num_experts} experts per layer"
        )
    if expert2rank is None:
        expert2rank = greedy_expert2rank(routing, num_experts, config.expert_workers)
    expert2rank = np.asarray(expert2rank, dtype=np.int64)
    if expert2rank.shape != (routing.shape[1], num_experts):
        raise ValueError(
            f"expert2rank must be [L, E] = {(routing.shape[1], num_experts)}, got {expert2rank.shape}"
        )
    if (expert2rank < 0).any() or (expert2rank >= config.expert_workers).any():
        raise ValueError(f"expert2rank must map to workers in [0, {config.expert_workers})")
    if config.mode == "sync":
        return _simulate_sync(routing, num_experts, config, costs, expert2rank)
    return _AsyncSimulation(routing, num_experts, config, costs, expert2rank).run()


# --------------------------------------------------------------------------------------------
# what every batch runs


@dataclass(frozen=True)
class _Step:
    """One forward step of one batch: its trace rows, the tokens it yields, whether it is timed."""

    rows: np.ndarray
    """int64 [n] trace rows that run through every layer in this step."""
    tokens: int
    """Tokens the step generates (counted in throughput)."""
    timed: bool
    """Whether its tokens enter the latency percentiles (decode steps; a prefill is not)."""


def _plan_batches(num_rows: int, config: EPSimConfig, batches_per_worker: int) -> list[list[list[_Step]]]:
    """[A][batches_per_worker][steps] the steps of every batch, deterministic.

    Decode-only (no workload): pass p gives attention worker a, batch m the next rows of the
    trace in order (a before a + 1, m before m + 1), so sync's one batch per worker holds the
    same rows as async's micro-batches together. With a workload: see :class:`RequestWorkload`.
    """
    attention = config.attention_workers
    if config.workload is None:
        split = np.linspace(0, config.tokens_per_attention_worker, batches_per_worker + 1).astype(int)
        plan: list[list[list[_Step]]] = [[[] for _ in range(batches_per_worker)] for _ in range(attention)]
        cursor = 0
        for _ in range(config.passes):
            for worker in range(attention):
                for batch, size in enumerate(np.diff(split).tolist()):
                    rows = (cursor + np.arange(size)) % num_rows  # [b]
                    cursor = (cursor + size) % num_rows
                    plan[worker][batch].append(_Step(rows, size, True))
        return plan
    workload = config.workload
    span = workload.prompt_tokens + workload.new_tokens
    starts = np.arange(workload.requests, dtype=np.int64) * span  # [R]
    worker_bounds = np.linspace(0, workload.requests, attention + 1).astype(int)
    plan = []
    for worker in range(attention):
        own = starts[worker_bounds[worker] : worker_bounds[worker + 1]]
        batch_bounds = np.linspace(0, own.size, batches_per_worker + 1).astype(int)
        batches = []
        for batch in range(batches_per_worker):
            first = own[batch_bounds[batch] : batch_bounds[batch + 1]]  # [b]
            prefill = (first[:, None] + np.arange(workload.prompt_tokens)[None, :]).reshape(-1) % num_rows
            steps = [_Step(prefill, int(first.size), False)]
            for step in range(1, workload.new_tokens):
                rows = (first + workload.prompt_tokens + step - 1) % num_rows  # [b]
                steps.append(_Step(rows, int(first.size), True))
            batches.append(steps)
        plan.append(batches)
    return plan


def request_expert2rank(
    routing: np.ndarray, num_experts: int, expert_workers: int, workload: RequestWorkload
) -> np.ndarray:
    """int64 [L, E]: greedy placement from the loads of the requests' prompt rows (as the runtime places)."""
    span = workload.prompt_tokens + workload.new_tokens
    starts = np.arange(workload.requests, dtype=np.int64) * span  # [R]
    rows = (starts[:, None] + np.arange(workload.prompt_tokens)[None, :]).reshape(-1) % routing.shape[0]
    return greedy_expert2rank(routing[rows], num_experts, expert_workers)


def _parallel_time(durations: list[float], cores: int) -> float:
    """Makespan of independent ``durations`` on ``cores`` processors, in order, each to the first free one (0: one each)."""
    if not durations:
        return 0.0
    if cores == 0 or len(durations) <= cores:
        return max(durations)
    free = [0.0] * cores
    for duration in durations:
        heapq.heappush(free, heapq.heappop(free) + duration)
    return max(free)


# --------------------------------------------------------------------------------------------
# sync


def _simulate_sync(
    routing: np.ndarray, num_experts: int, config: EPSimConfig, costs: SimCosts, expert2rank: np.ndarray
) -> SimResult:
    """Barrier all-to-all per layer: layer time = attention + split-size exchange + dispatch + slowest worker + combine.

    The split sizes (rows per worker) are exchanged before the variable-size all-to-all: one
    collective latency per layer (the real sync mode's control collective; DeepEP's notify step).
    """
    _, num_layers, _ = routing.shape
    workers, attention = config.expert_workers, config.attention_workers
    plan = _plan_batches(routing.shape[0], config, 1)
    busy = np.zeros(workers)  # [W]
    barrier_wait = 0.0
    invocations, invoked_tokens = 0, 0
    clock, attention_busy = 0.0, 0.0
    tokens, layer_calls = 0, 0
    latencies: list[tuple[float, int]] = []
    for step_index in range(len(plan[0][0])):
        steps = [plan[worker][0][step_index] for worker in range(attention)]
        rows = np.concatenate([step.rows for step in steps])  # [n]
        sender = np.repeat(np.arange(attention), [step.rows.size for step in steps])[:, None]  # [n, 1]
        step_time = 0.0
        for layer in range(num_layers):
            ids = routing[rows, layer, :].astype(np.int64)  # [n, K]
            known = ids != UNKNOWN_EXPERT  # [n, K]
            ranks = np.where(known, expert2rank[layer][np.where(known, ids, 0)], -1)  # [n, K]
            pair = (sender * workers + ranks)[known]  # [N]
            messages = np.bincount(pair, minlength=attention * workers).reshape(attention, workers)  # [A, W]
            # Each sender's messages share its link: the last one lands after all its bytes.
            dispatch = costs.collective_time(int(messages.sum(axis=1).max()))
            combine = costs.collective_time(int(messages.sum(axis=0).max()))
            tokens_per_expert = np.bincount(ids[known], minlength=num_experts)  # [E]
            worker_times = np.array(
                [costs.expert_time(tokens_per_expert[expert2rank[layer] == w]) for w in range(workers)]
            )  # [W]
            slowest = _parallel_time(worker_times.tolist(), config.cores)
            barrier_wait += float((slowest - worker_times).sum())
            busy += worker_times
            invocations += int((tokens_per_expert > 0).sum())
            invoked_tokens += int(tokens_per_expert.sum())
            attention_times = [costs.attention_time(step.rows.size) for step in steps]
            attention_busy += sum(attention_times)
            step_time += (
                _parallel_time(attention_times, config.cores)
                + costs.collective_latency_s
                + dispatch
                + slowest
                + combine
            )
            layer_calls += 1
        clock += step_time
        step_tokens = sum(step.tokens for step in steps)
        tokens += step_tokens
        if steps[0].timed:
            latencies.append((step_time, step_tokens))  # every token of a step waits the whole step
    per_token = _expand_latencies(latencies)
    return SimResult(
        mode="sync",
        attention_workers=attention,
        expert_workers=workers,
        scheduler=None,
        tokens=tokens,
        makespan_s=clock,
        throughput_tokens_per_s=tokens / clock,
        latency_p50_s=float(np.percentile(per_token, 50)),
        latency_p90_s=float(np.percentile(per_token, 90)),
        latency_p99_s=float(np.percentile(per_token, 99)),
        expert_utilisation=tuple(float(value) for value in busy / clock),
        attention_utilisation=attention_busy / (clock * attention),
        mean_barrier_wait_s=barrier_wait / (workers * layer_calls),
        mean_queue_depth=0.0,
        max_queue_depth=0.0,
        mean_expert_batch=invoked_tokens / max(invocations, 1),
    )


def _expand_latencies(latencies: list[tuple[float, int]]) -> np.ndarray:
    """float64 [tokens]: each (duration, count) repeated count times; [nan] when there are none."""
    if not latencies:
        return np.array([math.nan])
    return np.repeat(np.array([duration for duration, _ in latencies]), [count for _, count in latencies])


# --------------------------------------------------------------------------------------------
# async


@dataclass
class _MicroBatch:
    """Mutable state of one micro-batch moving through the layers."""

    attention_worker: int
    steps: list[_Step]
    step: int = 0
    """Index into ``steps`` of the step running now."""
    layer: int = 0
    pending: int = 0
    """Expert workers whose combine for ``layer`` has not arrived yet."""
    dispatches: list[tuple[int, np.ndarray]] = field(default_factory=list)
    """(expert worker, its assignments' expert ids) of the attention call running for ``layer``."""
    step_start: float = 0.0

    @property
    def rows(self) -> np.ndarray:
        """int64 [b] trace rows of the current step."""
        return self.steps[self.step].rows


@dataclass
class _ExpertWorker:
    """Mutable state of one expert worker: mu-queues per layer and its statistics."""

    num_layers: int
    queues: list[list[tuple[int, np.ndarray, float]]] = field(default_factory=list)
    """Per layer: (micro-batch id, expert ids int64 [n], arrival time) entries, oldest first."""
    assignments: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """int64 [L] token-expert assignments queued per layer (kept equal to the queues' sizes)."""
    history: deque[np.ndarray] = field(default_factory=lambda: deque(maxlen=DEFRAG_HISTORY))
    busy_until: float = 0.0
    busy: float = 0.0
    wake_at: float = math.inf

    def __post_init__(self) -> None:
        self.queues = [[] for _ in range(self.num_layers)]
        self.assignments = np.zeros(self.num_layers, dtype=np.int64)


_ATTENTION_DONE, _DISPATCH, _EXPERT_DONE, _COMBINE, _WAKE = range(5)


class _AsyncSimulation:
    """Event loop of the async mode; ``run()`` once."""

    def __init__(
        self,
        routing: np.ndarray,
        num_experts: int,
        config: EPSimConfig,
        costs: SimCosts,
        expert2rank: np.ndarray,
    ) -> None:
        self.routing, self.num_experts, self.config, self.costs = routing, num_experts, config, costs
        self.expert2rank = expert2rank  # [L, E]
        self.num_layers, self.top_k = routing.shape[1], routing.shape[2]
        self.scheduler = LAYER_SCHEDULERS.get(config.scheduler)
        self.events: list[tuple[float, int, int, tuple[Any, ...]]] = []
        self.sequence = 0
        self.clock = 0.0
        self.tokens = 0
        self.core_free = [0.0] * config.cores
        """Heap of the times each shared processor becomes free (empty: one processor per worker)."""
        self.latencies: list[tuple[float, int]] = []
        self.depths: list[float] = []
        self.invocations, self.invoked_tokens = 0, 0
        self.workers = [_ExpertWorker(self.num_layers) for _ in range(config.expert_workers)]
        self.attention_ready: list[deque[int]] = [deque() for _ in range(config.attention_workers)]
        self.attention_free = [True] * config.attention_workers
        self.attention_busy = 0.0
        self.micro_batches: list[_MicroBatch] = []
        self.link_free: dict[tuple[str, int], float] = {}
        experts_per_worker = np.stack(
            [np.bincount(row, minlength=config.expert_workers) for row in expert2rank]
        ).T  # [W, L]
        self.hold = experts_per_worker * config.hold_tokens_per_expert  # [W, L] assignments
        plan = _plan_batches(routing.shape[0], config, config.micro_batches_per_worker)
        for attention_worker, batches in enumerate(plan):
            for steps in batches:
                self.micro_batches.append(_MicroBatch(attention_worker, steps))

    def _compute(self, duration: float) -> float:
        """End time of a computation of ``duration`` asked for now (it waits for a shared processor if any)."""
        if not self.core_free:
            return self.clock + duration
        start = max(self.clock, heapq.heappop(self.core_free))
        heapq.heappush(self.core_free, start + duration)
        return start + duration

    def _send(self, link: tuple[str, int], assignments: int) -> float:
        """Arrival time of a message queued now on ``link`` (a FIFO resource: one message at a time)."""
        depart = max(self.clock, self.link_free.get(link, 0.0))
        self.link_free[link] = (
            depart + assignments * self.costs.bytes_per_token / self.costs.bandwidth_bytes_per_s
        )
        return self.link_free[link] + self.costs.message_latency_s

    def _push(self, when: float, kind: int, *payload: Any) -> None:
        heapq.heappush(self.events, (when, self.sequence, kind, payload))
        self.sequence += 1

    def run(self) -> SimResult:
        for index, micro_batch in enumerate(self.micro_batches):
            self.attention_ready[micro_batch.attention_worker].append(index)
        for attention_worker in range(self.config.attention_workers):
            self._start_attention(attention_worker)
        handlers: dict[int, Callable[..., None]] = {
            _ATTENTION_DONE: self._on_attention_done,
            _DISPATCH: self._on_dispatch,
            _EXPERT_DONE: self._on_expert_done,
            _COMBINE: self._on_combine,
            _WAKE: self._on_wake,
        }
        while self.events:
            when, _, kind, payload = heapq.heappop(self.events)
            self.clock = when
            handlers[kind](*payload)
        return self._result()

    def _start_attention(self, attention_worker: int) -> None:
        ready = self.attention_ready[attention_worker]
        if not self.attention_free[attention_worker] or not ready:
            return
        index = ready.popleft()
        micro_batch = self.micro_batches[index]
        micro_batch.dispatches = self._split_by_worker(micro_batch)
        duration = self.costs.attention_time(len(micro_batch.rows)) + self.costs.attention_switch_s
        # Its dispatches and the combines it will take back, one of each per target (0 by default).
        duration += 2 * sum(self.costs.message_cpu_time(ids.size) for _, ids in micro_batch.dispatches)
        self.attention_free[attention_worker] = False
        self.attention_busy += duration
        self._push(self._compute(duration), _ATTENTION_DONE, index)

    def _split_by_worker(self, micro_batch: _MicroBatch) -> list[tuple[int, np.ndarray]]:
        """(expert worker, expert ids of its assignments) for ``micro_batch`` at its current layer."""
        layer = micro_batch.layer
        ids = self.routing[micro_batch.rows, layer, :].astype(np.int64).ravel()  # [b*K]
        ids = ids[ids != UNKNOWN_EXPERT]  # [N]
        ranks = self.expert2rank[layer][ids]  # [N]
        order = np.argsort(ranks, kind="stable")  # [N]
        targets, starts = np.unique(ranks[order], return_index=True)  # [W'], [W']
        return list(zip(targets.tolist(), np.split(ids[order], starts[1:]), strict=True))

    def _on_attention_done(self, index: int) -> None:
        micro_batch = self.micro_batches[index]
        layer = micro_batch.layer
        micro_batch.pending = len(micro_batch.dispatches)
        link = ("attention", micro_batch.attention_worker)
        for worker, chosen in micro_batch.dispatches:
            self._push(self._send(link, chosen.size), _DISPATCH, worker, layer, index, chosen)
        self.attention_free[micro_batch.attention_worker] = True
        if micro_batch.pending == 0:
            self._advance(index)
        self._start_attention(micro_batch.attention_worker)

    def _on_dispatch(self, worker: int, layer: int, index: int, ids: np.ndarray) -> None:
        state = self.workers[worker]
        state.queues[layer].append((index, ids, self.clock))
        state.assignments[layer] += ids.size
        self._try_run(worker)

    def _on_wake(self, worker: int) -> None:
        if self.workers[worker].wake_at == self.clock:
            self.workers[worker].wake_at = math.inf
            self._try_run(worker)

    def _try_run(self, worker: int) -> None:
        state = self.workers[worker]
        if state.busy_until > self.clock:
            return
        assignments = state.assignments  # [L]
        if not assignments.any():
            return
        oldest = np.array([queue[0][2] if queue else math.inf for queue in state.queues])  # [L]
        eligible = (assignments > 0) & (
            (assignments >= self.hold[worker]) | (oldest + self.config.flush_after_s <= self.clock)
        )  # [L]
        if not eligible.any():
            wake = float(oldest.min() + self.config.flush_after_s)
            if wake < state.wake_at:
                state.wake_at = wake
                self._push(wake, _WAKE, worker)
            return
        tokens = assignments / self.top_k  # [L]
        history = np.array(state.history).reshape(-1, self.num_layers)  # [H, L]
        layer = self.scheduler(QueueSnapshot(tokens=tokens, history=history, eligible=eligible))
        if not eligible[layer]:
            raise RuntimeError(f"layer scheduler {self.config.scheduler!r} chose ineligible layer {layer}")
        state.history.append(tokens.copy())
        self.depths.append(float(tokens.sum()))
        entries, state.queues[layer] = state.queues[layer], []
        state.assignments[layer] = 0
        tokens_per_expert = np.bincount(
            np.concatenate([entry[1] for entry in entries]), minlength=self.num_experts
        )
        # Taking each queued dispatch and sending its combine back cost processor time too.
        duration = self.costs.expert_time(tokens_per_expert) + sum(
            2 * self.costs.message_cpu_time(entry[1].size) for entry in entries
        )
        self.invocations += int((tokens_per_expert > 0).sum())
        self.invoked_tokens += int(tokens_per_expert.sum())
        state.busy += duration
        state.busy_until = self._compute(duration)
        self._push(state.busy_until, _EXPERT_DONE, worker, entries)

    def _on_expert_done(self, worker: int, entries: list[tuple[int, np.ndarray, float]]) -> None:
        for index, ids, _ in entries:
            self._push(self._send(("expert", worker), ids.size), _COMBINE, index)
        self._try_run(worker)

    def _on_combine(self, index: int) -> None:
        micro_batch = self.micro_batches[index]
        micro_batch.pending -= 1
        if micro_batch.pending == 0:
            self._advance(index)

    def _advance(self, index: int) -> None:
        """All of the micro-batch's combines for its layer are back: next layer, next pass, or done."""
        micro_batch = self.micro_batches[index]
        if micro_batch.layer + 1 < self.num_layers:
            micro_batch.layer += 1
        else:
            step = micro_batch.steps[micro_batch.step]
            self.tokens += step.tokens
            if step.timed:
                self.latencies.append((self.clock - micro_batch.step_start, step.tokens))
            micro_batch.step += 1
            if micro_batch.step == len(micro_batch.steps):
                return
            micro_batch.layer = 0
            micro_batch.step_start = self.clock
        self.attention_ready[micro_batch.attention_worker].append(index)
        self._start_attention(micro_batch.attention_worker)

    def _result(self) -> SimResult:
        makespan = self.clock
        latencies = _expand_latencies(self.latencies)
        tokens = self.tokens
        return SimResult(
            mode="async",
            attention_workers=self.config.attention_workers,
            expert_workers=self.config.expert_workers,
            scheduler=self.config.scheduler,
            tokens=tokens,
            makespan_s=makespan,
            throughput_tokens_per_s=tokens / makespan,
            latency_p50_s=float(np.percentile(latencies, 50)),
            latency_p90_s=float(np.percentile(latencies, 90)),
            latency_p99_s=float(np.percentile(latencies, 99)),
            expert_utilisation=tuple(state.busy / makespan for state in self.workers),
            attention_utilisation=self.attention_busy / (makespan * self.config.attention_workers),
            mean_barrier_wait_s=0.0,
            mean_queue_depth=float(np.mean(self.depths)) if self.depths else 0.0,
            max_queue_depth=float(np.max(self.depths)) if self.depths else 0.0,
            mean_expert_batch=self.invoked_tokens / max(self.invocations, 1),
        )
