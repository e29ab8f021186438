"""The deferred expert-load counter against a direct count of the same routing."""

from __future__ import annotations

import torch

from moeserve.moe.types import RouterOutput
from moeserve.server.metrics import ExpertLoadCounter


def test_counts_equal_a_direct_bincount_across_folds(reference_model):
    counter = ExpertLoadCounter(reference_model)
    try:
        generator = torch.Generator().manual_seed(0)
        num_experts = reference_model.layers[0].experts.num_experts
        expected = torch.zeros(len(reference_model.layers), num_experts, dtype=torch.long)
        steps = ExpertLoadCounter.FOLD_EVERY + 37  # one automatic fold, then a remainder folded on read
        for step in range(steps):
            for layer in range(len(reference_model.layers)):
                ids = torch.randint(0, num_experts, (1 + step % 5, 2), generator=generator)
                counter.observe(layer, RouterOutput(topk_ids=ids, topk_weights=torch.ones(ids.shape)))
                expected[layer] += torch.bincount(ids.reshape(-1), minlength=num_experts)
            if step == steps // 2:  # a read mid-run folds what is pending
                assert counter.snapshot() == expected.tolist()
        assert counter.snapshot() == expected.tolist()
    finally:
        counter.detach()
    assert all(counter.observe not in layer.observers for layer in reference_model.layers)
