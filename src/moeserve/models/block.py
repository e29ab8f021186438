"""``MoEBlock``: a checkpoint's sparse MoE block rebuilt around moeserve's MoE layer.

It keeps the family block's children under their original names (so state-dict keys and
transformers' router-logit hooks are unchanged), routes with the family's own ``gate``,
runs the routed experts through :class:`moeserve.moe.layer.MoELayer`, and adds the family's
shared experts where it has them.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.models.families import Family
from moeserve.moe.layer import MoELayer
from moeserve.moe.types import RouterOutput


class MoEBlock(nn.Module):
    """Drop-in replacement for one family MoE block: ``forward(hidden [B, S, D]) -> [B, S, D]``."""

    def __init__(self, original: nn.Module, family: Family, layer: MoELayer) -> None:
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.family = family
        self.moe = layer

    @property
    def router_module(self) -> nn.Module:
        """The family's router (``gate`` in most families, see ``Family.router_attr``):
        ``router(hidden [T, D]) -> (logits [T, E], topk_weights [T, k], topk_ids [T, k])``."""
        return getattr(self, self.family.router_attr)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])  # [T, D]
        logits, topk_weights, topk_ids = self.router_module(flat)  # [T, E], [T, k], [T, k]
        out = self.moe(flat, RouterOutput(topk_ids=topk_ids, topk_weights=topk_weights, logits=logits))
        if self.family.shared_experts is not None:
            shared = self.family.shared_experts(self, flat)
            if shared is not None:
                out = out + shared
        return out.view(shape)
