"""Single-request generation with a KV cache: prefill once, then one token per step.

This is the path behind ``moeserve generate`` and the library's :func:`generate`. It streams
text through a callback as tokens arrive and reports time to first token and throughput.

Two forwards compute each step. By default (``lean=True``) a family with a lean forward
(``moeserve.engine.lean``: Mixtral, Qwen2/3-MoE, OLMoE, dots.llm1, GLM-4.5, and DeepSeek-V2/V3 and GLM-4.7-Flash with latent-space
attention) runs it through the serving engine's :class:`~moeserve.engine.runner.ModelRunner`
with one KV slot, as the server would run a lone request. ``lean=False``, and every other
family, runs transformers' own forward with its ``DynamicCache``: the plain reference the
engine's tests compare with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moeserve.config import SamplingConfig
from moeserve.engine.request import Request, SamplingParams
from moeserve.engine.scheduler import Batch
from moeserve.errors import MoeserveError
from moeserve.models.loader import MoEModel


@dataclass
class GenerationResult:
    """What one generation produced and how fast."""

    prompt: str
    text: str
    """Generated text only (the prompt is not repeated)."""
    prompt_tokens: int
    new_tokens: int
    token_ids: list[int]
    seconds: float
    """Wall time from the start of prefill to the last token."""
    time_to_first_token_s: float
    tokens_per_s: float
    """new_tokens / seconds (prefill included)."""
    decode_tokens_per_s: float
    """Tokens after the first, per second of decoding."""
    finish_reason: str
    """``length`` (max_new_tokens reached) or ``stop`` (end-of-sequence token)."""
    decoder: str = "transformers"
    """Which forward ran: ``lean`` (moeserve's, through the engine's runner) or ``transformers``."""

    def to_dict(self) -> dict:
        return asdict(self)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Next token id from logits [V]: argmax at temperature 0, else temperature + top-p sampling."""
    if temperature == 0:
        return int(torch.argmax(logits))
    # On the CPU: the generator is a CPU one (the same draws whatever device computed the logits).
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        # Keep tokens until the mass before them reaches top_p (the first token always stays).
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter_(0, sorted_ids[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStreamer:
    """Turns a growing list of token ids into newly printable text (whole UTF-8 characters only)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.emitted = ""

    def push(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is still incomplete
        new = text[len(self.emitted) :]
        self.emitted = text
        return new

    def finish(self, token_ids: list[int]) -> str:
        """Whatever is still held back once generation has stopped (even an incomplete character)."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        new = text[len(self.emitted) :]
        self.emitted = text
        return new


def prompt_token_ids(model: MoEModel, prompt: str, sampling: SamplingConfig) -> list[int]:
    """The prompt's token ids, checked against the context; an empty prompt starts from BOS.

    Raises MoeserveError when the model has no tokenizer or prompt + max_new_tokens does not fit.
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise MoeserveError(f"{model.path} has no tokenizer files (tokenizer.json); cannot generate from text")
    prompt_ids = tokenizer(prompt)["input_ids"]
    if not prompt_ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise MoeserveError("the prompt is empty and the tokenizer has no BOS or EOS token to start from")
        prompt_ids = [start]
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and len(prompt_ids) + sampling.max_new_tokens > max_positions:
        raise MoeserveError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds "
            f"the model's context of {max_positions} tokens"
        )
    return prompt_ids


class _Forward:
    """One request's next-token logits, step by step: ``prompt_ids`` first, then one token each."""

    def __init__(self, model: MoEModel, context: int, lean: bool) -> None:
        from moeserve.engine.lean import lean_decoder
        from moeserve.engine.runner import ModelRunner

        self.model = model
        # Without a lean forward for this family: transformers' forward and cache.
        use_runner = lean and lean_decoder(model.hf_model) is not None
        self.runner = ModelRunner(model, num_slots=1, context=context, lean=True) if use_runner else None
        self.decoder = "lean" if self.runner is not None else "transformers"
        self._request: Request | None = None
        self._cache: Any = None  # transformers DynamicCache, made on the first reference step

    def __call__(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [V] after ``token_ids`` (the prompt on the first call, then the last new token)."""
        if self.runner is not None:
            if self._request is None:
                self._request = Request("generate", list(token_ids), SamplingParams(max_tokens=1))
                return self.runner.logits(Batch("prefill", [self._request], 0))[0]
            self._request.output_ids.extend(token_ids)
            return self.runner.logits(Batch("decode", [self._request], 0))[0]
        if self._cache is None:
            from transformers import DynamicCache

            self._cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([token_ids], device=self.model.device)  # [1, S]
        return self.model.hf_model(input_ids=input_ids, past_key_values=self._cache, use_cache=True).logits[0, -1]


@torch.inference_mode()
def warm_up(model: MoEModel, lean: bool = True) -> None:
    """Run one short prefill and decode step so one-time start-up costs stay out of timings."""
    forward = _Forward(model, context=4, lean=lean)
    forward([0, 1, 2])
    forward([3])


@torch.inference_mode()
def generate(
    model: MoEModel,
    prompt: str,
    sampling: SamplingConfig | None = None,
    on_text: Callable[[str], None] | None = None,
    lean: bool = True,
) -> GenerationResult:
    """Generate a continuation of ``prompt``; ``on_text`` receives text pieces as they decode.

    ``lean``: use the family's lean forward where it has one (the module docstring says which);
    False runs transformers' forward, the reference.
    """
    sampling = sampling or SamplingConfig()
    prompt_ids = prompt_token_ids(model, prompt, sampling)
    tokenizer = model.tokenizer
    assert tokenizer is not None  # prompt_token_ids raised otherwise
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(sampling.seed if sampling.seed is not None else int(time.time_ns() % 2**31))
    eos = tokenizer.eos_token_id
    streamer = TextStreamer(tokenizer)
    forward = _Forward(model, context=len(prompt_ids) + sampling.max_new_tokens, lean=lean)
    step_ids = prompt_ids
    new_ids: list[int] = []
    finish_reason = "length"
    start = time.perf_counter()
    first_token_at = start
    while len(new_ids) < sampling.max_new_tokens:
        logits = forward(step_ids)  # [V]
        token = sample_next(logits, sampling.temperature, sampling.top_p, generator)
        if not new_ids:
            first_token_at = time.perf_counter()
        if sampling.stop_at_eos and token == eos:
            finish_reason = "stop"
            break
        new_ids.append(token)
        if on_text is not None:
            piece = streamer.push(new_ids)
            if piece:
                on_text(piece)
        step_ids = [token]
    seconds = time.perf_counter() - start
    if on_text is not None:
        rest = streamer.finish(new_ids)
        if rest:
            on_text(rest)
    decode_seconds = seconds - (first_token_at - start)
    return GenerationResult(
        prompt=prompt,
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        prompt_tokens=len(prompt_ids),
        new_tokens=len(new_ids),
        token_ids=new_ids,
        seconds=seconds,
        time_to_first_token_s=first_token_at - start,
        tokens_per_s=len(new_ids) / seconds if seconds > 0 else 0.0,
        decode_tokens_per_s=(len(new_ids) - 1) / decode_seconds if len(new_ids) > 1 and decode_seconds > 0 else 0.0,
        finish_reason=finish_reason,
        decoder=forward.decoder,
    )
