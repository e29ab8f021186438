"""Small random-initialised checkpoints of every supported family, saved in HF format.

Used by the equivalence tests and by benchmarks that need a model of a given shape without
downloading one. The weights are random; the architecture and the on-disk layout are exactly
what transformers writes for that family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_ROUTED_AND_SHARED: dict[str, Any] = {
    "intermediate_size": 64,
    "moe_intermediate_size": 24,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "num_hidden_layers": 3,
}
"""DeepSeek-V3-style MoE fields (routed and shared experts, a dense first layer), shared by the
families that took that block (DeepSeek-V3, GLM-4.5, GLM-4.7-Flash, dots.llm1)."""
_MLA: dict[str, Any] = {
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "num_key_value_heads": 4,
}
"""Multi-head latent attention fields (DeepSeek-V3, GLM-4.7-Flash)."""

# Per family: config class name and the fields that make a tiny model (2-3 layers, 8 experts).
_TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralConfig",
        {"intermediate_size": 48, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "intermediate_size": 64,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 40,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"intermediate_size": 64, "moe_intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2,
         "norm_topk_prob": True, "head_dim": 8},
    ),
    "olmoe": (
        "OlmoeConfig",
        {"intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2},
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        {
            "intermediate_size": 64,
            "moe_intermediate_size": 24,
            "n_routed_experts": 8,
            "n_shared_experts": 2,
            "num_experts_per_tok": 2,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": None,  # DeepSeek-V2-Lite projects queries directly
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "routed_scaling_factor": 1.5,
            "num_hidden_layers": 3,
            "num_key_value_heads": 4,
        },
    ),
    "deepseek_v3": ("DeepseekV3Config", {**_ROUTED_AND_SHARED, **_MLA, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}),
    "glm4_moe": (
        "Glm4MoeConfig",
        {**_ROUTED_AND_SHARED, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "use_qk_norm": True},
    ),
    "glm4_moe_lite": (  # no first_k_dense_replace: its mlp_layer_types default makes the first layer dense
        "Glm4MoeLiteConfig",
        {**{k: v for k, v in _ROUTED_AND_SHARED.items() if k != "first_k_dense_replace"}, **_MLA,
         "routed_scaling_factor": 1.8},
    ),
    "dots1": ("Dots1Config", {**_ROUTED_AND_SHARED, "norm_topk_prob": True, "routed_scaling_factor": 2.5}),
    "exaone_moe": (
        "ExaoneMoeConfig",
        {
            "intermediate_size": 64,
            "moe_intermediate_size": 24,
            "num_experts": 8,
            "num_shared_experts": 1,
            "num_experts_per_tok": 2,
            "first_k_dense_replace": 1,
            "num_hidden_layers": 3,
        },
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        {
            "intermediate_size": 64,
            "moe_intermediate_size": 24,
            "moe_num_experts": 8,
            "moe_num_shared_experts": 1,
            "moe_k": 2,
            "moe_layer_start_index": 1,
            "moe_layer_end_index": 2,
            "num_hidden_layers": 3,
        },
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        {"intermediate_size": 24, "num_experts": 8, "moe_topk": 2, "head_dim": 8},
    ),
    "phimoe": (
        "PhimoeConfig",
        {"intermediate_size": 48, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        {"intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2},
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        {
            "intermediate_size": 64,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 40,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "head_dim": 8,
            "layer_types": ["linear_attention", "full_attention"],  # Gated DeltaNet, then attention
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
        },
    ),
}

SUPPORTED_TINY_FAMILIES = tuple(_TINY)


def tiny_config(model_type: str, **overrides: Any):
    """A transformers config for a tiny model of ``model_type`` (fields overridable)."""
    import transformers

    if model_type not in _TINY:
        raise ValueError(f"unknown model_type {model_type!r}; known: {', '.join(_TINY)}")
    class_name, fields = _TINY[model_type]
    base: dict[str, Any] = {
        "vocab_size": 96,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    return getattr(transformers, class_name)(**{**base, **fields, **overrides})


def save_random_checkpoint(model_type: str, folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """Build a random tiny model of ``model_type`` and ``save_pretrained`` it into ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    _randomise_router_biases(model)
    model.save_pretrained(folder)
    return folder


def _randomise_router_biases(model: torch.nn.Module) -> None:
    # DeepSeek's score-correction bias (a buffer; ERNIE-4.5's is a parameter) is zero at init;
    # make it non-zero so the tests exercise the biased expert choice. Routers initialised to
    # zero get random weights too.
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                tensor.normal_(0, 0.1)
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and torch.count_nonzero(param) == 0:
                param.normal_(0, 0.5)


LARGE_MIXTRAL = {
    "vocab_size": 4096,
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 16,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 2048,
}
"""A Mixtral-architecture model whose routed experts take 5.6 GB in fp32 (8 x 16 x 44 MB)."""


def build_large_random_model(folder: Path, seed: int = 0) -> Path:
    """Save a random-weight Mixtral of ``LARGE_MIXTRAL`` shape with the reference tokenizer.

    For benchmarks of serving a model whose experts exceed a memory budget; its routing is
    random, not learned. Does nothing if ``folder`` already holds a config.json.
    """
    import shutil

    from moeserve.models.loader import REFERENCE_MODEL

    if (folder / "config.json").is_file():
        return folder
    save_random_checkpoint("mixtral", folder, seed=seed, **LARGE_MIXTRAL)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE_MODEL / name, folder / name)
    return folder
