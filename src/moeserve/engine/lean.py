"""A lean decoder forward for the serving engine: the same maths as transformers' decoder for
llama-style MoE families, in fewer operations.

Shape legend: B requests, S query tokens per request, L key positions, D hidden, H query heads,
Hk key/value heads, G = H / Hk, Dh head size.

Why: at serving batch sizes a small MoE model's decode step is made of per-operation overhead,
not arithmetic. transformers' decoder spends three projections, a rotary embedding of ~10 ops,
an eight-op RMSNorm and its module and mask plumbing per layer. This forward computes the same
function with one fused q/k/v projection (the three weights concatenated once), ``rms_norm`` as
one op (fp32; other dtypes keep the checkpoint's norm module), and, for decode, queries folded to
[B, Hk, G, Dh] so one SDPA call serves all query heads of a key/value head. MoE blocks, the
rotary embedding module and the KV cache are the model's own objects, called as transformers
calls them; the q/k/v weights are re-pointed at slices of the fused one, so nothing is copied.

Only families whose decoder layer is checked to be exactly pre-norm attention + MoE with plain
q/k/v/o projections (Qwen3-MoE, OLMoE, dots.llm1 and GLM-4.5: plus their query/key norms, see
``QK_NORM_PER_HEAD``; GLM-4.5's partial rotary embedding too) take this path (:func:`lean_decoder` says why not otherwise); every other
model runs transformers' decoder. DeepSeek-V2/V3 (multi-head latent attention) take
:class:`LeanMLADecoder`, which decodes in latent space (GLM-4.7-Flash's ``glm4_moe_lite`` too). The plain reference is transformers'
decoder itself; tests compare the two on prefill and decode.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = {
    "MixtralDecoderLayer": "MixtralAttention",
    "Qwen2MoeDecoderLayer": "Qwen2MoeAttention",
    "Qwen3MoeDecoderLayer": "Qwen3MoeAttention",
    "OlmoeDecoderLayer": "OlmoeAttention",
    "Dots1DecoderLayer": "Dots1Attention",
    "Glm4MoeDecoderLayer": "Glm4MoeAttention",
}
"""Decoder layer class -> attention class whose forward this module reproduces."""
MLA_LAYERS = {
    "DeepseekV2DecoderLayer": "DeepseekV2Attention",
    "DeepseekV3DecoderLayer": "DeepseekV3Attention",
    "Glm4MoeLiteDecoderLayer": "Glm4MoeLiteAttention",  # GLM-4.7-Flash: DeepSeek-V3's attention
}
"""Decoder layers with multi-head latent attention, run by :class:`LeanMLADecoder`."""
DENSE_MLP = {"DeepseekV2DecoderLayer": "DeepseekV2MLP", "DeepseekV3DecoderLayer": "DeepseekV3MLP",
             "Glm4MoeLiteDecoderLayer": "Glm4MoeLiteMLP", "Dots1DecoderLayer": "Dots1MLP",
             "Glm4MoeDecoderLayer": "Glm4MoeMLP"}
"""The dense MLP class of the families whose first layers are dense (``first_k_dense_replace``)."""
QK_NORM_PER_HEAD = {"Qwen3MoeAttention": True, "OlmoeAttention": False, "Dots1Attention": True, "Glm4MoeAttention": True}
"""Attention classes that normalise queries and keys before the rotary embedding: over each
head's Dh (Qwen3-MoE, dots.llm1, GLM-4.5 when it has them) or over the whole projection (OLMoE,
which may also clip q/k/v)."""


@dataclass
class _Layer:
    input_norm: Any  # the checkpoint's RMSNorm modules
    post_norm: Any
    qkv_weight: torch.Tensor  # [(H + 2 Hk) * Dh, D]
    qkv_bias: torch.Tensor | None
    o_proj: Any  # nn.Linear
    mlp: nn.Module
    q_norm: Any | None  # the checkpoint's query/key RMSNorm modules (QK_NORM_PER_HEAD families)
    k_norm: Any | None
    norm_per_head: bool
    clip_qkv: float | None  # OLMoE: q, k (after their norms) and v clamped to [-clip, clip]
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


def unsupported_reason(hf_model: Any) -> str | None:
    """Why :class:`LeanDecoder` cannot run this model (None when it can)."""
    decoder = hf_model.get_decoder()
    config = hf_model.config
    if not all(hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "norm", "layers")):
        return f"{type(decoder).__name__} has no embed_tokens / rotary_emb / norm / layers"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r}"
    if sliding_window_layout(config)[0] is not None:
        return "sliding-window attention"
    for index, layer in enumerate(decoder.layers):
        layer_class, attention = type(layer).__name__, getattr(layer, "self_attn", None)
        if (MLA_LAYERS.get(layer_class) or SUPPORTED_LAYERS.get(layer_class)) != type(attention).__name__:
            return f"layer {index}: {layer_class} with {type(attention).__name__}"
        if getattr(attention, "sliding_window", None):
            return f"layer {index}: sliding-window attention"
        if not (hasattr(layer.mlp, "moe") or type(layer.mlp).__name__ == DENSE_MLP.get(layer_class)):
            # a block moeserve did not replace, or a dense MLP of a family not known to have them
            return f"layer {index}: {type(layer.mlp).__name__} is neither a moeserve MoE block nor the family's dense MLP"
    return None


def sliding_window_layout(config: Any) -> tuple[int | None, bool]:
    """(window, per layer type) of a transformers config: the sliding window its attention masks
    apply, None when none does; True when ``config.layer_types`` gives only some layers one."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return (int(window), True) if window and "sliding_attention" in layer_types else (None, False)
    if window and getattr(config, "use_sliding_window", True) is not False:
        return int(window), False
    return None, False


def _fuse(parameters: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate parameters along dim 0 and re-point each at its slice of the result, so the
    fused tensor costs no extra memory and the model's own modules keep computing the same."""
    with torch.no_grad():
        fused = torch.cat([p.detach() for p in parameters])
        start = 0
        for parameter in parameters:
            end = start + parameter.shape[0]
            parameter.data = fused[start:end]
            start = end
    return fused


def _rms_norm(norm: Any, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dtype == torch.float32:  # same maths as transformers' RMSNorm (fp32 throughout)
        return F.rms_norm(hidden, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(hidden)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding exactly as transformers applies it (rotate_half convention). With a
    partial rotary embedding (GLM-4.5: cos/sin cover the first half of Dh) the rest passes through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((_rotate(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


def _qk_normed(layer: _Layer, qkv: torch.Tensor, q_size: int, kv_size: int) -> torch.Tensor:
    """The fused projection [B, S, (H + 2 Hk) Dh] with queries and keys normalised as the family
    does before its rotary embedding (and, for OLMoE with ``clip_qkv``, all three clamped)."""
    query, key, value = qkv.split((q_size, kv_size, kv_size), dim=-1)
    if layer.norm_per_head:  # Qwen3-MoE: each head's Dh values
        query = _rms_norm(layer.q_norm, query.unflatten(-1, (-1, layer.head_dim))).flatten(-2)
        key = _rms_norm(layer.k_norm, key.unflatten(-1, (-1, layer.head_dim))).flatten(-2)
    else:  # OLMoE: the whole projection
        query, key = _rms_norm(layer.q_norm, query), _rms_norm(layer.k_norm, key)
    qkv = torch.cat((query, key, value), dim=-1)
    if layer.clip_qkv is not None:
        qkv = qkv.clamp(min=-layer.clip_qkv, max=layer.clip_qkv)
    return qkv


class LeanDecoder:
    """``forward(input_ids [B, S], positions [B, S], mask [B, 1, S, L], cache) -> hidden [B, S, D]``."""

    def __init__(self, hf_model: Any) -> None:
        reason = unsupported_reason(hf_model)
        if reason is not None:
            raise ValueError(f"lean decoder does not support this model: {reason}")
        decoder = hf_model.get_decoder()
        if type(decoder.layers[0]).__name__ in MLA_LAYERS:
            raise ValueError("multi-head latent attention: use LeanMLADecoder (lean_decoder chooses)")
        self.embed_tokens = decoder.embed_tokens
        self.rotary_emb = decoder.rotary_emb
        self.norm = decoder.norm
        self.layers = []
        for layer in decoder.layers:
            attention = layer.self_attn
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            qkv_weight = _fuse([p.weight for p in projections])
            biases = [p.bias for p in projections]
            qkv_bias = _fuse(biases) if all(b is not None for b in biases) else None  # type: ignore[arg-type]
            heads = attention.q_proj.out_features // attention.head_dim
            # GLM-4.5 has query/key norms only with ``use_qk_norm``.
            qk_norm = type(attention).__name__ in QK_NORM_PER_HEAD and hasattr(attention, "q_norm")
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm,
                    post_norm=layer.post_attention_layernorm,
                    qkv_weight=qkv_weight,
                    qkv_bias=qkv_bias,
                    o_proj=attention.o_proj,
                    mlp=layer.mlp,
                    q_norm=attention.q_norm if qk_norm else None,
                    k_norm=attention.k_norm if qk_norm else None,
                    norm_per_head=QK_NORM_PER_HEAD.get(type(attention).__name__, False),
                    clip_qkv=getattr(attention.config, "clip_qkv", None) if qk_norm else None,
                    heads=heads,
                    kv_heads=heads // attention.num_key_value_groups,
                    head_dim=attention.head_dim,
                    scaling=attention.scaling,
                )
            )

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [B, S, D]
        cos, sin = self.rotary_emb(hidden, positions)  # [B, S, Dh] each
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, Dh]
        rows, length = input_ids.shape
        for index, layer in enumerate(self.layers):
            normed = _rms_norm(layer.input_norm, hidden)
            qkv = F.linear(normed, layer.qkv_weight, layer.qkv_bias)  # [B, S, (H + 2 Hk) Dh]
            q_size, kv_size = layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim
            if layer.q_norm is not None:
                qkv = _qk_normed(layer, qkv, q_size, kv_size)
            # q and k are adjacent in the fused output: one rotary embedding over both heads' sets.
            query_key, value = qkv.split((q_size + kv_size, kv_size), dim=-1)
            query_key = query_key.view(rows, length, layer.heads + layer.kv_heads, layer.head_dim).transpose(1, 2)
            query_key = _rotate(query_key, cos, sin)  # [B, H + Hk, S, Dh]
            query, key = query_key[:, : layer.heads], query_key[:, layer.heads :]
            value = value.view(rows, length, layer.kv_heads, layer.head_dim).transpose(1, 2)
            keys, values = cache.update(key, value, index)  # [B, Hk, L, Dh] each
            groups = layer.heads // layer.kv_heads
            if length == 1:  # decode: the G query heads of a key/value head attend as G query rows
                folded = query.reshape(rows, layer.kv_heads, groups, layer.head_dim)  # [B, Hk, G, Dh]
                attended = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=layer.scaling)
                attended = attended.reshape(rows, 1, layer.heads * layer.head_dim)  # [B, 1, H Dh]
            else:
                attended = F.scaled_dot_product_attention(
                    query, keys, values, attn_mask=mask, scale=layer.scaling, enable_gqa=groups > 1
                )  # [B, H, S, Dh]
                attended = attended.transpose(1, 2).reshape(rows, length, layer.heads * layer.head_dim)
            hidden = hidden + F.linear(attended, layer.o_proj.weight, layer.o_proj.bias)
            hidden = hidden + layer.mlp(_rms_norm(layer.post_norm, hidden))
        return _rms_norm(self.norm, hidden)


class LeanMLADecoder:
    """DeepSeek-V2/V3's decoder with multi-head latent attention (MLA) decoded in latent space.

    transformers caches MLA's compressed latents (``kv_a_layernorm`` output [B, 1, L, C] and the
    rotary key [B, 1, L, R]) and, at every step, expands the whole context back into per-head
    keys and values through ``kv_b_proj``: a [L, C] x [C, H (Dn + Dv)] product per layer per
    decode step, which grows with the context. Decode steps here absorb ``kv_b_proj`` into the
    query and the output instead (the MLA inference identity): per head, scores are
    ``(W_uk^T q_nope) . c + q_rope . k_rope`` over the cached latents c, the context is the
    probability-weighted latents, and ``W_uv`` maps it to the head's value space; nothing is
    expanded. Prefill steps call the attention module itself (expanding a prompt once is the
    cheaper order there). Everything else (norms, projections, rotary embedding, MoE and dense
    MLP blocks) is the model's own modules and functions. The plain reference is transformers'
    decoder; tests compare logits step by step.

    Shape legend: C ``kv_lora_rank``, R ``qk_rope_head_dim``, Dn ``qk_nope_head_dim``, Dv ``v_head_dim``.
    """

    def __init__(self, hf_model: Any) -> None:
        reason = unsupported_reason(hf_model)
        if reason is not None:
            raise ValueError(f"lean decoder does not support this model: {reason}")
        decoder = hf_model.get_decoder()
        self.embed_tokens, self.rotary_emb, self.norm = decoder.embed_tokens, decoder.rotary_emb, decoder.norm
        self.layers = list(decoder.layers)
        first = self.layers[0].self_attn
        self._family = sys.modules[type(first).__module__]  # the family's own rotary functions
        self._complex_rotary = hasattr(self._family, "apply_rotary_emb")  # V2: freqs_cis; V3: (cos, sin)
        self._interleave = bool(getattr(hf_model.config, "rope_interleave", False))

    def _rotate(self, q_rot: torch.Tensor, k_rot: torch.Tensor, position_embeddings: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._complex_rotary:
            return self._family.apply_rotary_emb(q_rot, k_rot, position_embeddings)
        cos, sin = position_embeddings
        if self._interleave:
            return self._family.apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
        return self._family.apply_rotary_pos_emb(q_rot, k_rot, cos, sin)

    def _decode_attention(self, attention: Any, hidden: torch.Tensor, position_embeddings: Any,
                          mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """One decode step's attention [B, 1, D] -> [B, 1, D], in latent space."""
        rows = hidden.shape[0]
        heads, nope = attention.num_heads, attention.qk_nope_head_dim
        if attention.q_lora_rank is None:
            q = attention.q_proj(hidden)
        else:
            q = attention.q_b_proj(attention.q_a_layernorm(attention.q_a_proj(hidden)))
        q = q.view(rows, 1, heads, attention.qk_head_dim).transpose(1, 2)  # [B, H, 1, Dn + R]
        q_nope, q_rot = q.split((nope, attention.qk_rope_head_dim), dim=-1)
        latent, k_rot = attention.kv_a_proj_with_mqa(hidden).split(
            (attention.kv_lora_rank, attention.qk_rope_head_dim), dim=-1
        )
        latent = attention.kv_a_layernorm(latent).view(rows, 1, 1, attention.kv_lora_rank)  # [B, 1, 1, C]
        q_rot, k_rot = self._rotate(q_rot, k_rot.view(rows, 1, 1, attention.qk_rope_head_dim), position_embeddings)
        latents, rotary_keys = cache.update(latent, k_rot, attention.layer_idx)  # [B, 1, L, C], [B, 1, L, R]
        weight = attention.kv_b_proj.weight.view(heads, nope + attention.v_head_dim, attention.kv_lora_rank)
        # Heads are batched against the weights ([H, B, .]) and folded into query rows against the
        # cache ([B, 1, H, .]), so no operand is broadcast (and copied) over the other's batch.
        absorbed = torch.bmm(q_nope[:, :, 0].transpose(0, 1), weight[:, :nope])  # [H, B, C]: W_uk^T q_nope
        query = absorbed.transpose(0, 1).unsqueeze(1)  # [B, 1, H, C]
        scores = torch.matmul(query, latents.transpose(-1, -2))  # [B, 1, H, L]
        scores = scores + torch.matmul(q_rot.transpose(1, 2), rotary_keys.transpose(-1, -2))  # [B, 1, H, L]
        scores = scores * attention.scaling + mask  # mask [B, 1, 1, L]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latents.dtype)
        context = torch.matmul(probs, latents)  # [B, 1, H, C]
        values = torch.bmm(context[:, 0].transpose(0, 1), weight[:, nope:].transpose(1, 2))  # [H, B, Dv]
        return attention.o_proj(values.transpose(0, 1).reshape(rows, 1, heads * attention.v_head_dim))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [B, S, D]
        position_embeddings = self.rotary_emb(hidden, positions)
        decode = input_ids.shape[1] == 1
        for layer in self.layers:
            normed = layer.input_layernorm(hidden)
            if decode:
                attended = self._decode_attention(layer.self_attn, normed, position_embeddings, mask, cache)
            else:
                attended, _ = layer.self_attn(hidden_states=normed, position_embeddings=position_embeddings,
                                              attention_mask=mask, past_key_values=cache)
            hidden = hidden + attended
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.norm(hidden)


_built: weakref.WeakKeyDictionary[Any, LeanDecoder | LeanMLADecoder] = weakref.WeakKeyDictionary()
"""One lean forward per model: building one fuses the q/k/v weights (a copy of them), which
every engine and every ``generate`` call on the same model then shares."""


def lean_decoder(hf_model: Any) -> LeanDecoder | LeanMLADecoder | None:
    """The lean forward for ``hf_model`` (:class:`LeanMLADecoder` for DeepSeek-V2/V3,
    :class:`LeanDecoder` for the others it reproduces), or None when there is none. Built once
    per model and shared (the forwards keep no per-call state; the KV cache is an argument)."""
    if unsupported_reason(hf_model) is not None:  # checked every time: a config can change
        return None
    built = _built.get(hf_model)
    if built is not None:
        return built
    if type(hf_model.get_decoder().layers[0]).__name__ in MLA_LAYERS:
        built = LeanMLADecoder(hf_model)
    else:
        built = LeanDecoder(hf_model)
    _built[hf_model] = built
    return built
