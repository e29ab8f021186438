"""The transform that turns a plain model into the attention worker's half of expert parallelism.

:class:`RemoteExperts` replaces a MoE layer's experts: route stays the model's, dispatch and
combine are :mod:`moeserve.ep.dispatch`, and the experts stage is an :class:`Exchange` with the
expert workers (sync or async, set per mode). The model's forward is otherwise untouched.

Shape legend: T tokens, k top-k, D hidden, N = T*k rows.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from moeserve.ep.dispatch import DispatchPlan, combine_outputs, plan_dispatch
from moeserve.ep.faults import FailurePoint
from moeserve.ep.metrics import AttentionStats
from moeserve.moe.types import RouterOutput


class Exchange(Protocol):
    """Sends a plan's rows to the expert workers and returns their outputs [N, D] in plan order."""

    def exchange(self, plan: DispatchPlan) -> torch.Tensor: ...


class RemoteExperts(nn.Module):
    """``forward(hidden [T, D], routing) -> [T, D]`` with the experts on other processes."""

    def __init__(
        self, layer_index: int, expert2worker: torch.Tensor, num_workers: int, failure: FailurePoint
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.expert2worker = expert2worker  # [E] int64
        self.num_workers = num_workers
        self.failure = failure
        self.exchange: Exchange | None = None
        self.stats: AttentionStats | None = None

    def forward(self, hidden: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        assert self.exchange is not None, "set an exchange (a mode) before running the model"
        self.failure.tick()
        plan = plan_dispatch(self.layer_index, hidden, routing, self.expert2worker, self.num_workers)
        if self.stats is not None:
            self.stats.record_dispatch(self.layer_index, plan.worker_counts)
        outputs = self.exchange.exchange(plan)  # [N, D]
        return combine_outputs(plan, outputs, hidden.shape[0])
