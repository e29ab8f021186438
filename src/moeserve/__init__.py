"""moeserve: serve Mixture-of-Experts language models cheaply.

The public entry points are :func:`load_model` (a HF-format checkpoint folder, or the embedded
reference model when no path is given) and :func:`generate`. They are imported on first use,
so ``import moeserve.traces`` and the CLI's ``--help`` stay fast and torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moeserve.errors import CheckpointError, MoeserveError, TraceError

if TYPE_CHECKING:
    from moeserve.config import MoEConfig, SamplingConfig
    from moeserve.engine.generate import GenerationResult, generate
    from moeserve.models.loader import REFERENCE_MODEL, MoEModel, load_model

__version__ = "0.1.0"

_LAZY = {
    "MoEConfig": "moeserve.config",
    "SamplingConfig": "moeserve.config",
    "load_model": "moeserve.models.loader",
    "MoEModel": "moeserve.models.loader",
    "REFERENCE_MODEL": "moeserve.models.loader",
    "generate": "moeserve.engine.generate",
    "GenerationResult": "moeserve.engine.generate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeserve' has no attribute {name!r}")


__all__ = [
    "REFERENCE_MODEL",
    "CheckpointError",
    "GenerationResult",
    "MoEConfig",
    "MoEModel",
    "MoeserveError",
    "SamplingConfig",
    "TraceError",
    "__version__",
    "generate",
    "load_model",
]
