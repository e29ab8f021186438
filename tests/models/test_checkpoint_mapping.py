"""The loaded model keeps no view into the checkpoint's memory mapping (so the file can leave memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from moeserve.models.loader import load_model, own_checkpoint_weights
from moeserve.models.random_init import SUPPORTED_TINY_FAMILIES

MAPS = Path("/proc/self/maps")


def _mapped_files() -> set[str]:
    return {line.split()[-1] for line in MAPS.read_text().splitlines() if line.rstrip().endswith(".safetensors")}


@pytest.mark.skipif(not MAPS.exists(), reason="needs Linux /proc/self/maps to see the process's file mappings")
@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_loaded_model_releases_the_checkpoint_mapping(tiny_checkpoints, family):
    import gc

    folder = tiny_checkpoints[family]
    model = load_model(folder, load_tokenizer=False)
    gc.collect()
    mapped = {name for name in _mapped_files() if Path(name).parent == folder.resolve()}
    assert mapped == set(), f"{family}: still mapped after load_model: {mapped}"
    with torch.inference_mode():  # the copies are the weights the model computes with
        logits = model.hf_model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_own_checkpoint_weights_keeps_ties_and_shared_buffers():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight  # tied
    shared = torch.arange(4.0)
    first.register_buffer("table", shared)
    second.register_buffer("table", shared)
    model = nn.Sequential(first, second)
    before = first.weight.detach().clone()
    old_pointer = first.weight.data_ptr()
    copied = own_checkpoint_weights(model, [])
    assert copied == (16 + 4 + 4 + 4) * 4  # tied weight once, two biases, the shared buffer once
    assert second.weight is first.weight and first.weight.data_ptr() != old_pointer
    assert torch.equal(first.weight, before)
    assert first.table is second.table and first.table.data_ptr() != shared.data_ptr()
    assert torch.equal(first.table, shared)


@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_loading_without_experts_reads_the_same_model(tiny_checkpoints, family):
    from moeserve.memory.offload import apply_expert_cache
    from moeserve.moe.types import UnloadedExperts

    folder = tiny_checkpoints[family]
    full = load_model(folder, load_tokenizer=False)
    lazy = load_model(folder, load_tokenizer=False, load_experts=False)
    assert all(isinstance(layer.experts, UnloadedExperts) for layer in lazy.layers)
    full_state, lazy_state = full.hf_model.state_dict(), lazy.hf_model.state_dict()
    assert full_state.keys() == lazy_state.keys()
    for name, tensor in full_state.items():
        if ".mlp.experts." in name and any(name.startswith(f"model.layers.{i}.") for i in lazy.decoder_layer_ids):
            assert lazy_state[name].numel() == 0, name  # the routed experts were not read
        else:
            assert torch.equal(lazy_state[name], tensor), name
    prompt = torch.randint(0, full.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="loaded without its experts"), torch.inference_mode():
        lazy.hf_model(input_ids=prompt)
    for model in (full, lazy):  # both serve their experts from a cache of the checkpoint
        apply_expert_cache(model, "100%", "lru")
    with torch.inference_mode():
        assert torch.equal(lazy.hf_model(input_ids=prompt).logits, full.hf_model(input_ids=prompt).logits)
