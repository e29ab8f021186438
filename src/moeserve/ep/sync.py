"""sync mode: a barrier exchange per layer call (the synchronous expert-parallel baseline).

Every layer call is three ``all_to_all_single`` collectives over all ranks: a control row per
rank (:class:`~moeserve.ep.messages.SyncControl`: which layer, rows per expert), the rows
(attention -> experts, split sizes from the control) and the outputs (experts -> attention).
No rank passes a collective before every rank has entered it, so each layer waits for the
slowest expert worker; the time an expert worker spends in the combine collective after
computing is its barrier wait.

Shape legend: N rows of a layer call, n rows of one worker, D hidden, E experts, R ranks.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from moeserve.ep.dispatch import DispatchPlan
from moeserve.ep.experts import ExpertShard
from moeserve.ep.faults import FailurePoint
from moeserve.ep.messages import SyncControl
from moeserve.ep.metrics import AttentionStats, ExpertStats
from moeserve.ep.serialize import control_width, decode_control, encode_control


class SyncExchange:
    """Attention side (rank 0) of the sync mode; ``stop()`` ends the phase at every expert worker."""

    def __init__(
        self, world_size: int, num_experts: int, expert2worker: torch.Tensor, stats: AttentionStats
    ) -> None:
        self.world_size = world_size
        self.num_experts = num_experts
        self.expert2worker = expert2worker  # [L, E]
        self.stats = stats
        self.width = control_width(num_experts)
        workers = torch.arange(world_size - 1)[:, None]  # [W, 1]
        self.held = [(row[None, :] == workers).to(torch.int64) for row in expert2worker]  # L x [W, E]

    def _control(self, controls: list[SyncControl]) -> None:
        sent = torch.zeros(self.world_size, self.width, dtype=torch.int64)  # [R, 2+E]; row 0 (self) unused
        for worker, control in enumerate(controls):
            sent[worker + 1] = encode_control(control)
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent)

    def exchange(self, plan: DispatchPlan) -> torch.Tensor:
        rows = plan.groups.rows  # [N, D]
        counts = self.held[plan.layer] * plan.groups.expert_counts[None, :]  # [W, E]
        self._control([SyncControl(False, plan.layer, counts[w]) for w in range(self.world_size - 1)])
        nothing = [0] * self.world_size
        splits = [0, *plan.worker_counts]
        dist.all_to_all_single(rows.new_empty(0, rows.shape[1]), rows, nothing, splits)
        outputs = torch.empty_like(rows)  # [N, D]
        start = time.perf_counter()
        dist.all_to_all_single(outputs, rows.new_empty(0, rows.shape[1]), splits, nothing)
        self.stats.expert_wait_s += time.perf_counter() - start
        return outputs

    def stop(self) -> None:
        stop = SyncControl(True, 0, torch.zeros(self.num_experts, dtype=torch.int64))
        self._control([stop] * (self.world_size - 1))


def serve_sync(
    shard: ExpertShard,
    world_size: int,
    num_experts: int,
    hidden_size: int,
    dtype: torch.dtype,
    stats: ExpertStats,
    failure: FailurePoint,
) -> None:
    """Expert-worker loop of the sync mode: serve layer calls until the attention worker says stop."""
    width = control_width(num_experts)
    nothing = [0] * world_size
    started, cpu_started = time.perf_counter(), time.process_time()
    while True:
        received = torch.empty(world_size, width, dtype=torch.int64)  # [R, 2+E]
        waited = time.perf_counter()
        dist.all_to_all_single(received, torch.zeros(world_size, width, dtype=torch.int64))
        stats.idle_s += time.perf_counter() - waited
        control = decode_control(received[0])
        if control.stop:
            break
        failure.tick()
        count = int(control.expert_counts.sum())
        from_attention = [count] + [0] * (world_size - 1)
        rows = torch.empty(count, hidden_size, dtype=dtype)  # [n, D]
        dist.all_to_all_single(rows, torch.empty(0, hidden_size, dtype=dtype), from_attention, nothing)
        computing = time.perf_counter()
        outputs = shard.run_grouped(control.layer, rows, control.expert_counts)  # [n, D]
        done = time.perf_counter()
        dist.all_to_all_single(torch.empty(0, hidden_size, dtype=dtype), outputs, nothing, from_attention)
        layer = stats.layers[control.layer]
        layer.calls += 1
        layer.rows += count
        layer.busy_s += done - computing
        layer.barrier_wait_s += time.perf_counter() - done
    stats.wall_s += time.perf_counter() - started
    stats.cpu_s += time.process_time() - cpu_started
