"""Where a serverless function's expert weights come from: a checkpoint, or random weights of a
planned shape (``serverless export`` also wraps arrays already in memory). A source gives one
function's experts at a time in the handler's layout
(:class:`~moeserve.serverless.handler_template.ExpertWeights`), so the emulator and ``serverless
export`` read a checkpoint one function's experts at a time, whatever its size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from moeserve.serverless import handler_template
from moeserve.serverless.shapes import ExpertShape


class ExpertWeightsSource(Protocol):
    """Where a function's expert weights come from (a checkpoint, or random of the planned shape)."""

    description: str

    def function_weights(self, layer: int, experts: Sequence[int]) -> handler_template.ExpertWeights: ...


class CheckpointWeights:
    """Experts read one at a time from a checkpoint's safetensors files (``memory.store.ExpertStore``), as float32."""

    def __init__(self, folder: str | Path) -> None:
        from moeserve.memory.store import ExpertStore

        self.store = ExpertStore(folder)
        self.description = f"real weights from {folder}"

    @property
    def num_layers(self) -> int:
        return len(self.store.layers)

    def function_weights(self, layer: int, experts: Sequence[int]) -> handler_template.ExpertWeights:
        import torch

        decoder_layer = self.store.layers[layer]
        tensors = [self.store.read_expert(decoder_layer, e, torch.float32) for e in experts]
        intermediate = tensors[0].down.shape[1]
        return handler_template.ExpertWeights.from_projections(
            experts=np.array(experts, dtype=np.int64),
            gate=np.stack([t.gate_up[:intermediate].numpy() for t in tensors]),
            up=np.stack([t.gate_up[intermediate:].numpy() for t in tensors]),
            down=np.stack([t.down.numpy() for t in tensors]),
        )


class RandomWeights:
    """Random float32 experts of ``shape`` (scaled 1/sqrt(fan-in)), the same for a (seed, layer, expert) wherever drawn."""

    def __init__(self, shape: ExpertShape, seed: int = 0) -> None:
        self.shape = shape
        self.seed = seed
        self.description = f"random weights of the planned {shape.name} shapes (no checkpoint given)"

    def function_weights(self, layer: int, experts: Sequence[int]) -> handler_template.ExpertWeights:
        d, i = self.shape.hidden_size, self.shape.intermediate_size
        gate, up, down = [], [], []
        for expert in experts:
            rng = np.random.default_rng([self.seed, layer, expert])
            gate.append(rng.standard_normal((i, d), dtype=np.float32) / np.float32(math.sqrt(d)))
            up.append(rng.standard_normal((i, d), dtype=np.float32) / np.float32(math.sqrt(d)))
            down.append(rng.standard_normal((d, i), dtype=np.float32) / np.float32(math.sqrt(i)))
        return handler_template.ExpertWeights.from_projections(
            np.array(experts, dtype=np.int64), np.stack(gate), np.stack(up), np.stack(down)
        )
