"""Fixtures shared by the expert-cache tests: one prompt, its all-resident logits, a model to offload."""

from __future__ import annotations

import pytest
import torch

from moeserve.models.loader import MoEModel, load_model
from tests.memory.test_cache import PROMPT, greedy_logits


@pytest.fixture(scope="module")
def prompt_ids(reference_model) -> list[int]:
    return reference_model.tokenizer(PROMPT)["input_ids"]


@pytest.fixture(scope="module")
def expected_logits(reference_model, prompt_ids) -> list[torch.Tensor]:
    """Every forward's logits of a greedy generation with all experts resident (the exact reference)."""
    return greedy_logits(reference_model, prompt_ids)


@pytest.fixture(scope="module")
def model() -> MoEModel:
    """A second copy of the reference model that the tests put caches on (and take them off)."""
    return load_model(load_tokenizer=False)
