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


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_dense_layers_stay_dense(tiny_checkpoints, family):
    model = load_model(tiny_checkpoints[family], load_tokenizer=False)
    # first_k_dense_replace=1: decoder layer 0 is a dense MLP, layers 1 and 2 are MoE.
    assert model.decoder_layer_ids == [1, 2]
    assert [layer.layer_index for layer in model.layers] == [0, 1]


# -- on a GPU (marked ``gpu``: skipped without CUDA) ---------------------------------------------

CUDA_BACKENDS = [name for name in BACKENDS if name not in ("hybrid", "cpu")] + ["auto"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_family_logits_match_transformers_on_cuda(tiny_checkpoints, family, backend):
    """fp32 on the GPU: moeserve's layer against transformers' own forward, prefill and 4 decode
    steps (``auto`` is grouped_mm where this build runs it in fp32 on the GPU, else the loop)."""
    from moeserve.moe.backends import grouped_mm_supported

    device = torch.device("cuda")
    if backend == "grouped_mm" and not grouped_mm_supported(device, torch.float32):
        pytest.skip("this torch build's _grouped_mm does not take float32 on this GPU")
    folder = tiny_checkpoints[family]
    reference = _reference(folder).to(device)
    ours = load_model(folder, moe=MoEConfig(backend=backend), load_tokenizer=False, device=device)
    assert ours.device.type == "cuda"
    prompt = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    expected = _prefill_then_decode(reference, prompt, steps=4)
    actual = _prefill_then_decode(ours.hf_model, prompt, steps=4)
    for step, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_family_logits_match_transformers_on_cuda_bfloat16(tiny_checkpoints, family):
    """bf16 on the GPU (the auto backend: grouped_mm where supported): the same logits as
    transformers' bf16 forward within bf16 rounding (norm-wise relative error), prefill and decode."""
    device = torch.device("cuda")
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoints[family]
    reference = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.bfloat16).eval().to(device)
    ours = load_model(folder, load_tokenizer=False, device=device, dtype=torch.bfloat16)
    prompt = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    expected = _prefill_then_decode(reference, prompt, steps=4)
    actual = _prefill_then_decode(ours.hf_model, prompt, steps=4)
    for step, (want, got) in enumerate(zip(expected, actual, strict=True)):
        error = float((got.float() - want.float()).norm() / want.float().norm())
        assert error < 3e-2, f"step {step}: relative error {error:.3g}"
