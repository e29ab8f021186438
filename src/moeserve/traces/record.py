"""Record live routing from a loaded model into a ``moeserve-trace/1`` trace.

``RoutingRecorder`` attaches an observer to every MoE layer while it is active (a context
manager) and collects each forward's top-k ids and gate weights. It assumes one sequence per
forward (batch size 1), which is how ``trace record`` and ``generate`` run; ``end_sequence``
closes the current sequence so several texts go into one trace.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moeserve.models.loader import MoEModel
from moeserve.moe.types import RouterOutput
from moeserve.traces.format import Trace, TraceMeta, TraceWriter


class RoutingRecorder:
    """Collects routing of every MoE layer of ``model`` while inside ``with recorder:``."""

    def __init__(self, model: MoEModel, phase: str = "mixed", source: str = "moeserve") -> None:
        self.model = model
        self.writer = TraceWriter(
            TraceMeta(
                model=model.name,
                num_experts=model.num_experts,
                top_k=model.top_k,
                phase=phase,
                source=source,
                extra={"layers": model.decoder_layer_ids},
            ),
            num_layers=len(model.layers),
        )
        self._ids: list[list[torch.Tensor]] = [[] for _ in model.layers]  # per layer, per call [t, k]
        self._weights: list[list[torch.Tensor]] = [[] for _ in model.layers]

    def _observe(self, layer_index: int, routing: RouterOutput) -> None:
        self._ids[layer_index].append(routing.topk_ids.detach().to("cpu", torch.int16))
        self._weights[layer_index].append(routing.topk_weights.detach().to("cpu", torch.float32))

    def __enter__(self) -> RoutingRecorder:
        for layer in self.model.layers:
            layer.observers.append(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.model.layers:
            if self._observe in layer.observers:
                layer.observers.remove(self._observe)
        self.end_sequence()

    def end_sequence(self) -> None:
        """Close the sequence recorded since the last call (nothing happens if it is empty)."""
        if not self._ids[0]:
            return
        experts = np.stack([torch.cat(calls).numpy() for calls in self._ids], axis=1)  # [t, L, k]
        weights = np.stack([torch.cat(calls).numpy() for calls in self._weights], axis=1)  # [t, L, k]
        self.writer.add_sequence(experts, weights)
        self._ids = [[] for _ in self.model.layers]
        self._weights = [[] for _ in self.model.layers]

    def trace(self) -> Trace:
        return self.writer.build()


@torch.inference_mode()
def record_texts(model: MoEModel, texts: list[str], max_tokens_per_text: int = 1024, on_text=None) -> Trace:
    """Teacher-forced routing of each text (one sequence each, prefill phase)."""
    if model.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer; cannot record from text")
    recorder = RoutingRecorder(model, phase="prefill", source=json.dumps({"texts": len(texts)}))
    with recorder:
        for text in texts:
            ids = model.tokenizer(text)["input_ids"][:max_tokens_per_text]
            if ids:
                model.hf_model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
                recorder.end_sequence()
            if on_text is not None:
                on_text()
    return recorder.trace()


def split_text_file(path: Path, chunk_chars: int = 4000) -> list[str]:
    """A text file as chunks of about ``chunk_chars`` characters, cut at line ends."""
    text = path.read_text(encoding="utf-8", errors="replace")
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return chunks
