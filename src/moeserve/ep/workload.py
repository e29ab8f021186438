"""What the attention worker runs: a batch of requests through a model whose MoE layers can be swapped.

Two workloads share one interface (:class:`Workload`):

- :class:`ModelWorkload`: a checkpoint loaded with ``moeserve.models.loader.load_model`` (the
  reference model by default). Requests are equal-length prompts cut from the standard-library
  held-out split, decoded greedily with a KV cache; routing is the model's own.
- :class:`TraceWorkload`: routing replayed from a ``moeserve-trace/1`` file through a synthetic
  model (random embeddings, one dense D x D mixer per layer standing in for attention, random
  experts). Its outputs are hidden states, not logits; it exists to run real routing skew, e.g.
  DeepSeek-V2-Lite's, through real processes.

A :class:`Session` is one group of requests with its own cache: ``step()`` runs the prefill the
first time and one decode token afterwards, and returns ``[b, V]`` outputs of the last position.
Workloads know nothing of processes; ``install`` is the expert-parallel transform's hook.

Shape legend: R requests, b requests in a session, P prompt tokens, L MoE layers, E experts,
k top-k, D hidden, V vocabulary (or D for the trace workload).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import nn

from moeserve.config import MoEConfig
from moeserve.ep.config import EPConfig
from moeserve.ep.experts import synthetic_expert
from moeserve.moe.layer import MoELayer
from moeserve.moe.types import ResidentExperts, RouterOutput


class Session(Protocol):
    def step(self) -> torch.Tensor:
        """Outputs [b, V] of the next position of every request (prefill first)."""
        ...


class Workload(Protocol):
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int

    def expert_loads(self) -> np.ndarray:
        """int64 [L, E] assignments per expert over the requests' prompts (for the placement)."""
        ...

    def install(self, make_experts: Callable[[int], nn.Module]) -> None:
        """Replace MoE layer i's experts with ``make_experts(i)`` (forward(hidden [T, D], routing) -> [T, D])."""
        ...

    def session(self, requests: slice, prompt_tokens: int) -> Session:
        """A new session for requests [requests] using the first ``prompt_tokens`` prompt tokens."""
        ...


def check_workload(config: EPConfig) -> None:
    """What can be checked before any process starts, so a bad checkpoint is one clear error
    rather than a worker's traceback: the model workload's folder (config.json of a supported
    family, weight files) and its tokenizer files (the prompts are text)."""
    if config.trace is not None:
        return
    from moeserve.errors import MoeserveError
    from moeserve.models.loader import check_weight_files, read_config, resolve_model_path

    folder = resolve_model_path(config.model)
    read_config(folder)
    check_weight_files(folder)
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        raise MoeserveError(f"{folder} has no tokenizer; the model workload needs one for its prompts (or give --trace)")


def build_workload(config: EPConfig) -> Workload:
    if config.trace is not None:
        return TraceWorkload(config)
    return ModelWorkload(config)


# --------------------------------------------------------------------------------------------
# a real checkpoint


def reference_prompts(tokenizer, requests: int, prompt_tokens: int) -> torch.Tensor:
    """int64 [R, P]: consecutive pieces of the standard-library held-out split (deterministic)."""
    from moeserve.models.reference import reference_split_tokens

    stream = reference_split_tokens(tokenizer, held_out=True, max_tokens=requests * prompt_tokens)
    return stream[: requests * prompt_tokens].view(requests, prompt_tokens).to(torch.int64)


class _ModelSession:
    def __init__(self, model, prompts: torch.Tensor) -> None:
        from transformers import DynamicCache

        self.model = model
        self.next_ids = prompts  # [b, P] before the prefill, then [b, 1]
        self.cache = DynamicCache(config=model.config)

    def step(self) -> torch.Tensor:
        out = self.model.hf_model(input_ids=self.next_ids, past_key_values=self.cache, use_cache=True)
        logits = out.logits[:, -1]  # [b, V]
        self.next_ids = torch.argmax(logits, dim=-1, keepdim=True)  # [b, 1]
        return logits


class ModelWorkload:
    """Greedy decoding of ``config.requests`` prompts on ``config.model`` (default: the reference model)."""

    def __init__(self, config: EPConfig) -> None:
        from moeserve.errors import MoeserveError
        from moeserve.models.loader import load_model

        self.model = load_model(config.model)
        if self.model.tokenizer is None:
            raise MoeserveError(
                f"{self.model.path} has no tokenizer; the model workload needs one for its prompts"
            )
        self.prompts = reference_prompts(
            self.model.tokenizer, config.requests, config.prompt_tokens
        )  # [R, P]
        self.num_layers = len(self.model.layers)
        self.num_experts = self.model.num_experts
        self.top_k = self.model.top_k
        self.hidden_size = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def expert_loads(self) -> np.ndarray:
        loads = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)

        def count(layer: int, routing: RouterOutput) -> None:
            loads[layer] += np.bincount(routing.topk_ids.reshape(-1).numpy(), minlength=self.num_experts)

        for layer in self.model.layers:
            layer.observers.append(count)
        try:
            self.model.hf_model(input_ids=self.prompts, use_cache=False)
        finally:
            for layer in self.model.layers:
                layer.observers.remove(count)
        return loads

    def install(self, make_experts: Callable[[int], nn.Module]) -> None:
        decoder_layers = self.model.hf_model.model.layers
        for layer in self.model.layers:
            block = decoder_layers[self.model.decoder_layer_ids[layer.layer_index]].mlp
            block.moe = make_experts(layer.layer_index)
            if hasattr(block, "experts"):
                del block.experts  # the attention worker holds no routed experts

    def session(self, requests: slice, prompt_tokens: int) -> Session:
        return _ModelSession(self.model, self.prompts[requests, :prompt_tokens])


# --------------------------------------------------------------------------------------------
# a routing trace through a synthetic model

EMBEDDING_ROWS = 1024
"""Distinct random input embeddings of the trace workload (token row t uses t % EMBEDDING_ROWS)."""


def rms_norm(hidden: torch.Tensor) -> torch.Tensor:
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)


class SyntheticMoEModel(nn.Module):
    """``forward(rows [b, t] trace rows) -> [b, D]``: per layer ``h += mixer(rms(h))`` then
    ``h += moe(rms(h), routing from the trace)``. Routing weights are the trace's, else 1/k."""

    def __init__(self, experts: np.ndarray, weights: np.ndarray | None, hidden: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.experts = torch.from_numpy(experts.astype(np.int64))  # [T, L, k]
        top_k = experts.shape[2]
        self.weights = (
            torch.from_numpy(weights) if weights is not None else torch.full(experts.shape, 1.0 / top_k)
        )  # [T, L, k]
        self.embedding = torch.randn(EMBEDDING_ROWS, hidden, generator=generator)  # [rows, D]
        self.mixers = nn.ParameterList(
            [
                nn.Parameter(torch.randn(hidden, hidden, generator=generator) * hidden**-0.5)
                for _ in range(experts.shape[1])
            ]
        )
        self.moe = nn.ModuleList()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        b, t = rows.shape
        flat = rows.reshape(-1)  # [b*t]
        hidden = self.embedding.index_select(0, flat % EMBEDDING_ROWS)  # [b*t, D]
        for layer, mixer in enumerate(self.mixers):
            hidden = hidden + torch.nn.functional.linear(rms_norm(hidden), mixer)
            routing = RouterOutput(
                topk_ids=self.experts[flat, layer], topk_weights=self.weights[flat, layer]
            )  # [b*t, k] each
            hidden = hidden + self.moe[layer](rms_norm(hidden), routing)
        return hidden.view(b, t, -1)[:, -1]  # [b, D]


class _TraceSession:
    def __init__(
        self, model: SyntheticMoEModel, starts: torch.Tensor, prompt_tokens: int, num_rows: int
    ) -> None:
        self.model = model
        self.starts = starts  # [b] first trace row of each request
        self.prompt_tokens = prompt_tokens
        self.num_rows = num_rows
        self.position = 0

    def step(self) -> torch.Tensor:
        if self.position == 0:
            offsets = torch.arange(self.prompt_tokens)  # [P]
            self.position = self.prompt_tokens
        else:
            offsets = torch.tensor([self.position])
            self.position += 1
        rows = (self.starts[:, None] + offsets[None, :]) % self.num_rows  # [b, t]
        return self.model(rows)


class TraceWorkload:
    """The trace's rows replayed as requests: request r reads rows from r * (P + new_tokens) on."""

    def __init__(self, config: EPConfig) -> None:
        from moeserve.traces.format import UNKNOWN_EXPERT, load_trace

        assert config.trace is not None
        trace = load_trace(config.trace)
        experts = trace.experts.copy()
        weights = None if trace.weights is None else trace.weights.copy()
        unknown = experts == UNKNOWN_EXPERT
        if unknown.any():
            # An unknown choice still costs a row (expert 0) but contributes nothing.
            experts[unknown] = 0
            weights = np.where(unknown, 0.0, weights if weights is not None else 1.0 / trace.meta.top_k)
            weights = weights.astype(np.float32)
        self.num_layers = trace.num_layers
        self.num_experts = trace.meta.num_experts
        self.top_k = trace.meta.top_k
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.seed = config.seed
        self.model = SyntheticMoEModel(experts, weights, config.hidden_size, config.seed)
        span = config.prompt_tokens + config.new_tokens
        self.starts = (torch.arange(config.requests) * span) % trace.num_tokens  # [R]
        self.prompt_tokens = config.prompt_tokens
        self.num_rows = trace.num_tokens

    def expert_loads(self) -> np.ndarray:
        from moeserve.placement.balance import expert_loads
        from moeserve.traces.format import Trace, TraceMeta

        rows = (self.starts[:, None] + torch.arange(self.prompt_tokens)[None, :]).reshape(-1) % self.num_rows
        experts = self.model.experts[rows].numpy().astype(np.int16)  # [R*P, L, k]
        meta = TraceMeta(
            model="trace-workload", num_experts=self.num_experts, top_k=self.top_k, phase="prefill", source=""
        )
        return expert_loads(
            Trace(experts=experts, offsets=np.array([0, len(rows)], dtype=np.int64), meta=meta)
        )

    def local_experts(self) -> None:
        """Install every layer's experts in this process (the one-process reference)."""

        def make(layer: int) -> nn.Module:
            pairs = [
                synthetic_expert(self.seed, layer, expert, self.hidden_size, self.intermediate_size)
                for expert in range(self.num_experts)
            ]
            resident = ResidentExperts(
                gate_up_proj=torch.stack([gate_up for gate_up, _ in pairs]),
                down_proj=torch.stack([down for _, down in pairs]),
            )
            return MoELayer(resident, torch.nn.functional.silu, MoEConfig(), layer_index=layer)

        self.install(make)

    def install(self, make_experts: Callable[[int], nn.Module]) -> None:
        self.model.moe = nn.ModuleList([make_experts(layer) for layer in range(self.num_layers)])

    def session(self, requests: slice, prompt_tokens: int) -> Session:
        return _TraceSession(self.model, self.starts[requests], prompt_tokens, self.num_rows)
