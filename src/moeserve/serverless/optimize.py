"""Find the cheapest serverless plan that meets a throughput target (all figures modelled).

Shape legend: L layers, E experts per layer, G functions of a layer, M candidate memory sizes.

The joint space (:class:`SearchSpace`) has one value per dimension, shared by all layers:
group size, grouping rule, micro-batch count, channel, replica cap (tokens per replica per
batch at the quantile load) and the quantile level. A point is turned into a plan by
:func:`build_plan`:

1. per layer, order experts by predicted load and cut them into groups of the group size
   (``sorted``: hottest together; ``balanced``: dealt out in snake order so groups carry
   similar loads);
2. give each group ``ceil(quantile load / cap)`` replicas;
3. pick every function's memory by **exact search**: with the rest fixed, functions do not
   interact (the layer's time is the slowest function's, so each must meet the per-batch
   budget on its own, and costs add), so the cheapest memory in 1..10,240 MB (on a grid of
   ``memory_step_mb``) that meets the budget is optimal per function. None meeting it: the
   fastest, and the plan is reported infeasible. Sizes within :data:`TIE_TOLERANCE` of the
   cheapest count as tied and the fastest of them is taken.

The level only sizes replicas: every plan's time is judged at the workload's highest level.

Two searches over the joint space: :func:`exhaustive_search` (every point; for small spaces and
tests) and :func:`epsilon_greedy_search`, a small stand-in for the paper's Optuna-driven
Bayesian optimisation: a few random points, then each trial either explores (a random point,
probability epsilon, decaying) or perturbs the best point so far along a random subset of
dimensions (ordered dimensions by a step of one or two, categorical ones to another value).
Points already tried are not re-evaluated. Each result records how its plan was found.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeserve.predict.popularity import PREDICTORS, PopularityPredictor
from moeserve.serverless.baselines import ClusterBaseline, cpu_cluster_baseline, lambdaml_baseline
from moeserve.serverless.handler_template import WIRE_DTYPES
from moeserve.serverless.perf import CHANNELS
from moeserve.serverless.plan import (
    CostModel,
    DeploymentPlan,
    FunctionPlan,
    LayerPlan,
    PlanEvaluation,
    Workload,
    evaluate_plan,
    function_figures,
    memory_needed_mb,
    workload_from_predictor,
)
from moeserve.serverless.prices import BYTES_PER_MB
from moeserve.serverless.shapes import ExpertShape
from moeserve.traces.format import Trace

GROUPINGS = ("sorted", "balanced")
DIMENSIONS = ("group_size", "grouping", "micro_batches", "channel", "replica_cap", "level")
TIE_TOLERANCE = 1e-3
"""Memory sizes within this relative cost of the cheapest count as tied; the fastest of them wins."""
_ORDERED = {"group_size", "micro_batches", "replica_cap", "level"}


@dataclass(frozen=True)
class SearchSpace:
    """Values each dimension may take; see the module docstring. Every tuple non-empty."""

    group_sizes: tuple[int, ...]
    groupings: tuple[str, ...]
    micro_batches: tuple[int, ...]
    channels: tuple[str, ...]
    replica_caps: tuple[float, ...]
    """Most token-assignments one replica takes per batch at the quantile load."""
    levels: tuple[float, ...]
    memory_step_mb: int = 64
    """Grid of the exact memory search (plus each function's exact need)."""
    wire_dtype: str = "float32"
    """Dtype token rows travel in, for every point (not searched: below float32 it is lossy, so
    only the caller may choose it; ``handler_template.WIRE_DTYPES``)."""

    def __post_init__(self) -> None:
        for name in DIMENSIONS:
            if not self.values(name):
                raise ValueError(f"search space dimension {name} is empty")
        if any(size < 1 for size in self.group_sizes) or any(m < 1 for m in self.micro_batches):
            raise ValueError("group sizes and micro-batch counts must be >= 1")
        if unknown := set(self.channels) - set(CHANNELS):
            raise ValueError(f"unknown channels {sorted(unknown)}; known: {CHANNELS}")
        if unknown := set(self.groupings) - set(GROUPINGS):
            raise ValueError(f"unknown groupings {sorted(unknown)}; known: {GROUPINGS}")
        if any(cap <= 0 for cap in self.replica_caps) or self.memory_step_mb < 1:
            raise ValueError("replica caps and memory_step_mb must be > 0")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}")

    def values(self, dimension: str) -> tuple[Any, ...]:
        names = {
            "group_size": self.group_sizes,
            "grouping": self.groupings,
            "micro_batches": self.micro_batches,
            "channel": self.channels,
            "replica_cap": self.replica_caps,
            "level": self.levels,
        }
        return names[dimension]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.values(name)) for name in DIMENSIONS)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def point(self, indices: tuple[int, ...]) -> dict[str, Any]:
        point = {name: self.values(name)[i] for name, i in zip(DIMENSIONS, indices, strict=True)}
        if self.wire_dtype != "float32":
            point["wire_dtype"] = self.wire_dtype
        return point


def default_space(workload: Workload, wire_dtype: str = "float32") -> SearchSpace:
    """Powers of two up to E for group sizes; 1..16 micro-batches; both channels; eight caps
    from a quarter of the mean per-expert load to the whole batch; the workload's levels; rows in ``wire_dtype``."""
    shape = workload.shape
    sizes = tuple(
        sorted({min(2**i, shape.num_experts) for i in range(0, 12) if 2 ** (i - 1) < shape.num_experts})
    )
    mean_load = workload.batch_tokens * shape.top_k / shape.num_experts
    caps = tuple(
        float(c) for c in np.geomspace(max(mean_load / 4, 1.0), workload.batch_tokens * shape.top_k, 8)
    )
    return SearchSpace(
        sizes, GROUPINGS, (1, 2, 3, 4, 6, 8, 12, 16), CHANNELS, caps, workload.levels, wire_dtype=wire_dtype
    )


def _groups(order: np.ndarray, size: int, grouping: str) -> list[list[int]]:
    count = math.ceil(len(order) / size)
    if grouping == "sorted":
        return [order[i * size : (i + 1) * size].tolist() for i in range(count)]
    groups: list[list[int]] = [[] for _ in range(count)]
    for rank, expert in enumerate(order.tolist()):
        lap, slot = divmod(rank, count)
        groups[slot if lap % 2 == 0 else count - 1 - slot].append(expert)
    return groups


def build_plan(
    point: dict[str, Any], workload: Workload, model: CostModel, memory_step_mb: int = 64, found_by: str = ""
) -> DeploymentPlan:
    """The plan for one point of the space, memory chosen by exact search per function.

    Replicas follow the loads at the point's quantile level; time (and so the memory that meets
    the budget) is judged at the workload's highest level, as :func:`evaluate_plan` does.
    """
    shape = workload.shape
    limits = model.prices.lambda_prices
    sizing_peak = workload.peak(point["level"])
    timing_peak = workload.peak(max(workload.levels))
    budget = workload.latency_budget_s
    wire_dtype = str(point.get("wire_dtype", "float32"))
    grid = np.arange(limits.memory_min_mb, limits.memory_max_mb + 1, memory_step_mb, dtype=np.int64)
    if grid[-1] != limits.memory_max_mb:
        grid = np.append(grid, limits.memory_max_mb)
    layers = []
    for layer in range(shape.num_layers):
        order = np.argsort(-workload.expected[layer], kind="stable")
        groups = _groups(order, point["group_size"], point["grouping"])
        sizing = np.array([sizing_peak[layer, g].sum() for g in groups])
        peaks = np.array([timing_peak[layer, g].sum() for g in groups])
        replicas = np.maximum(np.ceil(sizing / point["replica_cap"]), 1).astype(np.int64)
        sizes = np.array([len(g) for g in groups])
        expected = np.array([workload.expected[layer, g].sum() for g in groups])
        first = function_figures(
            model, shape, sizes, expected, peaks, replicas, point["micro_batches"], point["channel"], grid[:1],
            workload.batch_tokens, wire_dtype,
        )  # fmt: skip
        needed = np.clip(first.needed_mb, limits.memory_min_mb, limits.memory_max_mb)  # [G]
        memory = np.concatenate(
            [needed[:, None], np.broadcast_to(grid, (len(groups), grid.size))], axis=1
        )  # [G, M]
        figures = function_figures(
            model, shape, sizes, expected, peaks, replicas, point["micro_batches"], point["channel"], memory,
            workload.batch_tokens, wire_dtype,
        )  # fmt: skip
        allowed = (memory >= needed[:, None]) & (figures.busy_peak_s <= limits.timeout_s)
        meets = allowed & (figures.seconds_per_batch <= budget)
        cost = np.where(meets, figures.cost_per_batch, np.inf)  # [G, M]
        # Ties in cost (CPU share scales with memory) go to the fastest memory size.
        cheapest = cost <= cost.min(axis=1, keepdims=True) * (1.0 + TIE_TOLERANCE)
        tied = np.where(cheapest & meets, figures.seconds_per_batch, np.inf).argmin(axis=1)
        fastest = np.where(allowed, figures.seconds_per_batch, np.inf).argmin(axis=1)
        choice = np.where(meets.any(axis=1), tied, fastest)  # [G]
        functions = tuple(
            FunctionPlan(tuple(int(e) for e in sorted(g)), int(memory[i, choice[i]]), int(replicas[i]))
            for i, g in enumerate(groups)
        )
        layers.append(LayerPlan(functions, point["micro_batches"], point["channel"], wire_dtype))
    return DeploymentPlan(tuple(layers), found_by or f"point {point}")


def score(evaluation: PlanEvaluation, workload: Workload) -> float:
    """Lower is better: cost per token if feasible; infeasible plans rank after every feasible
    one, ordered by throughput shortfall and cost."""
    if evaluation.feasible:
        return evaluation.cost_per_token
    shortfall = max(0.0, 1.0 - evaluation.throughput_tokens_per_s / workload.throughput_tokens_per_s)
    return 1.0 + len(evaluation.violations) + shortfall + evaluation.cost_per_token


@dataclass(frozen=True)
class Trial:
    """One evaluated point of a search."""

    number: int
    point: dict[str, Any]
    score: float
    cost_per_token: float
    feasible: bool
    how: str
    """"init", "explore" or "exploit <dimensions>" (epsilon-greedy), or "enumerate"."""


@dataclass(frozen=True)
class SearchResult:
    """The best plan a search found, its evaluation and every trial."""

    method: str
    plan: DeploymentPlan
    evaluation: PlanEvaluation
    best: Trial
    trials: tuple[Trial, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "trials": len(self.trials),
            "best_trial": self.best.number,
            "best_found_by": self.best.how,
            "best_point": self.best.point,
            "plan": self.plan.to_dict(),
            "evaluation": self.evaluation.to_dict(),
        }


class _Evaluator:
    def __init__(self, workload: Workload, model: CostModel, space: SearchSpace) -> None:
        self.workload, self.model, self.space = workload, model, space
        self.trials: list[Trial] = []
        self.seen: dict[tuple[int, ...], Trial] = {}
        self.best: tuple[tuple[int, ...], DeploymentPlan, PlanEvaluation] | None = None

    def __call__(self, indices: tuple[int, ...], how: str) -> Trial:
        point = self.space.point(indices)
        plan = build_plan(point, self.workload, self.model, self.space.memory_step_mb)
        evaluation = evaluate_plan(plan, self.workload, self.model)
        trial = Trial(
            len(self.trials) + 1,
            point,
            score(evaluation, self.workload),
            evaluation.cost_per_token,
            evaluation.feasible,
            how,
        )
        self.trials.append(trial)
        self.seen[indices] = trial
        if self.best is None or trial.score < self.seen[self.best[0]].score:
            self.best = (indices, plan, evaluation)
        return trial

    def result(self, method: str) -> SearchResult:
        assert self.best is not None
        indices, plan, evaluation = self.best
        best = self.seen[indices]
        found_by = f"{method}: trial {best.number} of {len(self.trials)} ({best.how}); memory per function by exact search"
        plan = DeploymentPlan(plan.layers, found_by)
        return SearchResult(method, plan, evaluation, best, tuple(self.trials))


def exhaustive_search(
    workload: Workload, model: CostModel | None = None, space: SearchSpace | None = None
) -> SearchResult:
    """Evaluate every point of ``space``; the optimum of the model over the space."""
    model = model or CostModel()
    space = space or default_space(workload)
    evaluate = _Evaluator(workload, model, space)
    for indices in itertools.product(*(range(n) for n in space.shape)):
        evaluate(indices, "enumerate")
    return evaluate.result("exhaustive")


def epsilon_greedy_search(
    workload: Workload,
    model: CostModel | None = None,
    space: SearchSpace | None = None,
    trials: int = 200,
    epsilon: float = 0.3,
    initial: int = 12,
    seed: int = 0,
) -> SearchResult:
    """At most ``trials`` distinct points by multi-dimensional epsilon-greedy search (module docstring).

    ``epsilon`` is the exploration probability at the start; it decays linearly to a tenth of
    itself by the last trial. Deterministic for a given ``seed``.
    """
    if trials < 1 or not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"need trials >= 1 and epsilon in [0, 1], got {trials}, {epsilon}")
    model = model or CostModel()
    space = space or default_space(workload)
    rng = random.Random(seed)
    evaluate = _Evaluator(workload, model, space)
    sizes = space.shape
    budget = min(trials, space.size)

    def random_point() -> tuple[int, ...]:
        return tuple(rng.randrange(n) for n in sizes)

    while len(evaluate.trials) < budget:
        done = len(evaluate.trials)
        rate = epsilon * (1.0 - 0.9 * done / budget)
        candidate, how = None, ""
        for _ in range(64):
            if done < initial or evaluate.best is None or rng.random() < rate:
                candidate, how = random_point(), "init" if done < initial else "explore"
            else:
                best = list(evaluate.best[0])
                movable = [d for d, n in enumerate(sizes) if n > 1]
                if not movable:
                    candidate = tuple(best)
                    break
                count = 1 + sum(rng.random() < 0.35 for _ in range(len(movable) - 1))
                changed = rng.sample(movable, min(count, len(movable)))
                for d in changed:
                    if DIMENSIONS[d] in _ORDERED:
                        best[d] = min(max(best[d] + rng.choice((-2, -1, 1, 2)), 0), sizes[d] - 1)
                    else:
                        best[d] = rng.choice([i for i in range(sizes[d]) if i != best[d]])
                candidate, how = tuple(best), "exploit " + ",".join(DIMENSIONS[d] for d in sorted(changed))
            if candidate not in evaluate.seen:
                break
        if candidate is None or candidate in evaluate.seen:
            unseen = [p for p in itertools.product(*(range(n) for n in sizes)) if p not in evaluate.seen]
            candidate, how = rng.choice(unseen), "explore"
        evaluate(candidate, how)
    return evaluate.result("epsilon-greedy")


# -- the top-level entry point -------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentReport:
    """The optimised plan, the two baselines on the same workload and model, and the savings.

    Every cost and throughput here is modelled (``perf`` and ``prices``), not measured on AWS.
    """

    workload: Workload
    model: CostModel
    search: SearchResult
    cluster: ClusterBaseline
    lambdaml: PlanEvaluation
    lambdaml_plan: DeploymentPlan

    @property
    def saving_vs_cpu_cluster(self) -> float:
        """1 - plan cost / cluster cost, per token at the same throughput."""
        return 1.0 - self.search.evaluation.cost_per_token / self.cluster.cost_per_token

    @property
    def saving_vs_lambdaml(self) -> float:
        return 1.0 - self.search.evaluation.cost_per_token / self.lambdaml.cost_per_token

    @property
    def throughput_loss_vs_lambdaml(self) -> float:
        """1 - plan throughput / LambdaML throughput (negative: the plan is faster)."""
        return 1.0 - self.search.evaluation.throughput_tokens_per_s / self.lambdaml.throughput_tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        workload = self.workload
        return {
            "modelled": True,
            "note": "costs and throughputs come from the performance and price model, not from AWS runs",
            "shape": workload.shape.to_dict(),
            "workload": {
                "batch_tokens": workload.batch_tokens,
                "throughput_target_tokens_per_s": workload.throughput_tokens_per_s,
                "levels": list(workload.levels),
                "source": workload.source,
            },
            "calibration": self.model.calibration.to_dict(),
            "constants": self.model.constants.to_dict(),
            "architecture": self.model.architecture,
            "plan": self.search.to_dict(),
            "cpu_cluster": self.cluster.to_dict(),
            "lambdaml": {"plan_found_by": self.lambdaml_plan.found_by, **self.lambdaml.to_dict()},
            "saving_vs_cpu_cluster": self.saving_vs_cpu_cluster,
            "saving_vs_lambdaml": self.saving_vs_lambdaml,
            "throughput_loss_vs_lambdaml": self.throughput_loss_vs_lambdaml,
        }


def check_expert_fits(shape: ExpertShape, model: CostModel) -> None:
    """``ValueError`` naming the numbers when one expert of ``shape`` (float32 weights, one token's
    activations, the runtime) needs more memory than the largest Lambda function has: no plan exists."""
    limit = model.prices.lambda_prices.memory_max_mb
    needed = int(memory_needed_mb(shape, 1, 1, model.constants))
    if needed > limit:
        raise ValueError(
            f"one expert of {shape.name} needs {needed:,} MB of function memory ({shape.expert_bytes / BYTES_PER_MB:,.0f} "
            f"MB of float32 weights + {model.constants.runtime_overhead_mb:,.0f} MB runtime), above Lambda's "
            f"{limit:,} MB maximum: no function can hold it"
        )


def plan_deployment(
    trace: Trace,
    shape: ExpertShape,
    throughput_tokens_per_s: float,
    batch_tokens: int = 256,
    predictor: PopularityPredictor | None = None,
    model: CostModel | None = None,
    trials: int = 200,
    seed: int = 0,
    space: SearchSpace | None = None,
    max_throughput_loss_vs_lambdaml: float | None = None,
    wire_dtype: str = "float32",
    baseline_model: CostModel | None = None,
) -> DeploymentReport:
    """Plan ``shape``'s MoE layers on Lambda for ``throughput_tokens_per_s``, loads predicted from ``trace``.

    Steps: 1. fit ``predictor`` (default: ``bayesian``, tuned on the trace) on ``trace``;
    2. forecast per-expert loads per batch of ``batch_tokens`` (:func:`workload_from_predictor`);
    3. epsilon-greedy search (``trials``, ``seed``) with exact memory search inside;
    4. evaluate the CPU-cluster and LambdaML baselines on the same workload and ``model``.

    With ``max_throughput_loss_vs_lambdaml`` (a fraction in [0, 1)), the search's target is
    raised to at least ``(1 - that) * LambdaML's throughput`` (the report's workload keeps the
    raised target; the baselines are evaluated at the original one).

    ``wire_dtype``: the dtype the plan's token rows travel in (default float32, exact; float16 or
    bfloat16 round activations, so they are used only when asked). The baselines keep float32,
    evaluated with ``baseline_model`` (default ``model``; give the float32 calibration's model
    when ``model`` was calibrated at another wire dtype).
    """
    model = model or CostModel()
    check_expert_fits(shape, model)
    if predictor is None:
        predictor = PREDICTORS.get("bayesian")()
    predictor.fit(trace, batch_tokens)
    source = f"{predictor.name} predictor fitted on {trace.meta.model} trace ({trace.num_tokens} tokens)"
    workload = workload_from_predictor(predictor, shape, batch_tokens, throughput_tokens_per_s, source=source)
    baseline_model = baseline_model or model
    baseline_plan, baseline = lambdaml_baseline(workload, baseline_model)
    cluster = cpu_cluster_baseline(workload, baseline_model)
    if max_throughput_loss_vs_lambdaml is not None:
        if not 0.0 <= max_throughput_loss_vs_lambdaml < 1.0:
            raise ValueError(
                f"max_throughput_loss_vs_lambdaml must be in [0, 1), got {max_throughput_loss_vs_lambdaml}"
            )
        floor = (1.0 - max_throughput_loss_vs_lambdaml) * baseline.throughput_tokens_per_s
        if floor > throughput_tokens_per_s:
            workload = dataclasses.replace(workload, throughput_tokens_per_s=floor)
    space = space or default_space(workload, wire_dtype)
    search = epsilon_greedy_search(workload, model, space, trials=trials, seed=seed)
    return DeploymentReport(workload, model, search, cluster, baseline, baseline_plan)
