"""Serverless deployment plans for MoE layers and their modelled billed cost and throughput.

Shape legend: L MoE layers, E experts per layer, G expert functions of one layer, M candidate
memory sizes, Q quantile levels, B tokens per batch.

A plan serves a stream of batches of B tokens. At every MoE layer a gate scatters each batch's
token vectors to *expert functions* (Lambda functions each holding a group of that layer's
experts, possibly replicated) and gathers the results. Per layer it fixes:

1. the grouping of experts into functions and each function's memory size (weights +
   activations + runtime overhead, at most 10,240 MB; memory also buys CPU share);
2. replicas of each function, sized so a quantile of the predicted load per replica stays
   under a cap (hot experts get more replicas);
3. the micro-batch count m of the pipelined scatter-gather: each replica gets its tokens in m
   invocations; while one micro-batch computes, the next is in flight, so a replica takes
   ``in + busy + out + (m - 1) * max(in, busy, out)`` seconds (fill, steady state, drain);
4. the channel (invocation payload, or an object store).

Cost model (modelled, never measured on AWS): each invocation bills its handler duration
(expert compute, plus parsing the event -- per invocation and per JSON byte, both from the
calibration; a token row travels once per function and the response is raw bytes -- plus the object-store GET of its inputs and PUT of
its outputs when that channel is used) rounded up to 1 ms, times memory in GB, at the Lambda GB-second price, plus the
per-request price (``prices.LambdaPrices``). Expected loads drive cost; quantile loads drive
time. Throughput is ``B / (slowest layer's seconds per batch)``: layers work on different
batches at once; a plan needing more concurrent executions than the limit has its throughput
scaled by ``limit / concurrency`` (and is reported as breaking the limit). Not modelled: the gate and attention (not billed here), cold starts in steady
state (their time is reported per function), contention on the gate's network link.

Constraints checked (each violation is named in :attr:`PlanEvaluation.violations`): memory
range, synchronous payload (6 MB each way) for the direct channel, the 900 s timeout, the 1,000
concurrent executions (one per replica), and the throughput target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.table import Table

from moeserve.predict.popularity import PopularityPredictor
from moeserve.serverless.handler_template import WIRE_DTYPES
from moeserve.serverless.perf import (
    CHANNELS,
    DEFAULT_CALIBRATION,
    Calibration,
    PerfConstants,
    cold_start_seconds,
    compute_seconds,
    expected_single_token_experts,
    handler_overhead_seconds,
    handler_payload,
    transfer_seconds,
)
from moeserve.serverless.prices import ARCHITECTURES, BYTES_PER_MB, Prices, default_prices
from moeserve.serverless.shapes import ExpertShape

INDEX_BYTES_PER_ASSIGNMENT = 12
"""Bytes sent per token-assignment beside the rows: its row, expert and routing weight (int32, int32, float32)."""


def assignments_per_row(shape: ExpertShape, expected: np.ndarray, batch_tokens: int) -> np.ndarray:
    """Expected token-assignments per distinct token row a function receives (float64, shape of ``expected``), in [1, K].

    A token's row travels once to a function however many of its experts it chose. With the
    function's experts taking a share ``q = expected / (B K)`` of a batch's assignments, a
    token's K choices (without replacement) all miss it with probability about
    ``prod_{j<K} max(0, 1 - q E / (E - j))`` -- exact when loads are uniform -- so the function
    sees ``B (1 - that)`` distinct rows for ``q B K`` assignments.
    """
    top_k, experts = shape.top_k, shape.num_experts
    share = np.clip(np.asarray(expected, dtype=np.float64) / (batch_tokens * top_k), 0.0, 1.0)
    miss = np.ones_like(share)
    for j in range(top_k):
        miss = miss * np.maximum(0.0, 1.0 - share * experts / (experts - j))
    hit = 1.0 - miss
    ratio = np.divide(share * top_k, hit, out=np.ones_like(share), where=hit > 1e-12)
    return np.clip(ratio, 1.0, float(top_k))


@dataclass(frozen=True)
class Workload:
    """Predicted per-expert loads of every layer for one batch, and the throughput to meet.

    Contract: ``expected`` float [L, E] >= 0, ``quantiles`` [Q, L, E] >= 0 with Q == len(levels)
    and L, E matching ``shape``; ``batch_tokens >= 1``; ``throughput_tokens_per_s > 0``.
    """

    shape: ExpertShape
    batch_tokens: int
    """B: tokens per batch at every layer."""
    throughput_tokens_per_s: float
    """Target tokens per second through all MoE layers."""
    expected: np.ndarray
    """float64 [L, E]: expected token-assignments per expert per batch."""
    levels: tuple[float, ...]
    quantiles: np.ndarray
    """float64 [Q, L, E]: per-expert load at each level of ``levels``."""
    source: str
    """Where the loads came from (predictor and trace), for reports."""

    def __post_init__(self) -> None:
        layers, experts = self.shape.num_layers, self.shape.num_experts
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {self.batch_tokens}")
        if not (math.isfinite(self.throughput_tokens_per_s) and self.throughput_tokens_per_s > 0):
            raise ValueError(f"throughput_tokens_per_s must be > 0, got {self.throughput_tokens_per_s}")
        if self.expected.shape != (layers, experts):
            raise ValueError(f"expected must be [{layers}, {experts}], got {self.expected.shape}")
        if self.quantiles.shape != (len(self.levels), layers, experts):
            raise ValueError(
                f"quantiles must be [{len(self.levels)}, {layers}, {experts}], got {self.quantiles.shape}"
            )
        if (self.expected < 0).any() or (self.quantiles < 0).any():
            raise ValueError("loads must be >= 0")

    def peak(self, level: float) -> np.ndarray:
        """float64 [L, E]: loads at quantile ``level`` (one of ``levels``)."""
        if level not in self.levels:
            raise ValueError(f"quantile level {level} not forecast; known: {self.levels}")
        return self.quantiles[self.levels.index(level)]

    @property
    def latency_budget_s(self) -> float:
        """Seconds per batch per layer that meet the throughput target: B / throughput."""
        return self.batch_tokens / self.throughput_tokens_per_s


def workload_from_predictor(
    predictor: PopularityPredictor,
    shape: ExpertShape,
    batch_tokens: int,
    throughput_tokens_per_s: float,
    levels: tuple[float, ...] = (0.5, 0.9, 0.99),
    source: str = "",
) -> Workload:
    """Loads per batch of ``batch_tokens`` from a fitted predictor's ``predict_loads`` per layer.

    The predictor's E must equal ``shape.num_experts``; layers beyond the predictor's reuse its
    layers cyclically (a trace may cover fewer layers than the model), which ``source`` notes.
    """
    if predictor.num_experts != shape.num_experts:
        raise ValueError(
            f"predictor has {predictor.num_experts} experts per layer, shape {shape.name} has {shape.num_experts}"
        )
    expected = np.zeros((shape.num_layers, shape.num_experts))
    quantiles = np.zeros((len(levels), shape.num_layers, shape.num_experts))
    for layer in range(shape.num_layers):
        forecast = predictor.predict_loads(layer % predictor.num_layers, batch_tokens, levels)
        # Loads are token-assignments; scale to the model's top-k if the trace's differs.
        scale = shape.top_k / predictor.top_k
        expected[layer] = forecast.expected * scale
        quantiles[:, layer] = forecast.quantiles * scale
    note = source or f"{predictor.name} predictor"
    if predictor.num_layers != shape.num_layers:
        note += f" ({predictor.num_layers} trace layers reused cyclically for {shape.num_layers})"
    return Workload(shape, batch_tokens, throughput_tokens_per_s, expected, levels, quantiles, note)


@dataclass(frozen=True)
class CostModel:
    """Everything a plan is evaluated against besides the plan and the loads."""

    prices: Prices = field(default_factory=default_prices)
    calibration: Calibration = DEFAULT_CALIBRATION
    constants: PerfConstants = field(default_factory=PerfConstants)
    architecture: str = "x86_64"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")

    @property
    def price_per_gb_second(self) -> float:
        return self.prices.lambda_prices.price_per_gb_second[self.architecture]

    @property
    def price_per_request(self) -> float:
        return self.prices.lambda_prices.price_per_million_requests / 1e6


@dataclass(frozen=True)
class FunctionPlan:
    """One expert function of a layer: the experts it holds, its memory and its replicas."""

    experts: tuple[int, ...]
    memory_mb: int
    replicas: int = 1

    def __post_init__(self) -> None:
        if not self.experts or len(set(self.experts)) != len(self.experts):
            raise ValueError(f"a function needs distinct experts, got {self.experts}")
        if self.memory_mb < 1:
            raise ValueError(f"memory_mb must be >= 1, got {self.memory_mb}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")


@dataclass(frozen=True)
class LayerPlan:
    """The functions serving one MoE layer, its micro-batch count and channel."""

    functions: tuple[FunctionPlan, ...]
    micro_batches: int
    channel: str
    wire_dtype: str = "float32"
    """Dtype token rows and outputs travel in (``handler_template.WIRE_DTYPES``): float32 is exact;
    float16 and bfloat16 halve the bytes and round the activations (lossy, chosen only when asked)."""

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {CHANNELS}, got {self.channel!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}")
        held = [expert for function in self.functions for expert in function.experts]
        if len(held) != len(set(held)):
            raise ValueError("an expert is held by more than one function of a layer")


@dataclass(frozen=True)
class DeploymentPlan:
    """Plans for all L layers, and how the plan was found (for reports)."""

    layers: tuple[LayerPlan, ...]
    found_by: str = "given"

    def to_dict(self) -> dict[str, Any]:
        return {
            "found_by": self.found_by,
            "layers": [
                {
                    "micro_batches": layer.micro_batches,
                    "channel": layer.channel,
                    "wire_dtype": layer.wire_dtype,
                    "functions": [
                        {"experts": list(f.experts), "memory_mb": f.memory_mb, "replicas": f.replicas}
                        for f in layer.functions
                    ],
                }
                for layer in self.layers
            ],
        }


# -- the vectorised function model ---------------------------------------------------------------


@dataclass(frozen=True)
class FunctionFigures:
    """Modelled figures of G functions at M memory sizes each (arrays [G, M] unless noted)."""

    needed_mb: np.ndarray
    """int64 [G]: memory the function needs (runtime + weights + activations)."""
    payload_bytes: np.ndarray
    """float64 [G]: bytes per invocation at the quantile load: the larger Invoke payload of request
    (JSON) and response (raw bytes) on the direct channel, the input object's bytes on the object store."""
    duration_s: np.ndarray
    """Handler seconds of one invocation at the expected load (what is billed)."""
    cost_per_batch: np.ndarray
    """USD per batch for all replicas and micro-batches."""
    seconds_per_batch: np.ndarray
    """Pipelined seconds for one replica's share of a batch at the quantile load."""
    busy_peak_s: np.ndarray
    """Handler seconds of one invocation at the quantile load (timeout check)."""


def memory_needed_mb(shape: ExpertShape, experts: np.ndarray | float, tokens: np.ndarray | float,
                     constants: PerfConstants) -> np.ndarray:
    """MB a function needs: the runtime, ``experts`` float32 experts of ``shape``, and ``tokens``
    in flight (float32 rows of width D + 2I, the token and its gate/up projection, twice for
    temporaries). Rounded up; broadcasts."""
    activation_bytes = 2 * (shape.hidden_size + 2 * shape.intermediate_size) * 4
    return np.ceil(
        constants.runtime_overhead_mb
        + (np.asarray(experts) * shape.expert_bytes + np.asarray(tokens) * activation_bytes) / BYTES_PER_MB
    ).astype(np.int64)


def function_figures(
    model: CostModel,
    shape: ExpertShape,
    group_sizes: np.ndarray,
    expected: np.ndarray,
    peak: np.ndarray,
    replicas: np.ndarray,
    micro_batches: int,
    channel: str,
    memory_mb: np.ndarray,
    batch_tokens: int | None = None,
    wire_dtype: str = "float32",
) -> FunctionFigures:
    """Cost and time of G functions (``group_sizes``, ``expected``, ``peak``, ``replicas``: [G]) at ``memory_mb`` ([M] or [G, M]).

    Loads are token-assignments per batch for the whole function; each replica takes 1/r of
    them in ``micro_batches`` invocations. The experts an invocation touches are the expected
    number of distinct experts hit by its tokens, ``n (1 - (1 - 1/n)^t)``, of which
    ``t (1 - 1/n)^(t - 1)`` get exactly one token (:func:`perf.expected_single_token_experts`;
    the calibration prices those apart). Its distinct token
    rows are the assignments over :func:`assignments_per_row` (with ``batch_tokens``; without
    it, one row per assignment), sent in ``wire_dtype``.
    """
    constants = model.constants
    group = np.asarray(group_sizes, dtype=np.float64)[:, None]  # [G, 1]
    replicas_column = np.asarray(replicas, dtype=np.float64)[:, None]  # [G, 1]
    memory = np.broadcast_to(
        np.asarray(memory_mb, dtype=np.float64), (group.shape[0], np.shape(memory_mb)[-1])
    )
    expected_tokens = (
        np.asarray(expected, dtype=np.float64)[:, None] / replicas_column / micro_batches
    )  # [G, 1]
    peak_tokens = np.ceil(
        np.asarray(peak, dtype=np.float64)[:, None] / replicas_column / micro_batches
    )  # [G, 1]
    vcpus = np.minimum(
        memory / model.prices.lambda_prices.memory_mb_per_vcpu, model.prices.lambda_prices.max_vcpus
    )

    def touched(tokens: np.ndarray) -> np.ndarray:
        return group * (1.0 - (1.0 - 1.0 / group) ** tokens)

    per_row = (
        np.ones_like(group)
        if batch_tokens is None
        else assignments_per_row(shape, np.asarray(expected, dtype=np.float64)[:, None], batch_tokens)
    )  # [G, 1]
    needed = memory_needed_mb(shape, group[:, 0], peak_tokens[:, 0], constants)  # [G]

    def handler_seconds(tokens: np.ndarray) -> np.ndarray:
        singles = expected_single_token_experts(tokens, group)
        busy = compute_seconds(shape, tokens, touched(tokens), vcpus, model.calibration, constants, singles)
        payload = handler_payload(shape, tokens, tokens / per_row, channel, wire_dtype)
        parse = handler_overhead_seconds(payload.json_bytes, vcpus, model.calibration)
        busy = busy + np.where(tokens > 0, parse, 0.0)
        if channel == "object_store":
            _, get_in = transfer_seconds(payload.raw_in, channel, constants)
            put_out, _ = transfer_seconds(payload.raw_out, channel, constants)
            busy = busy + get_in + put_out
        return busy

    duration = handler_seconds(expected_tokens)  # [G, M]
    increment = model.prices.lambda_prices.billing_increment_ms
    billed_ms = np.maximum(np.ceil(duration * 1000.0 / increment - 1e-9), 1.0) * increment
    per_invocation = (
        billed_ms / 1000.0 * memory / 1024.0 * model.price_per_gb_second + model.price_per_request
    )
    invocations = np.where(np.asarray(expected)[:, None] > 0, replicas_column * micro_batches, 0.0)
    cost = per_invocation * invocations  # [G, M]

    busy_peak = handler_seconds(peak_tokens)  # [G, M]
    peak_payload = handler_payload(shape, peak_tokens, np.ceil(peak_tokens / per_row), channel, wire_dtype)
    if channel == "object_store":
        # The gate PUTs the rows (its event travels beside them) and GETs the outputs.
        send_in, _ = transfer_seconds(peak_payload.raw_in + peak_payload.request_json, channel, constants)
        _, gather = transfer_seconds(peak_payload.raw_out, channel, constants)
        payload = peak_payload.raw_in[:, 0]
    else:
        # The invoke payloads: the JSON event in, raw output bytes back; the synchronous limit applies to both.
        send_in, _ = transfer_seconds(peak_payload.invoke_request, channel, constants)
        gather = peak_payload.invoke_response / constants.direct_bandwidth_bytes_per_s
        payload = np.maximum(peak_payload.invoke_request, peak_payload.invoke_response)[:, 0]
    stage = np.maximum(np.maximum(send_in, busy_peak), gather)
    seconds = send_in + busy_peak + gather + (micro_batches - 1) * stage  # [G, M]
    seconds = np.where(peak_tokens > 0, seconds, 0.0)
    return FunctionFigures(
        needed_mb=needed,
        payload_bytes=payload,
        duration_s=duration,
        cost_per_batch=cost,
        seconds_per_batch=seconds,
        busy_peak_s=busy_peak,
    )


# -- evaluation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanEvaluation:
    """Modelled billed cost and throughput of a plan, and the constraints it breaks (none if feasible)."""

    cost_per_token: float
    """USD per token through all MoE layers (modelled)."""
    throughput_tokens_per_s: float
    """Modelled: B / slowest layer's seconds per batch."""
    layer_seconds: tuple[float, ...]
    """Per layer: seconds per batch (quantile load)."""
    layer_cost_per_batch: tuple[float, ...]
    functions: int
    concurrency: int
    """Concurrent executions: one per replica of every function of every layer."""
    invocations_per_token: float
    max_memory_mb: int
    max_cold_start_s: float
    """Longest modelled cold start (process start + weight load) of any function."""
    violations: tuple[str, ...]

    @property
    def feasible(self) -> bool:
        return not self.violations

    @property
    def cost_per_million_tokens(self) -> float:
        return self.cost_per_token * 1e6

    def to_dict(self) -> dict[str, Any]:
        return {
            "modelled": True,
            "cost_per_token_usd": self.cost_per_token,
            "cost_per_million_tokens_usd": self.cost_per_million_tokens,
            "throughput_tokens_per_s": self.throughput_tokens_per_s,
            "layer_seconds": list(self.layer_seconds),
            "layer_cost_per_batch_usd": list(self.layer_cost_per_batch),
            "functions": self.functions,
            "concurrency": self.concurrency,
            "invocations_per_token": self.invocations_per_token,
            "max_memory_mb": self.max_memory_mb,
            "max_cold_start_s": self.max_cold_start_s,
            "feasible": self.feasible,
            "violations": list(self.violations),
        }


def evaluate_plan(
    plan: DeploymentPlan, workload: Workload, model: CostModel | None = None, level: float | None = None
) -> PlanEvaluation:
    """Modelled cost and throughput of ``plan`` on ``workload``; time uses loads at quantile ``level``.

    ``level`` defaults to the workload's highest level. The plan must cover every expert of every
    layer exactly once (``ValueError`` otherwise); broken limits are reported, not raised.
    """
    model = model or CostModel()
    shape = workload.shape
    level = max(workload.levels) if level is None else level
    peak_loads = workload.peak(level)
    if len(plan.layers) != shape.num_layers:
        raise ValueError(f"plan has {len(plan.layers)} layers, the workload {shape.num_layers}")
    limits = model.prices.lambda_prices
    violations: list[str] = []
    layer_seconds, layer_costs = [], []
    functions = concurrency = invocations = max_memory = 0
    max_cold = 0.0
    for index, layer in enumerate(plan.layers):
        held = sorted(e for f in layer.functions for e in f.experts)
        if held != list(range(shape.num_experts)):
            raise ValueError(
                f"layer {index}: functions must hold experts 0..{shape.num_experts - 1} once each"
            )
        members = [list(f.experts) for f in layer.functions]
        figures = function_figures(
            model,
            shape,
            np.array([len(m) for m in members]),
            np.array([workload.expected[index, m].sum() for m in members]),
            np.array([peak_loads[index, m].sum() for m in members]),
            np.array([f.replicas for f in layer.functions]),
            layer.micro_batches,
            layer.channel,
            np.array([[f.memory_mb] for f in layer.functions]),
            batch_tokens=workload.batch_tokens,
            wire_dtype=layer.wire_dtype,
        )
        for g, function in enumerate(layer.functions):
            name = f"layer {index} function {g}"
            if not limits.memory_min_mb <= function.memory_mb <= limits.memory_max_mb:
                violations.append(f"{name}: memory {function.memory_mb} MB outside Lambda's range")
            if function.memory_mb < figures.needed_mb[g]:
                violations.append(
                    f"{name}: memory {function.memory_mb} MB below the {figures.needed_mb[g]} MB needed"
                )
            if layer.channel == "direct" and figures.payload_bytes[g] > limits.payload_limit_bytes(
                "synchronous"
            ):
                violations.append(
                    f"{name}: payload {figures.payload_bytes[g]:.0f} B over the synchronous limit"
                )
            if figures.busy_peak_s[g, 0] > limits.timeout_s:
                violations.append(f"{name}: invocation {figures.busy_peak_s[g, 0]:.1f} s over the timeout")
            max_cold = max(
                max_cold, cold_start_seconds(len(function.experts) * shape.expert_bytes, model.constants)
            )
        layer_seconds.append(float(figures.seconds_per_batch.max()))
        layer_costs.append(float(figures.cost_per_batch.sum()))
        functions += len(layer.functions)
        concurrency += sum(f.replicas for f in layer.functions)
        invocations += sum(f.replicas for f in layer.functions) * layer.micro_batches
        max_memory = max(max_memory, max(f.memory_mb for f in layer.functions))
    slowest = max(layer_seconds)
    throughput = workload.batch_tokens / slowest if slowest > 0 else math.inf
    if concurrency > limits.default_concurrency:
        violations.append(f"concurrency {concurrency} over the {limits.default_concurrency} limit")
        # Only that many executions run at once: the layers share them, so throughput scales down.
        throughput *= limits.default_concurrency / concurrency
    if throughput < workload.throughput_tokens_per_s * (1 - 1e-9):
        violations.append(
            f"throughput {throughput:.1f} tokens/s below the {workload.throughput_tokens_per_s:g} target"
        )
    return PlanEvaluation(
        cost_per_token=sum(layer_costs) / workload.batch_tokens,
        throughput_tokens_per_s=throughput,
        layer_seconds=tuple(layer_seconds),
        layer_cost_per_batch=tuple(layer_costs),
        functions=functions,
        concurrency=concurrency,
        invocations_per_token=invocations / workload.batch_tokens,
        max_memory_mb=max_memory,
        max_cold_start_s=max_cold,
        violations=tuple(violations),
    )


def render_table(evaluation: PlanEvaluation, title: str = "Serverless plan (modelled)") -> Table:
    """A rich table of an evaluation's headline figures."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("billed cost / 1M tokens (USD, modelled)", f"{evaluation.cost_per_million_tokens:.4f}")
    table.add_row("throughput (tokens/s, modelled)", f"{evaluation.throughput_tokens_per_s:.1f}")
    table.add_row("functions", str(evaluation.functions))
    table.add_row("concurrency", str(evaluation.concurrency))
    table.add_row("invocations / token", f"{evaluation.invocations_per_token:.3f}")
    table.add_row("largest memory (MB)", str(evaluation.max_memory_mb))
    table.add_row("longest cold start (s, modelled)", f"{evaluation.max_cold_start_s:.2f}")
    table.add_row("violations", "; ".join(evaluation.violations) or "none")
    return table
