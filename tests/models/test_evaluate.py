"""Held-out scoring: perplexity and accuracy equal a direct computation on the same windows."""

from __future__ import annotations

import math

import torch

from moeserve.models.evaluate import evaluate_tokens


def test_scores_match_a_direct_computation(reference_model):
    text = "import os\n\n\ndef join(a, b):\n    return os.path.join(a, b)\n" * 6
    ids = torch.tensor(reference_model.tokenizer(text)["input_ids"])
    report, stats = evaluate_tokens(reference_model, ids, seq_len=32, max_tokens=80, record_routing=True)
    assert report.tokens == 80
    nll, correct = 0.0, 0
    for start in range(0, 80, 32):
        window = ids[start : min(start + 33, 81)]
        logits = reference_model.logits(window[None, :-1])[0]
        nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
        correct += int((logits.argmax(-1) == window[1:]).sum())
    assert math.isclose(report.perplexity, math.exp(nll / 80), rel_tol=1e-6)
    assert report.accuracy == correct / 80
    assert stats is not None and stats.num_sequences == 3 and stats.num_tokens == 80
