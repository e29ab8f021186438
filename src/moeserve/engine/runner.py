"""Model runner: one batched forward per engine step over requests of different lengths.

Shape legend: B requests in the step, S query tokens per request (the longest prompt for a
prefill, 1 for a decode), L key positions attended, H key/value heads, Dh head size, V vocab.

KV lives in a :class:`SlotKVCache`: per decoder layer a preallocated ``[slots, H, context, Dh]``
buffer, one slot per running request. A step's requests occupy consecutive slots (the scheduler
keeps them dense), so the keys a step attends over are a slice of the buffer, not a copy. Each
request writes its new keys at its own position; an additive mask hides positions past each
request's length, so requests of different lengths share one forward without recomputation.

The transformers decoder runs unchanged (its attention calls ``cache.update``); MoE blocks are
moeserve's, so all the batch's tokens go through the dropless MoE layer together. The plain
reference is :func:`moeserve.engine.generate.generate` (one request, transformers' own cache);
tests check the two produce the same tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from moeserve.engine.generate import sample_next
from moeserve.engine.lean import lean_decoder, sliding_window_layout
from moeserve.engine.request import Request
from moeserve.engine.scheduler import Batch, SlotMove
from moeserve.errors import MoeserveError
from moeserve.models.loader import MoEModel


class SlotKVCache:
    """Preallocated per-slot KV buffers, duck-typed to what transformers attention calls.

    ``begin_step`` says where the next forward's keys go; ``update`` (called by each attention
    layer) writes them there and returns the keys and values to attend over. Buffers are
    allocated on the first update of each layer, from that layer's key and value shapes (so
    layers with different head sizes, e.g. multi-head latent attention, work).
    """

    def __init__(self, num_slots: int, context: int) -> None:
        self.num_slots = num_slots
        self.context = context
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._first_slot = 0
        self._rows = 0
        self._positions: torch.Tensor | None = None  # [B] decode write positions; None = prefill from 0
        self._attend = 0

    def begin_step(self, first_slot: int, rows: int, positions: torch.Tensor | None, attend: int) -> None:
        """Next forward: ``rows`` requests in slots ``first_slot..``; decode writes at ``positions`` [B]."""
        self._first_slot, self._rows, self._positions, self._attend = first_slot, rows, positions, attend

    def _buffer(self, store: dict[int, torch.Tensor], layer: int, like: torch.Tensor) -> torch.Tensor:
        buffer = store.get(layer)
        if buffer is None:
            heads, head_size = like.shape[1], like.shape[3]
            buffer = like.new_zeros(self.num_slots, heads, self.context, head_size)  # [slots, H, context, Dh]
            store[layer] = buffer
        return buffer

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Write key/value [B, H, S, Dh] for this step; return [B, H, L, Dh] views to attend over."""
        keys = self._buffer(self.keys, layer_idx, key)
        values = self._buffer(self.values, layer_idx, value)
        rows = slice(self._first_slot, self._first_slot + self._rows)
        if self._positions is None:  # prefill: every request starts at position 0
            length = key.shape[2]
            keys[rows, :, :length] = key
            values[rows, :, :length] = value
        else:  # decode: one new position per request, each its own
            slots = torch.arange(self._first_slot, self._first_slot + self._rows, device=key.device)
            keys[slots, :, self._positions] = key[:, :, 0]
            values[slots, :, self._positions] = value[:, :, 0]
        return keys[rows, :, : self._attend], values[rows, :, : self._attend]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._attend

    @torch.inference_mode()
    def move(self, move: SlotMove) -> None:
        for store in (self.keys, self.values):
            for buffer in store.values():
                buffer[move.target, :, : move.length] = buffer[move.source, :, : move.length]


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
"""Layer types whose state is keys and values, which :class:`SlotKVCache` holds."""


def engine_unsupported_reason(config: Any) -> str | None:
    """Why the engine cannot run a model of ``config`` (None when it can): layers whose state is
    not keys and values (Qwen3-Next's linear attention keeps a recurrent state and a convolution
    window per request, which the slot KV cache does not hold)."""
    others = sorted(set(getattr(config, "layer_types", None) or ()) - set(ATTENTION_LAYER_TYPES))
    if others:
        return (f"it has {', '.join(others)} layers, whose per-request state the engine's KV cache does not hold; "
                "`moeserve generate` runs it (one request, transformers' cache)")
    return None


class ModelRunner:
    """Runs a scheduler :class:`Batch` through the model and picks each request's next token."""

    def __init__(self, model: MoEModel, num_slots: int, context: int, lean: bool = True) -> None:
        reason = engine_unsupported_reason(model.config)
        if reason is not None:
            raise MoeserveError(f"{model.name}: the serving engine cannot run this model: {reason}")
        self.model = model
        self.decoder = model.hf_model.get_decoder()
        self.lean = lean_decoder(model.hf_model) if lean else None
        """The lean forward where the family has one (``moeserve.engine.lean``), else None:
        transformers' decoder, which is also the reference the tests compare it with."""
        self.lm_head = model.hf_model.get_output_embeddings()
        self.dtype = next(model.hf_model.parameters()).dtype
        self.device = model.device
        """Where the step's inputs and masks are built (the model's device)."""
        self.cache = SlotKVCache(num_slots, context)
        self.context = context
        self._generators: dict[str, torch.Generator] = {}
        self.window, self._per_layer_type = sliding_window_layout(model.config)
        """Sliding-window attention the masks must apply (None: none), and whether only some
        layers use it (then the decoder gets one mask per layer type)."""

    @torch.inference_mode()
    def execute(self, batch: Batch) -> list[int]:
        """Next token id of each request in the batch, in order."""
        return self._sample(batch.requests, self.logits(batch))

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Next-token logits [B, V] (fp32) of each request in the batch, in order."""
        hidden = self._prefill(batch) if batch.kind == "prefill" else self._decode(batch)  # [B, D]
        return self.lm_head(hidden).float()

    def move_slot(self, move: SlotMove) -> None:
        self.cache.move(move)

    def release(self, request: Request) -> None:
        """Forget per-request state (its sampling generator)."""
        self._generators.pop(request.request_id, None)

    def _prefill(self, batch: Batch) -> torch.Tensor:
        prompt_lengths = [r.num_prompt_tokens for r in batch.requests]
        longest = max(prompt_lengths)
        rows = len(batch.requests)
        input_ids = torch.zeros(rows, longest, dtype=torch.long)  # [B, S], right-padded
        for row, request in enumerate(batch.requests):
            input_ids[row, : request.num_prompt_tokens] = torch.tensor(request.prompt_ids)
        device = self.device
        input_ids = input_ids.to(device)  # built on the CPU, moved in one copy
        lengths = torch.tensor(prompt_lengths, device=device)  # [B]
        positions = torch.arange(longest, device=device).expand(rows, longest)  # [B, S]
        key_index = torch.arange(longest, device=device)  # [L] with L == S
        # Query s sees keys <= s of its own prompt; padded queries still see key 0 (no empty rows).
        allowed = (key_index[None, None, :] <= positions[:, :, None]) & (key_index[None, None, :] < lengths[:, None, None])
        self.cache.begin_step(batch.first_slot, rows, None, longest)
        hidden = self._forward(input_ids, positions, allowed)  # [B, S, D]
        return hidden[torch.arange(rows, device=device), lengths - 1]  # [B, D]

    def _decode(self, batch: Batch) -> torch.Tensor:
        device = self.device
        input_ids = torch.tensor([[r.output_ids[-1]] for r in batch.requests], device=device)  # [B, 1]
        last_positions = [r.num_tokens - 1 for r in batch.requests]
        positions = torch.tensor(last_positions, device=device)  # [B]
        attend = max(last_positions) + 1
        allowed = torch.arange(attend, device=device)[None, None, :] <= positions[:, None, None]  # [B, 1, L]
        self.cache.begin_step(batch.first_slot, len(batch.requests), positions, attend)
        hidden = self._forward(input_ids, positions[:, None], allowed)  # [B, 1, D]
        return hidden[:, 0]

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """[B, S, L] booleans -> additive mask [B, 1, S, L] (works with eager and sdpa attention)."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[:, None]

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        causal = self._additive(allowed)
        if self.lean is not None:  # the lean forward takes no sliding-window models
            return self.lean(input_ids, positions, causal, self.cache)
        mask: torch.Tensor | dict[str, torch.Tensor] = causal
        if self.window is not None:
            # As transformers' sliding-window overlay: query q sees keys k with q - window < k.
            key_index = torch.arange(allowed.shape[-1], device=self.device)  # [L]
            sliding = self._additive(allowed & (key_index[None, None, :] > positions[:, :, None] - self.window))
            mask = {"full_attention": causal, "sliding_attention": sliding} if self._per_layer_type else sliding
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        tokens = torch.argmax(logits, dim=-1).tolist()  # greedy for all; sampled rows overwrite
        for row, request in enumerate(requests):
            sampling = request.sampling
            if sampling.temperature == 0:
                continue
            generator = self._generators.get(request.request_id)
            if generator is None:
                generator = torch.Generator()
                seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31, ()).item())
                generator.manual_seed(seed)
                self._generators[request.request_id] = generator
            tokens[row] = sample_next(logits[row], sampling.temperature, sampling.top_p, generator)
        return tokens
