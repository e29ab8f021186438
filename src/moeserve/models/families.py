"""One small adapter per checkpoint family: where its MoE blocks are and what they add.

transformers 5 gives every supported family the same MoE block shape: ``block.gate(x)``
returns ``(router_logits [T, E], topk_weights [T, k], topk_ids [T, k])`` and ``block.experts``
holds ``gate_up_proj [E, 2I, D]`` and ``down_proj [E, D, I]`` with an ``act_fn``. A family
adapter names the block class and the family's shared-expert term, nothing more; routing
stays the checkpoint's own router, so outputs match transformers' forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moeserve.registry import Registry

SharedExperts = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Family:
    """How moeserve finds and rebuilds the MoE blocks of one ``config.model_type``."""

    model_type: str
    block_class: str
    """Class name of the family's sparse MoE block in transformers."""
    num_experts_field: str
    """config field holding the number of routed experts."""
    shared_experts: SharedExperts | None = None
    """Output of the always-on shared expert(s) for flat hidden [T, D], or None."""


def _qwen2_shared(block: Any, hidden: torch.Tensor) -> torch.Tensor:
    # Qwen2-MoE scales its shared expert by a learned sigmoid gate per token.
    return F.sigmoid(block.shared_expert_gate(hidden)) * block.shared_expert(hidden)


def _deepseek_shared(block: Any, hidden: torch.Tensor) -> torch.Tensor:
    return block.shared_experts(hidden)


FAMILIES: Registry[Family] = Registry("model family")
for _family in (
    Family("mixtral", "MixtralSparseMoeBlock", "num_local_experts"),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", "num_experts", _qwen2_shared),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", "num_experts"),
    Family("olmoe", "OlmoeSparseMoeBlock", "num_experts"),
    Family("deepseek_v2", "DeepseekV2Moe", "n_routed_experts", _deepseek_shared),
    Family("deepseek_v3", "DeepseekV3MoE", "n_routed_experts", _deepseek_shared),
):
    FAMILIES.register(_family.model_type)(_family)
