"""Start the ranks of an expert-parallel run as processes and stop all of them when one fails.

``run_expert_parallel(config)`` picks a free loopback port, starts ``config.processes`` workers
(forkserver start method: torch and transformers are imported once in the server, and no
process forks a parent whose thread pools are already running), collects every rank's result
from a queue, and merges them into an :class:`EPRunResult`. If a worker reports an error,
exits without a result, or the run passes ``config.run_timeout_s``, every worker still alive is
terminated (then killed) and :class:`EPWorkerError` names the rank and its traceback. Workers'
own gloo timeouts (``collective_timeout_s``) bound any wait on a dead peer.
"""

from __future__ import annotations

import multiprocessing
import queue
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from moeserve.ep.config import EPConfig
from moeserve.ep.metrics import EPMetricsSnapshot, metrics_snapshot
from moeserve.ep.requests import RequestRecord
from moeserve.ep.worker import AttentionResult, ExpertResult
from moeserve.errors import MoeserveError
from moeserve.ports import free_port

PRELOAD = [
    "moeserve.ep.worker",
    "moeserve.models.loader",
    "transformers.models.auto.modeling_auto",
    "transformers.models.mixtral.modeling_mixtral",
]
"""Modules the forkserver imports once, so each worker starts without importing them again."""


class EPWorkerError(MoeserveError):
    """A worker of an expert-parallel run failed, died or the run timed out; all were stopped."""


@dataclass
class ModeResult:
    """One mode of a run: the attention worker's record and the merged metrics."""

    mode: str
    record: RequestRecord
    wall_s: float
    metrics: EPMetricsSnapshot

    @property
    def generated_tokens(self) -> int:
        return int(self.record.token_ids.size)

    @property
    def throughput_tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s

    def latency_percentiles_s(self) -> dict[str, float]:
        """p50 / p90 / p99 of per-token (decode) latency."""
        latencies = np.array(self.record.token_latencies_s)
        if latencies.size == 0:
            return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
        return {f"p{q}": float(np.percentile(latencies, q)) for q in (50, 90, 99)}


@dataclass
class EPRunResult:
    config: EPConfig
    expert2worker: np.ndarray
    """int64 [L, E] expert worker (rank - 1) of every expert."""
    held_experts: dict[int, list[int]]
    """rank -> [L] experts held per layer."""
    runs: list[ModeResult]
    """Every mode run in order (``config.modes`` repeated ``config.rounds`` times)."""
    startup_s: float

    @property
    def modes(self) -> dict[str, ModeResult]:
        """The first run of each mode."""
        first: dict[str, ModeResult] = {}
        for run in self.runs:
            first.setdefault(run.mode, run)
        return first

    """Launch to results, minus the modes' timed parts (process start, loading, placement, warm-ups)."""


def _context() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def run_expert_parallel(config: EPConfig) -> EPRunResult:
    """Run ``config`` on ``config.processes`` local processes; raise EPWorkerError if any fails."""
    from moeserve.ep.worker import worker_main

    context = _context()
    results = context.Queue()
    port = free_port()
    doorbells = tempfile.mkdtemp(prefix="moeserve-ep-")
    processes = [
        context.Process(
            target=worker_main,
            args=(rank, config, port, doorbells, results),
            name=f"moeserve-ep-{rank}",
            daemon=True,
        )
        for rank in range(config.processes)
    ]
    started = time.perf_counter()
    collected: dict[int, Any] = {}
    try:
        for process in processes:
            process.start()
        deadline = started + config.run_timeout_s
        while len(collected) < config.processes:
            try:
                status, rank, payload = results.get(timeout=0.2)
            except queue.Empty:
                for rank, process in enumerate(processes):
                    if rank not in collected and process.exitcode not in (None, 0):
                        raise EPWorkerError(
                            f"rank {rank} exited with code {process.exitcode} before reporting"
                        ) from None
                if time.perf_counter() > deadline:
                    raise EPWorkerError(
                        f"expert-parallel run passed its {config.run_timeout_s} s limit; stopped"
                    ) from None
                continue
            if status == "error":
                raise EPWorkerError(f"rank {rank} failed:\n{payload}")
            collected[rank] = payload
        for process in processes:
            process.join(timeout=30)
    finally:
        stop_processes(processes)
        shutil.rmtree(doorbells, ignore_errors=True)
    return _merge(config, collected, time.perf_counter() - started)


def stop_processes(processes: list[Any]) -> None:
    """Terminate (SIGTERM, then SIGKILL after 5 s) every process of ours still alive."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def _merge(config: EPConfig, collected: dict[int, Any], elapsed_s: float) -> EPRunResult:
    attention = collected[0]
    assert isinstance(attention, AttentionResult)
    experts = [collected[rank] for rank in range(1, config.processes)]
    assert all(isinstance(result, ExpertResult) for result in experts)
    runs = []
    for index, outcome in enumerate(attention.outcomes):
        snapshot = metrics_snapshot(outcome.mode, outcome.stats, [result.stats[index] for result in experts])
        runs.append(ModeResult(outcome.mode, outcome.record, outcome.wall_s, snapshot))
    return EPRunResult(
        config=config,
        expert2worker=attention.expert2worker,
        held_experts={result.rank: result.held_experts for result in experts},
        runs=runs,
        startup_s=elapsed_s - sum(run.wall_s for run in runs),
    )
