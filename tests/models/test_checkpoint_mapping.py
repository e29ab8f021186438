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
