"""Next-layer expert prefetch for a live :class:`~moeserve.memory.cache.ExpertCache`.

Shape legend: B sequences, S positions, T = B * S tokens of the forward, D hidden size, E experts
of a layer, k experts per token.

At MoE layer i, once the cache has made layer i's step resident (its routing observer), the
hidden state that entered layer i's MoE block (already normed by ``post_attention_layernorm``)
goes through MoE layer i+1's own router (``gate`` of the next :class:`~moeserve.models.block.MoEBlock`).
Its top-k experts, over all T tokens, are the prediction for layer i+1's next step, handed to
``ExpertCache.prefetch``, which loads the missing ones in the background. This is the usual
approximation of pre-gated MoE and MoE-Infinity-style prefetchers: the residual stream changes
little from one layer to the next. The last MoE layer predicts nothing unless
``PrefetchConfig.across_tokens`` (then it guesses the first layer of the next decode step; on
the reference model that guess is rarely right, hence off by default).

Exactness does not depend on the prediction: a wrong one costs loads and stalls, never output
bits, because the experts stage only ever computes with experts its own routing asked for.

This module knows where a model's MoE blocks and routers are (through ``MoEModel``), and nothing
of how the cache stores, evicts or counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from moeserve.memory.cache import ExpertCache
from moeserve.moe.types import RouterOutput

if TYPE_CHECKING:
    from moeserve.models.loader import MoEModel


@dataclass(frozen=True)
class PrefetchConfig:
    """How :class:`NextLayerPrefetcher` predicts and loads."""

    background: bool = True
    """Load on the cache's background loader; False loads inline, before layer i's experts run
    (deterministic: for tests, and the bound a prefetch with perfect overlap would reach)."""
    experts_per_token: int | None = None
    """Experts predicted per token: the next router's top ``experts_per_token`` (None: the
    model's top-k). More than top-k trades precision for recall; the router's own top-k
    choice is always included."""
    across_tokens: bool = False
    """The last MoE layer predicts the first one's experts for the next forward (a decode step),
    from each sequence's last token; the first layer would otherwise never be prefetched."""

    def __post_init__(self) -> None:
        if self.experts_per_token is not None and self.experts_per_token < 1:
            raise ValueError(f"experts_per_token must be >= 1, got {self.experts_per_token}")


class NextLayerPrefetcher:
    """Hooks on every MoE layer of ``model`` that predict the next MoE layer's experts for ``cache``.

    ``remove()`` unhooks; the cache calls it when it closes.
    """

    def __init__(self, model: MoEModel, cache: ExpertCache, config: PrefetchConfig | None = None) -> None:
        self.cache = cache
        self.config = config or PrefetchConfig()
        self._extra = max(0, (self.config.experts_per_token or model.top_k) - model.top_k)
        blocks = [model.hf_model.model.layers[decoder_id].mlp for decoder_id in model.decoder_layer_ids]
        self._routers = [block.gate for block in blocks]
        self._hidden: list[torch.Tensor | None] = [None] * len(blocks)
        self._layers = list(model.layers)
        self._handles = [
            block.register_forward_pre_hook(partial(self._keep_hidden, index))
            for index, block in enumerate(blocks)
        ]
        for layer in self._layers:
            layer.observers.append(self.observe)
        cache.on_close.append(self.remove)

    def _keep_hidden(self, layer_index: int, block: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._hidden[layer_index] = args[0]  # [B, S, D], the normed input of the MoE block

    def observe(self, layer_index: int, routing: RouterOutput) -> None:
        """Routing observer of MoE layer ``layer_index`` (after the cache's): prefetch for the next one."""
        hidden = self._hidden[layer_index]
        self._hidden[layer_index] = None
        target = layer_index + 1
        if target == len(self._routers):
            if not self.config.across_tokens or hidden is None:
                return
            target, hidden = 0, hidden[..., -1:, :]  # [B, 1, D]: the next forward decodes one token each
        if hidden is None:
            return
        hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, D]
        router = self._routers[target]
        # ``forward`` rather than ``__call__``: transformers records router logits through hooks
        # on the gate, and this extra call must not show up there.
        with torch.no_grad():
            logits, _, topk_ids = router.forward(hidden)  # [T, E], [T, k]
            if self._extra:
                wider = logits.topk(min(topk_ids.shape[-1] + self._extra, logits.shape[-1]), dim=-1).indices
                topk_ids = torch.cat([topk_ids, wider], dim=-1)  # [T, k + k']
        # One host sync per layer call, as the cache's own observer makes.
        predicted = sorted(set(topk_ids.reshape(-1).tolist()))
        self.cache.prefetch(target, predicted, background=self.config.background)

    def remove(self) -> None:
        """Unhook from the model (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._layers:
            if self.observe in layer.observers:
                layer.observers.remove(self.observe)
        self._hidden = [None] * len(self._hidden)
