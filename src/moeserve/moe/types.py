"""Typed values passed between the MoE layer's stages.

Shape legend (used in every MoE module): T tokens, E experts, k experts per token (top-k),
D hidden size, I expert intermediate size, N dispatched rows (T*k when dropless, E*C with
capacity C per expert when capacity-gated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class RouterOutput:
    """What the route stage returns: each token's chosen experts and their gate weights."""

    topk_ids: torch.Tensor  # [T, k] int64 expert ids
    topk_weights: torch.Tensor  # [T, k] gate weights, already normalised/scaled as the model does
    logits: torch.Tensor | None = None  # [T, E] raw router logits, when the router exposes them
    skip_zero_weights: bool = False
    """Assignments whose weight is exactly 0 are skipped: dispatch gives them no row, so their
    experts neither compute nor (under an expert cache) load for them (a committee's skip
    threshold sets this). Their contribution, 0 x output, is dropped either way."""

    def executed_ids(self) -> torch.Tensor:
        """[n] the expert ids of the assignments that run (all T*k unless zero weights are skipped)."""
        if self.skip_zero_weights:
            return self.topk_ids[self.topk_weights != 0]
        return self.topk_ids.reshape(-1)


@dataclass(frozen=True)
class ExpertGroups:
    """What dispatch returns: tokens copied into rows grouped contiguously by expert.

    Expert ``e`` owns the rows between the prefix sums of ``expert_counts`` before and through ``e``. Padded rows (capacity gating) carry
    weight 0, so combine ignores them although the experts stage computes them.
    """

    rows: torch.Tensor  # [N, D] hidden states, grouped by expert
    row2token: torch.Tensor  # [N] int64 source token of each row (0 for padding)
    row_weights: torch.Tensor  # [N] gate weight of each row (0 for padding)
    expert_counts: torch.Tensor  # [E] int64 rows per expert (capacity C for every expert when capacity-gated)
    capacity: int | None  # C when every expert has exactly C rows (capacity gating), else None
    dropped: torch.Tensor  # [] int64 number of (token, expert) assignments dropped for lack of capacity
    assignments: int  # T*k, the number of (token, expert) assignments routed
    assignment2row: torch.Tensor | None = None
    """[T*k] row holding each (token, slot) assignment, when every assignment has one (dropless)."""
    topk_weights: torch.Tensor | None = None
    """[T, k] gate weights in token order, kept with ``assignment2row`` for the gather combine."""

    @property
    def dropped_fraction(self) -> float:
        """Share of routed assignments dropped (host sync; call outside hot loops)."""
        return float(self.dropped) / max(1, self.assignments)


class ExpertProvider(Protocol):
    """Where the experts stage gets weights. The memory tier implements this over a cache.

    ``gate_up(e)`` is [2I, D] (gate rows first, then up rows), ``down(e)`` is [D, I].
    ``stacked()`` returns ([E, 2I, D], [E, D, I]) when every expert is resident in one tensor,
    else None (then only per-expert backends can run).
    """

    @property
    def num_experts(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the expert weights (every expert has the same)."""
        ...

    @property
    def device(self) -> torch.device:
        """Device the experts stage computes on."""
        ...

    def gate_up(self, expert: int) -> torch.Tensor: ...

    def down(self, expert: int) -> torch.Tensor: ...

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...


@dataclass(frozen=True)
class ResidentExperts:
    """All experts of one layer resident in two stacked tensors (shares storage with the model)."""

    gate_up_proj: torch.Tensor  # [E, 2I, D]
    down_proj: torch.Tensor  # [E, D, I]

    def __post_init__(self) -> None:
        e, two_i, d = self.gate_up_proj.shape
        if self.down_proj.shape != (e, d, two_i // 2):
            raise ValueError(
                f"down_proj shape {tuple(self.down_proj.shape)} does not match gate_up_proj "
                f"{tuple(self.gate_up_proj.shape)}; expected {(e, d, two_i // 2)}"
            )

    @property
    def num_experts(self) -> int:
        return int(self.gate_up_proj.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up_proj.dtype

    @property
    def device(self) -> torch.device:
        return self.gate_up_proj.device

    def gate_up(self, expert: int) -> torch.Tensor:
        return self.gate_up_proj[expert]

    def down(self, expert: int) -> torch.Tensor:
        return self.down_proj[expert]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.gate_up_proj, self.down_proj


@dataclass(frozen=True)
class UnloadedExperts:
    """A layer whose experts were not read at load (``load_model(..., load_experts=False)``).

    It knows what the experts are (count, dtype, device) so an expert cache can take the layer
    over (:func:`moeserve.memory.offload.apply_expert_cache`); asking it for weights raises.
    """

    count: int
    weight_dtype: torch.dtype
    weight_device: torch.device

    @property
    def num_experts(self) -> int:
        return self.count

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_dtype

    @property
    def device(self) -> torch.device:
        return self.weight_device

    def _unloaded(self) -> RuntimeError:
        return RuntimeError(
            "this model was loaded without its experts (load_experts=False): apply an expert cache "
            "(moeserve.memory.offload.apply_expert_cache) before running it"
        )

    def gate_up(self, expert: int) -> torch.Tensor:
        raise self._unloaded()

    def down(self, expert: int) -> torch.Tensor:
        raise self._unloaded()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None
