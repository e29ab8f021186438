"""Generation through moeserve matches transformers' own greedy generate, and sampling is sound."""

from __future__ import annotations

import pytest
import torch

from moeserve.config import SamplingConfig
from moeserve.engine.generate import TextStreamer, generate, sample_next
from moeserve.errors import MoeserveError

PROMPT = "import os\n\ndef read_config(path):\n"


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "transformers"])
def test_greedy_matches_transformers_generate(reference_model, lean):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(reference_model.path, local_files_only=True, dtype=torch.float32)
    prompt_ids = reference_model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = plain.generate(prompt_ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    result = generate(reference_model, PROMPT, SamplingConfig(max_new_tokens=24, stop_at_eos=False), lean=lean)
    assert result.decoder == ("lean" if lean else "transformers")
    assert result.token_ids == expected[0, prompt_ids.shape[1] :].tolist()
    assert result.new_tokens == 24 and result.finish_reason == "length"
    assert result.text == reference_model.tokenizer.decode(result.token_ids)
    assert result.tokens_per_s > 0 and 0 < result.time_to_first_token_s <= result.seconds


def test_streamed_pieces_add_up_to_the_text(reference_model):
    pieces: list[str] = []
    result = generate(reference_model, PROMPT, SamplingConfig(max_new_tokens=20, stop_at_eos=False), on_text=pieces.append)
    assert "".join(pieces) == result.text


def test_sampling_is_reproducible_with_a_seed(reference_model):
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7, stop_at_eos=False)
    first = generate(reference_model, PROMPT, sampling)
    second = generate(reference_model, PROMPT, sampling)
    assert first.token_ids == second.token_ids
    # The same draws through either forward (the logits agree to float rounding).
    assert generate(reference_model, PROMPT, sampling, lean=False).token_ids == first.token_ids


def test_a_family_without_a_lean_forward_generates_through_transformers(tiny_checkpoints):
    """Qwen3-Next (linear-attention layers, which the engine does not run): generate's step
    function falls back to transformers' forward and cache, and decodes as a full forward does."""
    from moeserve.engine.generate import _Forward
    from moeserve.models.loader import load_model

    model = load_model(tiny_checkpoints["qwen3_next"], load_tokenizer=False)
    forward = _Forward(model, context=16, lean=True)
    assert forward.decoder == "transformers"
    ids = [3, 1, 4, 1, 5, 9]
    with torch.inference_mode():
        logits = forward(ids)
        for _ in range(4):
            ids.append(int(logits.argmax()))
            logits = forward(ids[-1:])
            torch.testing.assert_close(logits, model.logits(torch.tensor([ids]))[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v2", "glm4_moe_lite"])
def test_lean_single_request_forward_matches_transformers(tiny_checkpoints, family):
    """generate's step function (prompt, then one token at a time, one KV slot) through the lean
    forward against transformers' forward with its own cache, logits at every step; DeepSeek-V2
    decodes in latent space."""
    from moeserve.engine.generate import _Forward
    from moeserve.models.loader import load_model

    model = load_model(tiny_checkpoints[family], load_tokenizer=False)
    lean, reference = _Forward(model, context=16, lean=True), _Forward(model, context=16, lean=False)
    assert (lean.decoder, reference.decoder) == ("lean", "transformers")
    step = [3, 1, 4, 1, 5, 9]
    with torch.inference_mode():
        for _ in range(8):
            expected = reference(step)
            torch.testing.assert_close(lean(step), expected, rtol=1e-5, atol=1e-5)
            step = [int(expected.argmax())]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, 1.0, 0.7, generator) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reach 0.7; tokens 2 and 3 are never drawn
    assert sample_next(logits, 0.0, 1.0, None) == 0


def test_context_overflow_is_a_clear_error(reference_model):
    limit = reference_model.config.max_position_embeddings
    with pytest.raises(MoeserveError, match=f"exceeds the model's context of {limit} tokens"):
        generate(reference_model, PROMPT, SamplingConfig(max_new_tokens=limit))


def test_streamer_holds_back_partial_characters(reference_model):
    tokenizer = reference_model.tokenizer
    ids = tokenizer("é€ ok")["input_ids"]
    streamer = TextStreamer(tokenizer)
    text = "".join(streamer.push(ids[: i + 1]) for i in range(len(ids)))
    assert text == "é€ ok"
    assert "\ufffd" not in text
