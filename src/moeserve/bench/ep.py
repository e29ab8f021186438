"""``moeserve bench ep``: a real expert-parallel run, sync against async, in the same processes.

Each repeat is one launch of ``config.processes`` processes (gloo on CPU) that runs
``config.rounds`` rounds of every requested mode, alternating (sync, async, sync, ...), over the
same requests, so adjacent runs see the same machine state as nearly as a shared machine allows. Reported per mode (median over repeats): generated
tokens/s, per-token decode latency p50/p90/p99, time to first token, mean barrier wait (sync),
mu-queue depth and age (async), balancedness of rows over expert workers, the attention worker's
wait on experts and the expert workers' idle share; plus async / sync throughput per repeat and
whether both modes produced the same greedy tokens (and how far their outputs are apart).

These are measurements of real processes, not simulator figures; the machine line and the load
average at the start say how much else was running.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from rich.table import Table

from moeserve.bench.machine import machine_description
from moeserve.ep.config import EPConfig
from moeserve.ep.launch import EPRunResult, ModeResult, run_expert_parallel
from moeserve.ep.workload import check_workload


@dataclass
class ModeFigures:
    """One mode in one repeat."""

    mode: str
    throughput_tokens_per_s: float
    wall_s: float
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    first_token_p50_s: float
    mean_barrier_wait_s: float
    mean_queue_tokens: float
    max_queue_tokens: float
    mean_queue_age_s: float
    mean_balancedness: float
    mean_rows_per_expert_call: float
    mean_expert_call_s: float
    """Wall seconds per expert-worker invocation (mean over layers)."""
    attention_expert_wait_s: float
    mean_expert_idle_fraction: float
    attention_cpu_fraction: float
    """Processor time of the attention worker's process / the mode's wall time."""
    mean_expert_cpu_fraction: float
    """Mean over expert workers of their process's processor time / wall time."""
    metrics: dict[str, Any]
    """The full :class:`~moeserve.ep.metrics.EPMetricsSnapshot` as a dict (per-layer figures)."""

    @classmethod
    def of(cls, result: ModeResult) -> ModeFigures:
        metrics = result.metrics
        latencies = result.latency_percentiles_s()
        ages = [layer.queue_age_mean_s for layer in metrics.layers]
        rows = [layer.mean_rows_per_call for layer in metrics.layers]
        return cls(
            mode=result.mode,
            throughput_tokens_per_s=result.throughput_tokens_per_s,
            wall_s=result.wall_s,
            latency_p50_s=latencies["p50"],
            latency_p90_s=latencies["p90"],
            latency_p99_s=latencies["p99"],
            first_token_p50_s=float(np.median(result.record.first_token_s)),
            mean_barrier_wait_s=metrics.mean_barrier_wait_s,
            mean_queue_tokens=metrics.mean_queue_tokens,
            max_queue_tokens=metrics.max_queue_tokens,
            mean_queue_age_s=_nanmean(ages),
            mean_balancedness=metrics.mean_balancedness,
            mean_rows_per_expert_call=_nanmean(rows),
            mean_expert_call_s=_nanmean([layer.mean_call_s for layer in metrics.layers]),
            attention_expert_wait_s=metrics.attention_expert_wait_s,
            mean_expert_idle_fraction=_nanmean(list(metrics.expert_idle_fraction)),
            attention_cpu_fraction=metrics.attention_cpu_s / result.wall_s if result.wall_s else math.nan,
            mean_expert_cpu_fraction=_nanmean(list(metrics.expert_cpu_fraction)),
            metrics=metrics.to_dict(),
        )


@dataclass
class Repeat:
    """One round of one launch: every mode once, back to back, their ratio and output agreement."""

    launch: int
    round: int
    modes: dict[str, ModeFigures]
    async_over_sync: float | None
    same_tokens: bool | None
    """Whether sync and async generated identical greedy tokens (None unless both ran)."""
    max_output_difference: float | None
    """Largest absolute difference of the last step's outputs between sync and async."""
    startup_s: float
    """Of the launch: process start, loading, placement and warm-ups."""


@dataclass
class EPBenchResult:
    config: dict[str, Any]
    machine: str
    load_average: tuple[float, float, float]
    """1, 5 and 15 minute load averages when the benchmark started (other work on the machine)."""
    repeats: list[Repeat] = field(default_factory=list)

    def median(self, mode: str, name: str) -> float:
        values = [getattr(repeat.modes[mode], name) for repeat in self.repeats if mode in repeat.modes]
        return statistics.median(values) if values else math.nan

    @property
    def median_async_over_sync(self) -> float | None:
        ratios = [repeat.async_over_sync for repeat in self.repeats if repeat.async_over_sync is not None]
        return statistics.median(ratios) if ratios else None

    def to_dict(self) -> dict[str, Any]:
        modes = sorted({mode for repeat in self.repeats for mode in repeat.modes})
        return _json_safe(
            {
                "config": self.config,
                "machine": self.machine,
                "load_average": list(self.load_average),
                "median": {
                    mode: {
                        name: self.median(mode, name)
                        for name in ModeFigures.__dataclass_fields__
                        if name not in ("mode", "metrics")
                    }
                    for mode in modes
                },
                "median_async_over_sync": self.median_async_over_sync,
                "same_tokens_every_repeat": all(repeat.same_tokens is not False for repeat in self.repeats),
                "repeats": [asdict(repeat) for repeat in self.repeats],
            }
        )


def compare_modes(run: EPRunResult, launch: int = 0) -> list[Repeat]:
    """One :class:`Repeat` per round of the launch (its runs grouped by round)."""
    per_round = len(run.config.modes)
    repeats = []
    for index in range(0, len(run.runs), per_round):
        modes = {result.mode: result for result in run.runs[index : index + per_round]}
        ratio = same = difference = None
        if "sync" in modes and "async" in modes:
            sync, async_ = modes["sync"], modes["async"]
            ratio = async_.throughput_tokens_per_s / sync.throughput_tokens_per_s
            same = bool(np.array_equal(sync.record.token_ids, async_.record.token_ids))
            assert sync.record.last_outputs is not None and async_.record.last_outputs is not None
            difference = float(np.abs(sync.record.last_outputs - async_.record.last_outputs).max())
        figures = {mode: ModeFigures.of(result) for mode, result in modes.items()}
        repeats.append(Repeat(launch, index // per_round, figures, ratio, same, difference, run.startup_s))
    return repeats


def run_ep_bench(config: EPConfig, repeats: int = 2) -> EPBenchResult:
    """``repeats`` launches of ``config``; each runs ``config.rounds`` rounds of all its modes, alternating."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    check_workload(config)
    result = EPBenchResult(
        config=_config_dict(config), machine=machine_description(), load_average=os.getloadavg()
    )
    for launch in range(repeats):
        result.repeats.extend(compare_modes(run_expert_parallel(config), launch))
    return result


def render_table(result: EPBenchResult) -> Table:
    config = result.config
    workload = (
        f"trace {config['trace']}"
        if config["trace"]
        else f"model {config['model'] or 'reference (tiny-moe)'}"
    )
    table = Table(
        title=(
            f"expert parallelism, {config['processes']} processes (1 attention + {config['processes'] - 1} expert), "
            f"{workload}, {config['requests']} requests x {config['new_tokens']} tokens; median of "
            f"{len(result.repeats)} rounds ({config['rounds']} per launch)"
        ),
        caption=(
            f"{result.machine}; workers use {config['threads']} thread(s) each; "
            f"load average {result.load_average[0]:.1f} at start"
        ),
    )
    modes = sorted({mode for repeat in result.repeats for mode in repeat.modes}, key=["sync", "async"].index)
    table.add_column("figure")
    for mode in modes:
        table.add_column(
            mode
            + (
                f" ({config['micro_batches']} micro-batches, {config['scheduler']})"
                if mode == "async"
                else ""
            ),
            justify="right",
        )
    figures: list[tuple[str, str, str, float]] = [
        ("throughput (tokens/s)", "throughput_tokens_per_s", "{:,.0f}", 1.0),
        ("decode latency p50 (ms)", "latency_p50_s", "{:.1f}", 1e3),
        ("decode latency p90 (ms)", "latency_p90_s", "{:.1f}", 1e3),
        ("decode latency p99 (ms)", "latency_p99_s", "{:.1f}", 1e3),
        ("time to first token p50 (ms)", "first_token_p50_s", "{:.1f}", 1e3),
        ("mean barrier wait per layer call (ms)", "mean_barrier_wait_s", "{:.2f}", 1e3),
        ("mu-queue depth mean (tokens, all layers)", "mean_queue_tokens", "{:.1f}", 1.0),
        ("mu-queue depth max (tokens, all layers)", "max_queue_tokens", "{:.1f}", 1.0),
        ("mu-queue age of oldest entry, mean (ms)", "mean_queue_age_s", "{:.2f}", 1e3),
        ("balancedness (mean/max rows per worker)", "mean_balancedness", "{:.3f}", 1.0),
        ("rows per expert-worker call", "mean_rows_per_expert_call", "{:.1f}", 1.0),
        ("time per expert-worker call (ms)", "mean_expert_call_s", "{:.2f}", 1e3),
        ("attention worker waiting on experts (s)", "attention_expert_wait_s", "{:.3f}", 1.0),
        ("expert workers idle (share of wall)", "mean_expert_idle_fraction", "{:.2f}", 1.0),
        ("attention worker's processor time (share of wall)", "attention_cpu_fraction", "{:.2f}", 1.0),
        ("expert workers' processor time (share of wall)", "mean_expert_cpu_fraction", "{:.2f}", 1.0),
    ]
    for label, name, pattern, scale in figures:
        cells = []
        for mode in modes:
            value = result.median(mode, name)
            cells.append("-" if math.isnan(value) else pattern.format(value * scale))
        table.add_row(label, *cells)
    ratio = result.median_async_over_sync
    if ratio is not None:
        ratios = ", ".join(
            f"{repeat.async_over_sync:.2f}" for repeat in result.repeats if repeat.async_over_sync
        )
        same = all(repeat.same_tokens for repeat in result.repeats)
        differences = max(repeat.max_output_difference or 0.0 for repeat in result.repeats)
        table.add_section()
        table.add_row("async / sync throughput", f"{ratio:.2f} (rounds: {ratios})", "")
        table.add_row(
            "same greedy tokens in both modes",
            "yes" if same else "NO",
            f"max |output diff| {differences:.2e}",
        )
    return table


def _config_dict(config: EPConfig) -> dict[str, Any]:
    document = asdict(config)
    document["modes"] = list(config.modes)
    return document


def _nanmean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
