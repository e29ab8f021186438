"""Held-out quality and routing facts of a model, on text it was not trained on.

Used by ``train-tiny`` to write the reference model's README, and by the memory-tier work
to measure what lossy modes cost (the same function, run on a model with a different MoE
configuration, gives comparable figures).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch

from moeserve.models.loader import MoEModel
from moeserve.traces.record import RoutingRecorder
from moeserve.traces.stats import TraceStats, trace_stats


@dataclass(frozen=True)
class QualityReport:
    tokens: int
    """Next-token predictions scored."""
    perplexity: float
    accuracy: float
    """Share of positions where the argmax prediction is the actual next token."""

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def evaluate_tokens(model: MoEModel, token_ids: torch.Tensor, seq_len: int = 256, max_tokens: int = 65_536,
                    record_routing: bool = False) -> tuple[QualityReport, TraceStats | None]:
    """Score next-token prediction over consecutive windows of ``token_ids`` [N].

    Each window of ``seq_len`` tokens is one forward pass (batch 1, no cache); routing of every
    window is recorded as one sequence when ``record_routing``.
    """
    total_nll = 0.0
    correct = 0
    scored = 0
    recorder = RoutingRecorder(model, phase="prefill", source="held-out evaluation") if record_routing else None
    usable = min(int(token_ids.numel()), max_tokens + 1)
    with recorder if recorder is not None else contextlib.nullcontext():
        for start in range(0, usable - 1, seq_len):
            window = token_ids[start : min(start + seq_len + 1, usable)].long()
            if window.numel() < 2:
                break
            inputs, targets = window[:-1], window[1:]
            logits = model.hf_model(input_ids=inputs[None].to(model.device), use_cache=False).logits[0].float().cpu()  # [S, V]
            total_nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            scored += targets.numel()
            if recorder is not None:
                recorder.end_sequence()
    report = QualityReport(tokens=scored, perplexity=math.exp(total_nll / max(1, scored)), accuracy=correct / max(1, scored))
    stats = trace_stats(recorder.trace()) if recorder is not None else None
    return report, stats
