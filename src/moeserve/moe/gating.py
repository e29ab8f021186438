"""Dispatch stage: group routed tokens by expert, dropless or with a fixed capacity.

Shape legend: T tokens, E experts, k top-k, D hidden, N dispatched rows, C capacity per expert.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moeserve.moe.types import ExpertGroups, RouterOutput
from moeserve.registry import Registry

Dispatcher = Callable[[torch.Tensor, RouterOutput, int, float], ExpertGroups]
GATINGS: Registry[Dispatcher] = Registry("gating mode")


@GATINGS.register("dropless")
def dispatch_dropless(
    hidden: torch.Tensor, routing: RouterOutput, num_experts: int, capacity_factor: float = 0.0
) -> ExpertGroups:
    """Every (token, expert) assignment gets a row: N = T*k, nothing padded, nothing dropped
    (with ``routing.skip_zero_weights``, only the assignments of non-zero weight: see :func:`dropless_groups`)."""
    del capacity_factor  # dropless has no capacity
    flat_ids = routing.topk_ids.reshape(-1)  # [T*k]
    if routing.skip_zero_weights:
        # Data-dependent row count: one host sync (the committee's skip threshold asked for it).
        kept = torch.nonzero(routing.topk_weights.reshape(-1) != 0).flatten()  # [n] assignments that run
        order = kept.index_select(0, torch.argsort(flat_ids.index_select(0, kept), stable=True))
        return dropless_groups(hidden, routing, order, num_experts)
    # A stable sort keeps rows of one expert in token order, as a per-expert loop would visit them.
    return dropless_groups(hidden, routing, torch.argsort(flat_ids, stable=True), num_experts)


def dropless_groups(
    hidden: torch.Tensor, routing: RouterOutput, row2assignment: torch.Tensor, num_experts: int
) -> ExpertGroups:
    """Dropless groups with rows in the order ``row2assignment`` [N] gives: the flat assignments
    (N = T*k: a permutation; fewer when zero-weight assignments are skipped) ordered so each
    expert's rows are together (expert-parallel dispatch orders them by worker first). A skipped
    assignment has no row; ``assignment2row`` points it at row 0, which its weight 0 cancels."""
    top_k = routing.topk_ids.shape[1]
    flat_ids = routing.topk_ids.reshape(-1)  # [T*k]
    row2token = row2assignment // top_k  # [N]
    every = row2assignment.numel() == flat_ids.numel()
    assignment2row = torch.empty_like(row2assignment) if every else torch.zeros_like(flat_ids)
    assignment2row[row2assignment] = torch.arange(row2assignment.numel(), device=row2assignment.device)  # [T*k]
    return ExpertGroups(
        rows=hidden.index_select(0, row2token),  # [N, D]
        row2token=row2token,
        row_weights=routing.topk_weights.reshape(-1).index_select(0, row2assignment),  # [N]
        expert_counts=torch.bincount(flat_ids if every else flat_ids.index_select(0, row2assignment),
                                     minlength=num_experts),  # [E]
        capacity=None,
        dropped=torch.zeros((), dtype=torch.int64),
        assignments=flat_ids.numel(),
        assignment2row=assignment2row,
        topk_weights=routing.topk_weights,
    )


def capacity_slots(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


@GATINGS.register("capacity")
def dispatch_capacity(
    hidden: torch.Tensor, routing: RouterOutput, num_experts: int, capacity_factor: float
) -> ExpertGroups:
    """The static baseline: each expert has C slots; overflow is dropped, empty slots are padded.

    Priority follows GShard: every token's first choice is placed before any second choice, and
    within one choice rank earlier tokens come first.
    """
    num_tokens, top_k = routing.topk_ids.shape
    capacity = capacity_slots(num_tokens, top_k, num_experts, capacity_factor)
    # Rank-major order: [k, T] flattened, so first choices claim slots first.
    flat_ids = routing.topk_ids.t().reshape(-1)  # [k*T]
    flat_weights = routing.topk_weights.t().reshape(-1)  # [k*T]
    flat_tokens = torch.arange(num_tokens, device=hidden.device).repeat(top_k)  # [k*T]
    one_hot = torch.nn.functional.one_hot(flat_ids, num_experts)  # [k*T, E]
    position = (torch.cumsum(one_hot, dim=0) * one_hot).sum(dim=1) - 1  # [k*T] slot inside its expert
    keep = position < capacity  # [k*T]
    slot = (flat_ids * capacity + position)[keep]  # [kept]
    kept_tokens = flat_tokens[keep]
    rows = hidden.new_zeros(num_experts * capacity, hidden.shape[1])  # [E*C, D]
    rows[slot] = hidden.index_select(0, kept_tokens)
    row2token = torch.zeros(num_experts * capacity, dtype=torch.int64, device=hidden.device)
    row2token[slot] = kept_tokens
    row_weights = routing.topk_weights.new_zeros(num_experts * capacity)
    row_weights[slot] = flat_weights[keep]
    return ExpertGroups(
        rows=rows,
        row2token=row2token,
        row_weights=row_weights,
        expert_counts=torch.full((num_experts,), capacity, dtype=torch.int64, device=hidden.device),
        capacity=capacity,
        dropped=(~keep).sum(),
        assignments=flat_ids.numel(),
    )
