"""Baselines for the serverless planner, on the same workload and cost model (all modelled).

* :func:`cpu_cluster_baseline`: every expert of every layer resident on on-demand CPU instances
  billed per hour. The cluster is sized to hold all weights and to serve the quantile (peak)
  per-expert loads at the target throughput (experts are pinned, so a hot expert's instance
  must keep up with its peak); its utilisation is the expected compute over the provisioned
  compute, both from the workload's loads and the calibrated compute speed. The cheapest
  instance type in the prices file wins. It pays for idle memory around the clock, which is
  what serverless avoids.
* :func:`lambdaml_baseline`: LambdaML-style (Jiang et al., SIGMOD 2021): one function per
  expert, the same memory for all, tokens exchanged through an object store, no popularity
  prediction (one replica each), no pipelining (one invocation per function per batch). Its
  uniform memory is the cheapest on the grid that meets the throughput target (or the fastest
  when none does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moeserve.serverless.perf import compute_seconds
from moeserve.serverless.plan import (
    CostModel,
    DeploymentPlan,
    FunctionPlan,
    LayerPlan,
    PlanEvaluation,
    Workload,
    evaluate_plan,
    function_figures,
)


@dataclass(frozen=True)
class ClusterBaseline:
    """A CPU cluster sized for the workload (modelled)."""

    instance: str
    count: int
    cost_per_hour: float
    cost_per_token: float
    throughput_tokens_per_s: float
    utilisation: float
    """Expected busy vCPU-seconds over provisioned vCPU-seconds, in (0, 1]."""
    weights_gib: float
    vcpus_needed: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "modelled": True,
            "instance": self.instance,
            "count": self.count,
            "cost_per_hour_usd": self.cost_per_hour,
            "cost_per_token_usd": self.cost_per_token,
            "cost_per_million_tokens_usd": self.cost_per_token * 1e6,
            "throughput_tokens_per_s": self.throughput_tokens_per_s,
            "utilisation": self.utilisation,
            "weights_gib": self.weights_gib,
            "vcpus_needed": self.vcpus_needed,
        }


def cpu_cluster_baseline(workload: Workload, model: CostModel | None = None) -> ClusterBaseline:
    """The cheapest on-demand cluster (one instance type) holding every expert and meeting the target.

    vCPUs needed: ``batches per second * sum over experts of compute seconds at the peak load``
    (one thread per expert call, no CPU-share throttling); memory: all weights plus one runtime
    overhead per instance. Instance types of the function's architecture only.
    """
    model = model or CostModel()
    shape = workload.shape
    batches_per_s = workload.throughput_tokens_per_s / workload.batch_tokens
    peak = workload.peak(max(workload.levels))

    def busy(loads: np.ndarray) -> float:
        return float(compute_seconds(shape, loads, 1.0, 1.0, model.calibration, model.constants).sum())

    provisioned = batches_per_s * busy(peak)
    expected = batches_per_s * busy(workload.expected)
    weights = shape.layer_bytes * shape.num_layers / 2**30
    best: ClusterBaseline | None = None
    for instance in model.prices.instances:
        if instance.architecture != model.architecture:
            continue
        usable_gib = instance.memory_gib - model.constants.runtime_overhead_mb / 1024
        count = max(math.ceil(weights / usable_gib), math.ceil(provisioned / instance.vcpus), 1)
        per_hour = count * instance.price_per_hour
        candidate = ClusterBaseline(
            instance=instance.name,
            count=count,
            cost_per_hour=per_hour,
            cost_per_token=per_hour / 3600.0 / workload.throughput_tokens_per_s,
            throughput_tokens_per_s=workload.throughput_tokens_per_s,
            utilisation=expected / (count * instance.vcpus),
            weights_gib=weights,
            vcpus_needed=provisioned,
        )
        if best is None or candidate.cost_per_hour < best.cost_per_hour:
            best = candidate
    if best is None:
        raise ValueError(f"the prices file has no {model.architecture} instance types")
    return best


def lambdaml_plan(
    workload: Workload, model: CostModel | None = None, memory_step_mb: int = 64
) -> DeploymentPlan:
    """One function per expert, uniform memory, object store, one replica, one micro-batch."""
    model = model or CostModel()
    shape = workload.shape
    limits = model.prices.lambda_prices
    peak = workload.peak(max(workload.levels))
    ones = np.ones(shape.num_experts, dtype=np.int64)
    grid = np.arange(limits.memory_min_mb, limits.memory_max_mb + 1, memory_step_mb, dtype=np.int64)
    cost = np.zeros(grid.size)
    seconds = np.zeros(grid.size)
    needed = 0
    for layer in range(shape.num_layers):
        figures = function_figures(
            model, shape, ones, workload.expected[layer], peak[layer], ones, 1, "object_store", grid,
            workload.batch_tokens,
        )  # fmt: skip
        cost += figures.cost_per_batch.sum(axis=0)
        seconds = np.maximum(seconds, figures.seconds_per_batch.max(axis=0))
        needed = max(needed, int(figures.needed_mb.max()))
    allowed = grid >= needed
    meets = allowed & (seconds <= workload.latency_budget_s)
    if meets.any():
        memory = int(grid[np.where(meets, cost, np.inf).argmin()])
    else:
        memory = (
            int(grid[np.where(allowed, seconds, np.inf).argmin()]) if allowed.any() else limits.memory_max_mb
        )
    layer_plan = LayerPlan(
        tuple(FunctionPlan((expert,), memory, 1) for expert in range(shape.num_experts)), 1, "object_store"
    )
    return DeploymentPlan((layer_plan,) * shape.num_layers, f"LambdaML-style baseline, uniform {memory} MB")


def lambdaml_baseline(
    workload: Workload, model: CostModel | None = None
) -> tuple[DeploymentPlan, PlanEvaluation]:
    """The LambdaML-style plan and its evaluation on ``workload``."""
    model = model or CostModel()
    plan = lambdaml_plan(workload, model)
    return plan, evaluate_plan(plan, workload, model)
