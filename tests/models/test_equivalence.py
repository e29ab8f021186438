"""Every supported family gives the same logits through moeserve as through transformers."""

from __future__ import annotations

import pytest
import torch

from moeserve.config import MoEConfig
from moeserve.models.block import MoEBlock
from moeserve.models.loader import load_model
from moeserve.models.random_init import SUPPORTED_TINY_FAMILIES
from moeserve.moe.backends import BACKENDS as _BACKENDS

BACKENDS = _BACKENDS.names()


def _reference(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


def _prefill_then_decode(model, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Logits of the prefill and of ``steps`` greedy decode steps with the KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    outputs = []
    with torch.inference_mode():
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits  # [B, S, V]
        outputs.append(logits)
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            outputs.append(logits)
    return outputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_family_logits_match_transformers(tiny_checkpoints, family, backend):
    folder = tiny_checkpoints[family]
    reference = _reference(folder)
    ours = load_model(folder, moe=MoEConfig(backend=backend), load_tokenizer=False)
    assert ours.family.model_type == family
    assert all(isinstance(ours.hf_model.model.layers[i].mlp, MoEBlock) for i in ours.decoder_layer_ids)
    prompt = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    expected = _prefill_then_decode(reference, prompt, steps=4)
    actual = _prefill_then_decode(ours.hf_model, prompt, steps=4)
    for step, (want, got) in enumerate(zip(expected, actual, strict=True)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")


def test_deepseek_dense_layers_stay_dense(tiny_checkpoints):
    model = load_model(tiny_checkpoints["deepseek_v3"], load_tokenizer=False)
    # first_k_dense_replace=1: decoder layer 0 is a dense MLP, layers 1 and 2 are MoE.
    assert model.decoder_layer_ids == [1, 2]
    assert [layer.layer_index for layer in model.layers] == [0, 1]
