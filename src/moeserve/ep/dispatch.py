"""Attention-side dispatch and combine for expert parallelism, shared by both modes.

Shape legend: T tokens, k top-k, E experts, D hidden, N = T*k rows (dropless), W expert workers.

:func:`plan_dispatch` orders one layer's token-expert assignments by (expert worker, expert id),
keeping token order within an expert, so worker w owns one contiguous block of rows and, inside
it, each of its experts a contiguous group, exactly the rows the single-process dropless dispatch
gives that expert. :func:`combine_outputs` is the MoE layer's own ``combine`` on the returned rows,
so a token's output is summed in the same order as in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.moe.gating import dropless_groups
from moeserve.moe.layer import combine
from moeserve.moe.types import ExpertGroups, RouterOutput


@dataclass(frozen=True)
class DispatchPlan:
    """Where one layer call's rows go. ``worker_counts`` is on the host: split sizes need it."""

    layer: int
    groups: ExpertGroups
    """Rows [N, D] grouped by (worker, expert); its ``assignment2row``/``topk_weights`` drive combine."""
    row_expert: torch.Tensor
    """[N] int64 expert id of each row."""
    worker_counts: list[int]
    """[W] rows sent to each expert worker, in worker order."""

    @property
    def worker_offsets(self) -> list[int]:
        """[W + 1] first row of each worker's block, then N."""
        offsets = [0]
        for count in self.worker_counts:
            offsets.append(offsets[-1] + count)
        return offsets


def plan_dispatch(
    layer: int, hidden: torch.Tensor, routing: RouterOutput, expert2worker: torch.Tensor, num_workers: int
) -> DispatchPlan:
    """Group ``hidden`` [T, D] rows by the worker then the expert each assignment goes to.

    ``expert2worker`` [E] int64 maps expert ids to expert-worker indices 0..W-1 (rank - 1).
    One host sync (the per-worker row counts).
    """
    num_experts = expert2worker.numel()
    flat_ids = routing.topk_ids.reshape(-1)  # [T*k]
    workers = expert2worker.index_select(0, flat_ids)  # [T*k]
    # A stable sort keeps rows of one expert in token order, as the one-process dispatch does.
    row2assignment = torch.argsort(workers * num_experts + flat_ids, stable=True)  # [N]
    groups = dropless_groups(hidden, routing, row2assignment, num_experts)
    worker_counts = torch.bincount(workers, minlength=num_workers).tolist()  # [W]
    return DispatchPlan(
        layer=layer,
        groups=groups,
        row_expert=flat_ids.index_select(0, row2assignment),
        worker_counts=worker_counts,
    )


def combine_outputs(plan: DispatchPlan, outputs: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[N, D] expert outputs in plan row order -> [T, D] weighted sums (the MoE layer's combine)."""
    return combine(plan.groups, outputs, num_tokens)
