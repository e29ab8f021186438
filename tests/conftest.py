"""Shared fixtures: tiny random checkpoints per family, the shared/ data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (traces, corpora); tests needing it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it exists in the project's CI, not in a user's clone)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-initialised checkpoint folder per supported family."""
    from moeserve.models.random_init import SUPPORTED_TINY_FAMILIES, save_random_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {family: save_random_checkpoint(family, root / family) for family in SUPPORTED_TINY_FAMILIES}


@pytest.fixture(scope="session")
def reference_model():
    """The embedded reference model, loaded once through moeserve (fp32, dropless, auto backend)."""
    from moeserve.models.loader import load_model

    return load_model()
