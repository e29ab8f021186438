"""One small adapter per checkpoint family: where its MoE blocks are and what they add.

transformers 5 gives every supported family the same MoE block shape: its router
(``block.gate``, Phi-3.5-MoE's ``block.router``) returns ``(router_logits [T, E], topk_weights
[T, k], topk_ids [T, k])`` and ``block.experts`` holds ``gate_up_proj [E, 2I, D]`` and
``down_proj [E, D, I]`` with an ``act_fn``. A family adapter names the block class, its router,
the config field of its top-k and the family's shared-expert term, nothing more; routing stays
the checkpoint's own router, so outputs match transformers' forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moeserve.registry import Registry

SharedExperts = Callable[[Any, torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class Family:
    """How moeserve finds and rebuilds the MoE blocks of one ``config.model_type``."""

    model_type: str
    block_class: str
    """Class name of the family's sparse MoE block in transformers."""
    shared_experts: SharedExperts | None = None
    """Output of the always-on shared expert(s) for flat hidden [T, D] (None from it: this
    block has none), or None when the family has none."""
    router_attr: str = "gate"
    """Attribute of the block holding its router."""
    top_k_field: str = "num_experts_per_tok"
    """config field holding the number of experts each token is routed to (an int, or one per layer)."""

    def top_k(self, config: Any) -> int:
        """Experts per token from ``config``; a per-layer list must hold one value (moeserve runs
        one top-k per model)."""
        value = getattr(config, self.top_k_field)
        if isinstance(value, list | tuple):
            if len(set(value)) != 1:
                raise ValueError(f"{self.model_type}: {self.top_k_field} differs between layers ({value}); not supported")
            value = value[0]
        return int(value)


def _qwen2_shared(block: Any, hidden: torch.Tensor) -> torch.Tensor:
    # Qwen2-MoE (and Qwen3-Next) scale their shared expert by a learned sigmoid gate per token.
    return F.sigmoid(block.shared_expert_gate(hidden)) * block.shared_expert(hidden)


def _deepseek_shared(block: Any, hidden: torch.Tensor) -> torch.Tensor | None:
    # DeepSeek-V2/V3, GLM-4.5, dots.llm1, EXAONE-MoE; ERNIE-4.5 sets it to None without shared experts.
    return block.shared_experts(hidden) if block.shared_experts is not None else None


def _hunyuan_shared(block: Any, hidden: torch.Tensor) -> torch.Tensor:
    return block.shared_mlp(hidden)


FAMILIES: Registry[Family] = Registry("model family")
for _family in (
    Family("mixtral", "MixtralSparseMoeBlock"),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", _qwen2_shared),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    Family("olmoe", "OlmoeSparseMoeBlock"),
    Family("deepseek_v2", "DeepseekV2Moe", _deepseek_shared),
    Family("deepseek_v3", "DeepseekV3MoE", _deepseek_shared),
    Family("glm4_moe", "Glm4MoeMoE", _deepseek_shared),
    Family("glm4_moe_lite", "Glm4MoeLiteMoE", _deepseek_shared),
    Family("dots1", "Dots1MoE", _deepseek_shared),
    Family("exaone_moe", "ExaoneMoeSparseMoEBlock", _deepseek_shared),
    Family("ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", _deepseek_shared),
    Family("hunyuan_v1_moe", "HunYuanMoEV1Moe", _hunyuan_shared, top_k_field="moe_topk"),
    Family("phimoe", "PhimoeSparseMoeBlock", router_attr="router"),
    Family("flex_olmo", "FlexOlmoSparseMoeBlock"),
    Family("qwen3_next", "Qwen3NextSparseMoeBlock", _qwen2_shared),
):
    FAMILIES.register(_family.model_type)(_family)
