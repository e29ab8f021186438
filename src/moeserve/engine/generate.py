"""Single-request generation with a KV cache: prefill once, then one token per step.

The continuous-batching engine for the server is separate; this is the path behind
``moeserve generate`` and the library's :func:`generate`. It streams text through a callback
as tokens arrive and reports time to first token and throughput.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from moeserve.config import SamplingConfig
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


@torch.inference_mode()
def warm_up(model: MoEModel) -> None:
    """Run one short prefill and decode step so one-time start-up costs stay out of timings."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    device = model.device
    model.hf_model(input_ids=torch.tensor([[0, 1, 2]], device=device), past_key_values=cache, use_cache=True)
    model.hf_model(input_ids=torch.tensor([[3]], device=device), past_key_values=cache, use_cache=True)


@torch.inference_mode()
def generate(
    model: MoEModel,
    prompt: str,
    sampling: SamplingConfig | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate a continuation of ``prompt``; ``on_text`` receives text pieces as they decode."""
    from transformers import DynamicCache

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
    cache = DynamicCache(config=model.config)
    device = model.device
    input_ids = torch.tensor([prompt_ids], device=device)  # [1, S]
    new_ids: list[int] = []
    finish_reason = "length"
    start = time.perf_counter()
    first_token_at = start
    while len(new_ids) < sampling.max_new_tokens:
        logits = model.hf_model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[0, -1]  # [V]
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
        input_ids = torch.tensor([[token]], device=device)
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
    )
