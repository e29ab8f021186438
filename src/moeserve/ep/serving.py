"""Long-lived sync expert parallelism for the server: ``moeserve serve --expert-parallel N``.

The server process is rank 0, the attention worker: it keeps embeddings, attention, routers and
the KV cache, and its MoE layers' experts become :class:`~moeserve.ep.remote.RemoteExperts`
over a :class:`~moeserve.ep.sync.SyncExchange`. Ranks 1..N-1 are expert worker processes
started here; each reads only the experts a greedy placement (from expert loads measured on
calibration text) gives it and serves layer calls with :func:`~moeserve.ep.sync.serve_sync`
until :meth:`ExpertParallelService.stop`. The engine's forward (on its own thread) drives the
collectives, one layer call at a time, so nothing else may use the process group meanwhile.

Only the sync mode serves: the async mode's micro-batches belong to a batch run
(``moeserve bench ep``), not to the engine's one-forward-per-step loop. Idle servers leave the
workers waiting in a collective, so the process group's timeout is long (``idle_timeout_s``);
a worker that dies makes the next step fail with an error (500) and ``/health`` go red.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moeserve.ep.faults import FailurePoint
from moeserve.ep.metrics import AttentionStats, ExpertStats
from moeserve.ep.remote import RemoteExperts
from moeserve.ep.sync import SyncExchange, serve_sync
from moeserve.ep.worker import _broadcast_placement, place_experts
from moeserve.errors import MoeserveError
from moeserve.models.loader import MoEModel
from moeserve.ports import free_port

IDLE_TIMEOUT_S = 7 * 24 * 3600.0
"""How long expert workers may wait in a collective for the next layer call (an idle server)."""


def _expert_worker(rank: int, world_size: int, port: int, folder: str, threads: int, timeout_s: float) -> None:
    """Process entry point of expert worker ``rank``: read its experts, serve until told to stop."""
    from moeserve.ep.experts import shard_from_checkpoint

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    placement, (num_layers, num_experts, hidden_size, _) = _broadcast_placement(None, None)
    shard = shard_from_checkpoint(folder, placement, rank - 1)
    stats = ExpertStats.empty(rank, num_layers)
    serve_sync(shard, world_size, num_experts, hidden_size, torch.float32, stats, FailurePoint(None, rank))
    dist.destroy_process_group()


def measure_expert_loads(model: MoEModel, token_ids: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """float64 [L, E]: tokens routed to each expert of each MoE layer over ``token_ids`` [T]."""
    counts = [torch.zeros(layer.experts.num_experts, dtype=torch.float64) for layer in model.layers]

    def observe(layer_index: int, routing) -> None:
        counts[layer_index] += torch.bincount(routing.topk_ids.reshape(-1), minlength=counts[layer_index].numel())

    for layer in model.layers:
        layer.observers.append(observe)
    try:
        usable = token_ids[: token_ids.numel() // chunk * chunk] if token_ids.numel() >= chunk else token_ids
        model.logits(usable.view(-1, min(chunk, usable.numel())))
    finally:
        for layer in model.layers:
            layer.observers.remove(observe)
    return torch.stack(counts).numpy()


@dataclass
class ExpertParallelService:
    """The attention side of a running sync expert-parallel deployment."""

    processes: list[Any]
    exchange: SyncExchange
    stats: AttentionStats
    expert2worker: np.ndarray
    """int64 [L, E]: the expert worker (rank - 1) holding each expert."""

    def alive(self) -> bool:
        return all(process.is_alive() for process in self.processes)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Tell the workers to stop (if they are all alive), leave the group, reap the processes."""
        if self.alive():
            try:
                self.exchange.stop()
            except RuntimeError:
                pass  # a worker died meanwhile; terminate below
        if dist.is_initialized():
            dist.destroy_process_group()
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


def start_expert_parallel(
    model: MoEModel,
    processes: int,
    calibration_ids: torch.Tensor,
    threads: int = 1,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    start_timeout_s: float = 300.0,
) -> ExpertParallelService:
    """Move ``model``'s routed experts to ``processes - 1`` worker processes (rank 0 is this one).

    ``calibration_ids`` [T] is text whose routing sizes the placement. Raises MoeserveError for
    fewer than 2 processes, more expert workers than experts, or a process group already in use.
    """
    workers = processes - 1
    num_experts = model.num_experts
    if workers < 1:
        raise MoeserveError(f"--expert-parallel needs at least 2 processes (1 attention + 1 expert worker), got {processes}")
    if workers > num_experts:
        raise MoeserveError(f"--expert-parallel {processes} gives {workers} expert workers for only {num_experts} experts")
    if dist.is_initialized():
        raise MoeserveError("a torch.distributed process group is already initialised in this process")
    loads = measure_expert_loads(model, calibration_ids)  # [L, E]
    expert2worker = place_experts(loads, workers)  # [L, E]
    port = free_port()
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_expert_worker, args=(rank, processes, port, str(model.path), threads, idle_timeout_s),
                        daemon=True, name=f"moeserve-expert-{rank}")
        for rank in range(1, processes)
    ]
    for child in children:
        child.start()
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=processes,
                                timeout=timedelta(seconds=start_timeout_s))
        hidden_size = int(model.config.hidden_size)
        placement, _ = _broadcast_placement(expert2worker, [len(model.layers), num_experts, hidden_size, model.top_k])
    except BaseException:
        for child in children:
            child.terminate()
        raise
    stats = AttentionStats(num_layers=len(model.layers), num_workers=workers)
    exchange = SyncExchange(processes, num_experts, placement, stats)
    decoder_layers = model.hf_model.get_decoder().layers
    failure = FailurePoint(None, 0)
    for layer in model.layers:
        remote = RemoteExperts(layer.layer_index, placement[layer.layer_index], workers, failure)
        remote.exchange = exchange
        remote.stats = stats
        block = decoder_layers[model.decoder_layer_ids[layer.layer_index]].mlp
        block.moe = remote
        if hasattr(block, "experts"):
            del block.experts  # the attention worker holds no routed experts
    return ExpertParallelService(children, exchange, stats, expert2worker)
