"""What an expert-parallel run measured, per worker and per layer, and the snapshot a server exports.

Workers fill the mutable ``*Stats`` records while they run (plain Python numbers, read between
steps, never inside per-token code); :func:`metrics_snapshot` merges the attention worker's and
every expert worker's records into a frozen :class:`EPMetricsSnapshot` with one
:class:`LayerMetrics` per MoE layer. Balancedness is ``mean / max`` rows per expert worker (1.0 =
even), as in ``moeserve.placement``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moeserve.placement.balance import balancedness


@dataclass
class AttentionStats:
    """Attention worker, one mode: rows sent per layer and worker, time spent waiting on experts."""

    num_layers: int
    num_workers: int
    worker_rows: list[list[int]] = field(default_factory=list)
    """[L][W] rows dispatched to each expert worker."""
    call_balancedness: list[list[float]] = field(default_factory=list)
    """[L][calls] balancedness of each layer call's rows over the workers."""
    expert_wait_s: float = 0.0
    """Time blocked on expert results with nothing else to run (sync: every combine; async: idle)."""
    compute_s: float = 0.0
    """async: time micro-batches held the compute slot (attention, router, dispatch sends)."""
    receive_s: float = 0.0
    """async: time taking arrived combines without blocking."""
    cpu_s: float = 0.0
    """Processor time of the whole attention-worker process (every thread, gloo's included) over the
    timed requests: with ``wall_s`` it says whether the process ran or waited."""

    def __post_init__(self) -> None:
        self.worker_rows = [[0] * self.num_workers for _ in range(self.num_layers)]
        self.call_balancedness = [[] for _ in range(self.num_layers)]

    def record_dispatch(self, layer: int, worker_counts: list[int]) -> None:
        totals = self.worker_rows[layer]
        for worker, count in enumerate(worker_counts):
            totals[worker] += count
        busiest = max(worker_counts)
        if busiest:
            self.call_balancedness[layer].append(sum(worker_counts) / len(worker_counts) / busiest)


@dataclass
class ExpertLayerStats:
    """One expert worker, one layer."""

    calls: int = 0
    """Expert invocations of this layer (sync: one per layer call; async: one per re-batched run)."""
    rows: int = 0
    busy_s: float = 0.0
    barrier_wait_s: float = 0.0
    """sync: time in the combine exchange after computing, i.e. waiting for the slowest worker."""
    queue_rows: list[int] = field(default_factory=list)
    """async: rows waiting in this layer's mu-queue each time it ran."""
    queue_age_s: list[float] = field(default_factory=list)
    """async: age of the oldest queued entry each time the layer ran."""


@dataclass
class ExpertStats:
    """One expert worker (rank), one mode."""

    rank: int
    layers: list[ExpertLayerStats]
    idle_s: float = 0.0
    """Time blocked waiting for work."""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    """Processor time of the whole worker process (every thread) over the same span as ``wall_s``."""
    queue_tokens: list[float] = field(default_factory=list)
    """async: tokens waiting over all layers (rows / top_k) at each scheduling decision."""

    @classmethod
    def empty(cls, rank: int, num_layers: int) -> ExpertStats:
        return cls(rank=rank, layers=[ExpertLayerStats() for _ in range(num_layers)])


@dataclass(frozen=True)
class LayerMetrics:
    """One MoE layer over a run. NaN where a figure does not apply (e.g. queue age in sync)."""

    layer: int
    balancedness: float
    """mean / max over expert workers of all rows dispatched in the run."""
    step_balancedness: float
    """mean over layer calls of each call's balancedness."""
    barrier_wait_s: float
    """sync: mean per layer call and expert worker of the time waiting for the slowest worker; async: 0."""
    queue_depth_mean: float
    """async: mean rows waiting in this layer's mu-queue when it ran, per worker."""
    queue_depth_max: float
    queue_age_mean_s: float
    """async: mean age of the oldest queued entry when the layer ran."""
    queue_age_max_s: float
    mean_rows_per_call: float
    """Rows per expert-worker invocation of this layer (re-batching makes it larger in async)."""
    mean_call_s: float
    """Wall seconds per expert-worker invocation of this layer (its experts' compute, as timed around
    it; sync counts a call for every layer call, also one that brought a worker no rows)."""


@dataclass(frozen=True)
class EPMetricsSnapshot:
    """Per-layer figures of one mode, ready for a /metrics endpoint (``to_dict``)."""

    mode: str
    layers: tuple[LayerMetrics, ...]
    attention_expert_wait_s: float
    """Time the attention worker waited on expert results with nothing else to run."""
    attention_compute_s: float
    """async: time micro-batches held the attention worker's compute slot (NaN in sync)."""
    expert_idle_fraction: tuple[float, ...]
    """[W] share of each expert worker's wall time spent waiting for work."""
    attention_cpu_s: float
    """Processor time of the attention worker's process over the timed requests."""
    expert_cpu_fraction: tuple[float, ...]
    """[W] processor time of each expert worker's process / its wall time (1.0: it ran all the time)."""
    mean_queue_tokens: float
    """async: mean tokens queued over all layers at scheduling decisions (NaN in sync)."""
    max_queue_tokens: float

    @property
    def mean_balancedness(self) -> float:
        return _nanmean([layer.balancedness for layer in self.layers])

    @property
    def mean_barrier_wait_s(self) -> float:
        return _nanmean([layer.barrier_wait_s for layer in self.layers])

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["layers"] = [asdict(layer) for layer in self.layers]
        document["expert_idle_fraction"] = list(self.expert_idle_fraction)
        document["expert_cpu_fraction"] = list(self.expert_cpu_fraction)
        document["mean_balancedness"] = self.mean_balancedness
        document["mean_barrier_wait_s"] = self.mean_barrier_wait_s
        return _json_safe(document)


def metrics_snapshot(mode: str, attention: AttentionStats, experts: list[ExpertStats]) -> EPMetricsSnapshot:
    """Merge one mode's worker records into per-layer metrics."""
    layers = []
    for layer in range(attention.num_layers):
        per_worker = [stats.layers[layer] for stats in experts]
        calls = sum(item.calls for item in per_worker)
        rows = sum(item.rows for item in per_worker)
        busy = sum(item.busy_s for item in per_worker)
        depths = [value for item in per_worker for value in item.queue_rows]
        ages = [value for item in per_worker for value in item.queue_age_s]
        sync_calls = max((item.calls for item in per_worker), default=0)
        barrier = sum(item.barrier_wait_s for item in per_worker) / max(1, sync_calls * len(per_worker))
        loads = np.array(attention.worker_rows[layer], dtype=np.float64)
        layers.append(
            LayerMetrics(
                layer=layer,
                balancedness=balancedness(loads) if loads.size else math.nan,
                step_balancedness=_nanmean(attention.call_balancedness[layer]),
                barrier_wait_s=barrier if mode == "sync" else 0.0,
                queue_depth_mean=_nanmean(depths),
                queue_depth_max=float(max(depths)) if depths else math.nan,
                queue_age_mean_s=_nanmean(ages),
                queue_age_max_s=float(max(ages)) if ages else math.nan,
                mean_rows_per_call=rows / calls if calls else math.nan,
                mean_call_s=busy / calls if calls else math.nan,
            )
        )
    queue_tokens = [value for stats in experts for value in stats.queue_tokens]
    return EPMetricsSnapshot(
        mode=mode,
        layers=tuple(layers),
        attention_expert_wait_s=attention.expert_wait_s,
        attention_compute_s=attention.compute_s if mode == "async" else math.nan,
        expert_idle_fraction=tuple(
            stats.idle_s / stats.wall_s if stats.wall_s else math.nan for stats in experts
        ),
        attention_cpu_s=attention.cpu_s,
        expert_cpu_fraction=tuple(stats.cpu_s / stats.wall_s if stats.wall_s else math.nan for stats in experts),
        mean_queue_tokens=_nanmean(queue_tokens),
        max_queue_tokens=float(max(queue_tokens)) if queue_tokens else math.nan,
    )


def _nanmean(values: list[float] | list[int]) -> float:
    finite = [float(value) for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan


def _json_safe(value: Any) -> Any:
    """NaN -> None, recursively, so ``json.dumps`` writes valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
