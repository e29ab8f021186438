"""One rank of an expert-parallel run: rank 0 is the attention worker, the others expert workers.

:func:`worker_main` is the process entry point the launcher starts. Steps of every rank:
  1. join the gloo process group (``tcp://127.0.0.1:port``, a timeout on every operation);
  2. rank 0 builds the workload, measures expert loads over the prompts, places each layer's
     experts greedily (``moeserve.placement.balance.greedy_placement``) and broadcasts the
     [L, E] placement with the shapes; expert workers read only their experts;
  3. for each mode in order: rank 0 runs an optional warm-up and the timed requests, the expert
     workers serve until told to stop; a barrier closes the mode;
  4. each rank puts its result (or its traceback) on the launcher's queue.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moeserve.ep.async_ import AsyncAttention, serve_async
from moeserve.ep.config import EPConfig
from moeserve.ep.experts import ExpertShard, shard_from_checkpoint, synthetic_shard
from moeserve.ep.faults import FailurePoint
from moeserve.ep.metrics import AttentionStats, ExpertStats
from moeserve.ep.remote import RemoteExperts
from moeserve.ep.requests import RequestRecord, micro_batch_slices
from moeserve.ep.serialize import Doorbell, message_capacity
from moeserve.ep.sync import SyncExchange, serve_sync
from moeserve.ep.workload import Workload, build_workload


@dataclass
class ModeOutcome:
    """What the attention worker saw in one mode."""

    mode: str
    record: RequestRecord
    wall_s: float
    """Wall time of the timed requests, prefill to last token."""
    stats: AttentionStats


@dataclass
class AttentionResult:
    rank: int
    expert2worker: np.ndarray
    """int64 [L, E] expert worker (rank - 1) of every expert."""
    top_k: int
    outcomes: list[ModeOutcome]


@dataclass
class ExpertResult:
    rank: int
    stats: list[ExpertStats]
    """One per mode run, in :func:`schedule` order."""
    held_experts: list[int]
    """[L] experts this rank held per layer."""


def worker_main(rank: int, config: EPConfig, port: int, doorbells: str, results: Any) -> None:
    """Process entry point: run this rank, put ``("ok"|"error", rank, payload)`` on ``results``.

    ``doorbells`` is a private folder where every rank binds its :class:`Doorbell` (async mode)."""
    try:
        torch.set_num_threads(config.threads)
        doorbell = Doorbell(doorbells, rank)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=config.processes,
            timeout=timedelta(seconds=config.collective_timeout_s),
        )
        result: AttentionResult | ExpertResult = (
            run_attention_worker(config, doorbell) if rank == 0 else run_expert_worker(config, rank, doorbell)
        )
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1) from None
    results.put(("ok", rank, result))


def _broadcast_placement(
    expert2worker: np.ndarray | None, shapes: list[int] | None
) -> tuple[torch.Tensor, list[int]]:
    """Rank 0 sends (placement [L, E], [L, E, D, k]); the others receive them."""
    header = torch.tensor(shapes if shapes is not None else [0, 0, 0, 0], dtype=torch.int64)
    dist.broadcast(header, src=0)
    num_layers, num_experts = int(header[0]), int(header[1])
    placement = (
        torch.from_numpy(expert2worker).to(torch.int64)
        if expert2worker is not None
        else torch.empty(num_layers, num_experts, dtype=torch.int64)
    )
    dist.broadcast(placement, src=0)
    return placement, [int(v) for v in header.tolist()]


def schedule(config: EPConfig) -> list[str]:
    """Every mode run of a launch, in order: ``config.modes`` repeated ``config.rounds`` times."""
    return list(config.modes) * config.rounds


def message_sizes(config: EPConfig, top_k: int, hidden_size: int) -> tuple[int, int]:
    """(capacity bytes, depth) of the async mode's posted receives, the same on every rank.

    The largest message is one micro-batch's prefill rows, all routed to one worker; depth covers
    one message per micro-batch in flight plus the final one."""
    rows = -(-config.requests // config.micro_batches) * config.prompt_tokens * top_k
    return message_capacity(rows, hidden_size), config.micro_batches + 2


def place_experts(loads: np.ndarray, num_workers: int) -> np.ndarray:
    """int64 [L, E]: greedy placement of each layer's loads [L, E] on ``num_workers`` expert workers."""
    from moeserve.placement.balance import greedy_placement

    return np.stack([greedy_placement(layer_loads.astype(np.float64), num_workers) for layer_loads in loads])


def run_attention_worker(config: EPConfig, doorbell: Doorbell) -> AttentionResult:
    workload = build_workload(config)
    expert2worker = place_experts(workload.expert_loads(), config.expert_workers)  # [L, E]
    placement, _ = _broadcast_placement(
        expert2worker, [workload.num_layers, workload.num_experts, workload.hidden_size, workload.top_k]
    )
    failure = FailurePoint(config.inject_failure, 0)
    remotes = [
        RemoteExperts(layer, placement[layer], config.expert_workers, failure)
        for layer in range(workload.num_layers)
    ]
    workload.install(lambda layer: remotes[layer])
    outcomes = []
    for mode in schedule(config):
        outcomes.append(_run_mode(mode, workload, config, placement, remotes, doorbell))
        dist.barrier()
    return AttentionResult(rank=0, expert2worker=expert2worker, top_k=workload.top_k, outcomes=outcomes)


def _run_mode(
    mode: str,
    workload: Workload,
    config: EPConfig,
    placement: torch.Tensor,
    remotes: list[RemoteExperts],
    doorbell: Doorbell,
) -> ModeOutcome:
    """Warm-up (its figures discarded), then the timed requests, then stop the expert workers' loop.

    sync runs every request as one batch; async runs ``config.micro_batches`` micro-batches.
    """
    stats = AttentionStats(workload.num_layers, config.expert_workers)
    exchange: SyncExchange | AsyncAttention
    if mode == "sync":
        exchange = SyncExchange(config.processes, workload.num_experts, placement, stats)
        parts = [slice(0, config.requests)]
    else:
        capacity, depth = message_sizes(config, workload.top_k, workload.hidden_size)
        exchange = AsyncAttention(
            config.processes, stats, doorbell, capacity, depth, config.collective_timeout_s
        )
        parts = micro_batch_slices(config.requests, config.micro_batches)
    for remote in remotes:
        remote.exchange = exchange

    def run(record: RequestRecord, prompt_tokens: int) -> float:
        bodies = [record.body(workload, part, prompt_tokens) for part in parts]
        start, cpu_start = time.perf_counter(), time.process_time()
        if isinstance(exchange, AsyncAttention):
            exchange.run(bodies)
        else:
            with torch.inference_mode():
                bodies[0]()
        exchange.stats.cpu_s += time.process_time() - cpu_start
        return time.perf_counter() - start

    if config.warmup:
        warm_stats = AttentionStats(workload.num_layers, config.expert_workers)
        _use_stats(exchange, remotes, warm_stats)
        run(RequestRecord(config.requests, 2), min(2, config.prompt_tokens))
    _use_stats(exchange, remotes, stats)
    record = RequestRecord(config.requests, config.new_tokens)
    wall_s = run(record, config.prompt_tokens)
    exchange.stop()
    return ModeOutcome(mode, record, wall_s, stats)


def _use_stats(
    exchange: SyncExchange | AsyncAttention, remotes: list[RemoteExperts], stats: AttentionStats
) -> None:
    exchange.stats = stats
    for remote in remotes:
        remote.stats = stats


def run_expert_worker(config: EPConfig, rank: int, doorbell: Doorbell) -> ExpertResult:
    placement, (num_layers, num_experts, hidden_size, top_k) = _broadcast_placement(None, None)
    worker = rank - 1
    shard: ExpertShard
    if config.trace is not None:
        shard = synthetic_shard(placement, worker, config.seed, config.hidden_size, config.intermediate_size)
    else:
        from moeserve.models.loader import resolve_model_path

        shard = shard_from_checkpoint(str(resolve_model_path(config.model)), placement, worker)
    failure = FailurePoint(config.inject_failure, rank)
    all_stats = []
    for mode in schedule(config):
        stats = ExpertStats.empty(rank, num_layers)
        if mode == "sync":
            serve_sync(shard, config.processes, num_experts, hidden_size, torch.float32, stats, failure)
        else:
            serve_async(
                shard,
                rank,
                top_k,
                config.scheduler,
                config.hold_tokens_per_expert,
                config.flush_after_s,
                doorbell,
                *message_sizes(config, top_k, hidden_size),
                config.collective_timeout_s,
                stats,
                failure,
            )
        all_stats.append(stats)
        dist.barrier()
    return ExpertResult(rank=rank, stats=all_stats, held_experts=shard.held_counts())
