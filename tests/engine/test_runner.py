"""The batched model runner against the plain reference (one request, transformers' own cache)."""

from __future__ import annotations

import pytest
import torch

from moeserve.config import SamplingConfig
from moeserve.engine.engine import EngineConfig, build_engine
from moeserve.engine.generate import generate
from moeserve.engine.request import SamplingParams
from moeserve.engine.scheduler import Batch, SchedulerConfig
from moeserve.models.random_init import SUPPORTED_TINY_FAMILIES

PROMPTS = [
    "def main():",
    "import os\nimport sys\n\nclass Handler(object):\n    def __init__(self",
    "x = [",
    "for i in range(10):\n    print(i)\n# a longer comment that makes this prompt the longest of all of them",
    "return",
]


@pytest.fixture(scope="module")
def model():
    from moeserve.models.loader import load_model

    return load_model()


def run(engine, prompts, sampling) -> list[list[int]]:
    ids = [engine.add_request(engine.tokenizer(p)["input_ids"], sampling).request_id for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id] += output.token_ids
    return [tokens[i] for i in ids]


def test_batched_greedy_equals_one_request_at_a_time(model):
    reference = [generate(model, p, SamplingConfig(max_new_tokens=12, stop_at_eos=False), lean=False).token_ids
                 for p in PROMPTS]
    # 3 slots for 5 requests: admission mid-run, different lengths in one step, slot moves on finish.
    # min_prefill_fill 0: prompts of different lengths share padded prefill steps.
    engine = build_engine(model, EngineConfig(SchedulerConfig(max_running=3, min_prefill_fill=0.0), max_context=128))
    assert run(engine, PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True)) == reference
    assert engine.num_running == 0


def test_seeded_sampling_matches_the_reference_sampler(model):
    reference = generate(model, PROMPTS[1], SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3,
                                                            stop_at_eos=False), lean=False).token_ids
    engine = build_engine(model, EngineConfig(SchedulerConfig(max_running=4), max_context=128))
    sampled = run(engine, [PROMPTS[1], PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3,
                                                                  ignore_eos=True))
    assert sampled[0] == reference


@torch.inference_mode()
def test_decode_logits_match_a_full_forward(model):
    # min_prefill_fill 0: both prompts (of different lengths) prefill in one padded step.
    engine = build_engine(model, EngineConfig(SchedulerConfig(max_running=2, min_prefill_fill=0.0), max_context=64))
    prompts = [engine.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    for ids in prompts:
        engine.add_request(ids, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()  # prefill both
    batch = engine.scheduler.schedule()
    assert isinstance(batch, Batch) and batch.kind == "decode"
    captured = {}
    original = engine.runner.lm_head

    def capture(hidden):
        captured["logits"] = original(hidden)
        return captured["logits"]

    engine.runner.lm_head = capture
    try:
        engine.runner.execute(batch)
    finally:
        engine.runner.lm_head = original
    for row, request in enumerate(batch.requests):
        full = model.logits(torch.tensor([request.prompt_ids + request.output_ids]))[0, -1]
        torch.testing.assert_close(captured["logits"][row], full, rtol=1e-4, atol=1e-4)


class _IdsTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


ENGINE_FAMILIES = [f for f in SUPPORTED_TINY_FAMILIES if f != "qwen3_next"]
"""Every family but Qwen3-Next, whose linear-attention layers the engine refuses (tested below)."""


def test_the_engine_refuses_linear_attention_layers_clearly(tiny_checkpoints):
    from moeserve.engine.runner import ModelRunner
    from moeserve.errors import MoeserveError
    from moeserve.models.loader import load_model

    model = load_model(tiny_checkpoints["qwen3_next"], load_tokenizer=False)
    with pytest.raises(MoeserveError, match="cannot run this model: it has linear_attention layers.*moeserve generate"):
        ModelRunner(model, 2, 64)


def _engine_matches_one_request_at_a_time(model, runner, prompts: list[list[int]], tokens: int = 6) -> None:
    """Greedy tokens of ``prompts`` through an engine over ``runner`` (2 slots: admission mid-run,
    padded prefills) equal transformers' forward with its own cache, one request at a time."""
    from transformers import DynamicCache

    from moeserve.engine.engine import Engine

    reference = []
    with torch.inference_mode():
        for prompt in prompts:
            cache, ids, generated = DynamicCache(config=model.config), torch.tensor([prompt]), []
            for _ in range(tokens):
                generated.append(int(model.hf_model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax()))
                ids = torch.tensor([generated[-1:]])
            reference.append(generated)
    engine = Engine(runner, _IdsTokenizer(), EngineConfig(SchedulerConfig(max_running=2, min_prefill_fill=0.0), max_context=64), None)
    ids = [engine.add_request(p, SamplingParams(max_tokens=tokens)).request_id for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for output in engine.step():
            got[output.request_id] += output.token_ids
    assert [got[i] for i in ids] == reference


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_every_family_batches_like_one_request_at_a_time(tiny_checkpoints, family):
    from moeserve.engine.runner import ModelRunner
    from moeserve.models.loader import load_model

    model = load_model(tiny_checkpoints[family], load_tokenizer=False)
    _engine_matches_one_request_at_a_time(model, ModelRunner(model, 2, 64), [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])


@pytest.mark.parametrize("family", ["mixtral", "exaone_moe"])
def test_sliding_window_models_batch_like_one_request_at_a_time(tmp_path, family):
    """A window of 3 positions, prompts and generations longer than it: every layer slides
    (Mixtral's ``sliding_window``) or some do (EXAONE-MoE's ``layer_types``); the reference is
    transformers' forward with its own (sliding-window) cache, one request at a time."""
    from moeserve.engine.runner import ModelRunner
    from moeserve.models.loader import load_model
    from moeserve.models.random_init import save_random_checkpoint

    overrides = {"sliding_window": 3}
    if family == "exaone_moe":
        overrides["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    model = load_model(save_random_checkpoint(family, tmp_path / family, **overrides), load_tokenizer=False)
    runner = ModelRunner(model, 2, 64)
    assert runner.window == 3 and runner.lean is None
    _engine_matches_one_request_at_a_time(model, runner, [[1, 2, 3, 4, 5, 6, 7], [7, 8], [9, 10, 11, 12, 13]])


def _logits_per_step(model, lean: bool, prompts: list[list[int]], tokens: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    from moeserve.engine.engine import Engine
    from moeserve.engine.runner import ModelRunner

    runner = ModelRunner(model, 2, 64, lean=lean)
    assert (runner.lean is not None) == lean
    steps: list[torch.Tensor] = []
    head = runner.lm_head
    runner.lm_head = lambda hidden: steps.append(head(hidden)) or steps[-1]
    engine = Engine(runner, _IdsTokenizer(), EngineConfig(SchedulerConfig(max_running=2, min_prefill_fill=0.0), max_context=64), None)
    ids = [engine.add_request(p, SamplingParams(max_tokens=tokens)).request_id for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for output in engine.step():
            got[output.request_id] += output.token_ids
    return steps, [got[i] for i in ids]


def _randomise_qk_norms(model) -> None:
    """Query/key norm weights are ones at initialisation; make each differ, so a swapped or
    misapplied weight shows."""
    generator = torch.Generator().manual_seed(7)
    for layer in model.hf_model.get_decoder().layers:
        for name in ("q_norm", "k_norm"):
            norm = getattr(layer.self_attn, name, None)
            if norm is not None:
                with torch.no_grad():
                    norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "olmoe-clip", "deepseek_v2", "deepseek_v3",
                                    "glm4_moe_lite", "dots1", "glm4_moe", "glm4_moe-plain"])
def test_lean_decoder_matches_transformers_decoder(tiny_checkpoints, family, tmp_path):
    """The lean forward (fused q/k/v, one-op RMSNorm, folded decode attention; Qwen3-MoE's
    per-head and OLMoE's whole-projection query/key norms, OLMoE's q/k/v clipping, GLM-4.5's
    partial rotary embedding with and without query/key norms, dense first layers) against
    transformers' decoder on the same batches: prefill of different lengths, admission mid-run,
    decode steps over rows at different positions."""
    from moeserve.models.loader import load_model
    from moeserve.models.random_init import save_random_checkpoint

    if family == "olmoe-clip":
        folder = save_random_checkpoint("olmoe", tmp_path / "olmoe-clip", clip_qkv=0.3)
    elif family == "glm4_moe-plain":  # GLM-4.5 as released: q/k/v biases, no query/key norms
        folder = save_random_checkpoint("glm4_moe", tmp_path / family, use_qk_norm=False, attention_bias=True)
    else:
        folder = tiny_checkpoints[family]
    model = load_model(folder, load_tokenizer=False)
    _randomise_qk_norms(model)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    reference_logits, reference_tokens = _logits_per_step(model, False, prompts, 6)
    lean_logits, lean_tokens = _logits_per_step(model, True, prompts, 6)
    assert lean_tokens == reference_tokens
    assert len(lean_logits) == len(reference_logits)
    for lean, reference in zip(lean_logits, reference_logits, strict=True):
        torch.testing.assert_close(lean, reference, rtol=1e-5, atol=1e-5)


def test_models_the_lean_forward_does_not_reproduce_use_transformers_decoder(tiny_checkpoints):
    from moeserve.engine.lean import LeanDecoder, lean_decoder, unsupported_reason
    from moeserve.models.loader import load_model

    model = load_model(tiny_checkpoints["mixtral"], load_tokenizer=False)
    model.hf_model.config.sliding_window = 4  # sliding-window attention: not reproduced
    assert lean_decoder(model.hf_model) is None
    assert "sliding-window" in unsupported_reason(model.hf_model)
    deepseek = load_model(tiny_checkpoints["deepseek_v3"], load_tokenizer=False)
    with pytest.raises(ValueError, match="multi-head latent attention"):
        LeanDecoder(deepseek.hf_model)  # lean_decoder gives it LeanMLADecoder


def test_reference_model_serves_through_the_lean_decoder(model):
    from moeserve.engine.runner import ModelRunner

    assert ModelRunner(model, 1, 16).lean is not None


def test_warm_up_leaves_nothing_behind(model):
    """After the start-up warm-up (largest prefills and a full-context decode on dummy tokens)
    the engine is empty and generates exactly what a fresh engine does."""
    config = EngineConfig(SchedulerConfig(max_running=3, max_prefill_tokens=96), max_context=128)
    fresh = run(build_engine(model, config), PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    warmed = build_engine(model, config)
    warmed.warm_up()
    assert not warmed.has_work() and warmed.num_running == 0
    assert run(warmed, PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True)) == fresh
