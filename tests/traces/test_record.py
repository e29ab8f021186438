"""Live routing recorded from the reference model is a valid moeserve-trace/1 of the real routing."""

from __future__ import annotations

import numpy as np
import torch

from moeserve.traces.format import load_trace, save_trace
from moeserve.traces.record import RoutingRecorder, record_texts


def test_record_texts_matches_router_and_round_trips(reference_model, tmp_path):
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n\n\nprint(A())\n"]
    trace = record_texts(reference_model, texts)
    lengths = [len(reference_model.tokenizer(t)["input_ids"]) for t in texts]
    assert trace.offsets.tolist() == [0, lengths[0], sum(lengths)]
    assert trace.experts.shape == (sum(lengths), len(reference_model.layers), reference_model.top_k)
    assert trace.meta.num_experts == reference_model.num_experts
    assert trace.weights is not None
    # Mixtral renormalises its top-2 weights: each token's weights sum to 1.
    np.testing.assert_allclose(trace.weights.sum(-1), 1.0, rtol=1e-5)
    # The first layer's routing equals the router applied to that layer's input.
    ids = torch.tensor([reference_model.tokenizer(texts[0])["input_ids"]])
    hf = reference_model.hf_model
    with torch.inference_mode():
        hidden = hf.model.embed_tokens(ids)
        captured: dict[str, torch.Tensor] = {}

        def keep_ids(module, inputs, output) -> None:
            captured["ids"] = output[2]

        handle = hf.model.layers[0].mlp.gate.register_forward_hook(keep_ids)
        try:
            hf(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
    assert hidden.shape[1] == lengths[0]
    assert np.array_equal(np.sort(trace.experts[: lengths[0], 0], -1), np.sort(captured["ids"].numpy(), -1))
    path = save_trace(trace, tmp_path / "t.npz")
    again = load_trace(path)
    assert np.array_equal(again.experts, trace.experts)


def test_recorder_detaches_when_done(reference_model):
    with RoutingRecorder(reference_model) as recorder:
        reference_model.logits(torch.tensor([[1, 2, 3]]))
    assert all(not layer.observers for layer in reference_model.layers)
    assert recorder.trace().num_tokens == 3
