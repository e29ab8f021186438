"""Expert offloading as a transform over a loaded model: serve its routed experts from an ExpertCache.

``apply_expert_cache(model, budget)`` turns a plain, all-resident :class:`~moeserve.models.loader.MoEModel`
into one whose MoE layers read their experts from an :class:`~moeserve.memory.cache.ExpertCache`
over the model's own checkpoint files, and frees the experts' parameters the model held, so
the process keeps only the cache's slots. The model's forward is unchanged: each MoE layer
gets the cache's view as its ``ExpertProvider`` (``MoELayer.replace_experts``) and the cache's
routing observer. ``remove_expert_cache`` undoes it by reading every expert back.

The ``exact`` guarantee: with any online policy, logits are bit-identical to the all-resident
model on CPU, where both run the same per-expert backend on the same weights, loaded from the
same bytes (tested). On CUDA the resident model would use ``grouped_mm`` and the cache a
per-expert loop, so outputs match only to rounding unless the resident model runs the same
``loop`` backend (the GPU test compares it so). ``host_memory`` adds the host tier (pinned
host memory in front of a GPU; a second RAM tier on CPU), which changes where bytes come
from, never the bytes: outputs stay bit-identical.

This module knows which attributes hold a family block's experts (transformers 5 fused
``experts.gate_up_proj`` [E, 2I, D] and ``experts.down_proj`` [E, D, I], kept by
:class:`~moeserve.models.block.MoEBlock`), and nothing of how the cache decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moeserve.errors import CheckpointError
from moeserve.memory.cache import CachedLayerExperts, ExpertCache, ExpertMemory, StepLog, parse_expert_memory
from moeserve.memory.policies import EVICTION_POLICIES
from moeserve.memory.prefetch import NextLayerPrefetcher, PrefetchConfig
from moeserve.memory.store import ExpertStore
from moeserve.moe.types import ResidentExperts

if TYPE_CHECKING:
    from moeserve.models.loader import MoEModel

Budget = ExpertMemory | str | int | float
"""An expert memory budget: ``ExpertMemory``, text for ``parse_expert_memory``, bytes (int) or a fraction (float)."""

_EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def as_expert_memory(budget: Budget) -> ExpertMemory:
    """Normalise a budget: text is parsed, an int is bytes, a float a fraction of all expert bytes."""
    if isinstance(budget, ExpertMemory):
        return budget
    if isinstance(budget, str):
        return parse_expert_memory(budget)
    if isinstance(budget, bool):
        raise TypeError(
            f"expert memory budget must be bytes (int), a fraction (float) or text, got {budget!r}"
        )
    if isinstance(budget, int):
        return ExpertMemory(nbytes=budget)
    return ExpertMemory(fraction=float(budget))


def apply_expert_cache(
    model: MoEModel,
    budget: Budget,
    policy: str = "lru",
    per_layer: bool = False,
    *,
    future: StepLog | None = None,
    record_steps: bool = False,
    prefetch: bool | PrefetchConfig = False,
    cold_reads: bool = False,
    host_memory: Budget | None = None,
) -> ExpertCache:
    """Serve ``model``'s routed experts from a new cache of ``budget`` and free the resident copies.

    ``budget`` as in :func:`as_expert_memory`; a fraction is of the experts' bytes as the model
    holds them (its dtype). ``policy``, ``per_layer``, ``future`` and ``record_steps`` go to
    :class:`~moeserve.memory.cache.ExpertCache`. Returns the cache (its ``stats()``, residency).
    ``prefetch`` (True, or a :class:`~moeserve.memory.prefetch.PrefetchConfig`) adds a
    :class:`~moeserve.memory.prefetch.NextLayerPrefetcher`; it needs an online policy.
    ``cold_reads``: ask that expert loads read the storage device, not the page cache
    (:class:`~moeserve.memory.store.ExpertStore`; advisory). ``host_memory`` (as ``budget``; a
    fraction is of the experts' bytes as the checkpoint stores them) adds a host tier between
    the checkpoint and the slots (:mod:`moeserve.memory.host_tier`); None: none. The cache's
    device is the model's (its slots go where its experts were).

    The model must be all-resident, dropless-gated (capacity gating computes every expert every
    step, so caching would reload them all) and its checkpoint folder must hold the experts it
    was loaded from. Raises before touching the model: ``ValueError`` for a model that already
    has a cache or is capacity-gated, :class:`~moeserve.errors.CheckpointError` when the
    checkpoint's MoE layers differ from the model's, :class:`~moeserve.memory.cache.ExpertBudgetError`
    for a budget (or host budget) under the minimum.
    """
    # 1. Check the model, then build the cache (nothing changes if this raises).
    for layer in model.layers:
        if isinstance(layer.experts, CachedLayerExperts):
            raise ValueError("the model already serves its experts from a cache; remove_expert_cache first")
        if layer.config.gating != "dropless":
            raise ValueError(
                f"an expert cache needs dropless gating, the model uses {layer.config.gating!r}: capacity "
                "gating computes every expert every step, so a cache smaller than all experts reloads them all"
            )
    dtypes = {layer.experts.dtype for layer in model.layers}
    devices = {layer.experts.device for layer in model.layers}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"MoE layers mix dtypes {dtypes} or devices {devices}; one cache serves one of each")
    store = ExpertStore(model.path, cold_reads=cold_reads)
    if store.layers != list(model.decoder_layer_ids):
        raise CheckpointError(
            f"{model.path}: checkpoint has routed experts in decoder layers {store.layers}, the model in "
            f"{model.decoder_layer_ids}"
        )
    if prefetch is not False and not EVICTION_POLICIES.get(policy).online:
        raise ValueError(f"prefetch needs an online eviction policy, not {policy!r}")
    dtype, device = dtypes.pop(), devices.pop()
    cache = ExpertCache(
        store,
        model.decoder_layer_ids,
        budget_bytes=_bytes_of_any_budget(store, model, budget, dtype),
        top_k=model.top_k,
        policy=policy,
        per_layer=per_layer,
        dtype=dtype,
        device=device,
        future=future,
        record_steps=record_steps,
        host_budget_bytes=None if host_memory is None else as_expert_memory(host_memory).resolve(store.total_expert_bytes()),
    )
    # 2. Switch every layer to the cache, then free the experts the model held.
    for layer, decoder_id in zip(model.layers, model.decoder_layer_ids, strict=True):
        layer.replace_experts(cache.views[layer.layer_index])
        layer.observers.append(cache.observe)
        _free_expert_parameters(model, decoder_id)
    if prefetch is not False:
        NextLayerPrefetcher(model, cache, PrefetchConfig() if prefetch is True else prefetch)
    return cache


def remove_expert_cache(model: MoEModel, cache: ExpertCache) -> None:
    """Undo :func:`apply_expert_cache`: read every expert back into the model and close ``cache``.

    Afterwards the model is all-resident again (the experts module's parameters hold the experts,
    in the cache's dtype) and the cache holds nothing.
    """
    cache.wait_for_prefetch()
    for callback in cache.on_close:
        callback()
    cache.on_close.clear()
    for layer, decoder_id in zip(model.layers, model.decoder_layer_ids, strict=True):
        if cache.observe in layer.observers:
            layer.observers.remove(cache.observe)
        view = cache.views[layer.layer_index]
        store = cache.store
        spec = store.layer_spec(decoder_id)
        e, d, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
        gate_up = torch.empty((e, 2 * i, d), dtype=spec.torch_dtype)  # [E, 2I, D]
        down = torch.empty((e, d, i), dtype=spec.torch_dtype)  # [E, D, I]
        for expert in range(e):
            store.read_expert_into(decoder_id, expert, gate_up[expert], down[expert])
        gate_up, down = gate_up.to(view.device, view.dtype), down.to(view.device, view.dtype)
        experts_module = getattr(_block(model, decoder_id), "experts", None)
        for name, tensor in zip(_EXPERT_PARAMETERS, (gate_up, down), strict=True):
            parameter = getattr(experts_module, name, None)
            if isinstance(parameter, torch.Tensor):
                parameter.data = tensor
        layer.replace_experts(ResidentExperts(gate_up_proj=gate_up, down_proj=down))
    cache.close()


def _bytes_of_any_budget(store: ExpertStore, model: MoEModel, budget: Budget, dtype: torch.dtype) -> int:
    memory = as_expert_memory(budget)
    total = sum(
        spec.num_experts * 3 * spec.intermediate_size * spec.hidden_size * dtype.itemsize
        for spec in (store.layer_spec(layer) for layer in model.decoder_layer_ids)
    )
    return memory.resolve(total)


def _block(model: MoEModel, decoder_id: int) -> torch.nn.Module:
    return model.hf_model.model.layers[decoder_id].mlp


def _free_expert_parameters(model: MoEModel, decoder_id: int) -> None:
    """Replace the experts module's stacked parameters by empty [0, ...] tensors (same dtype, device, rank)."""
    experts_module = getattr(_block(model, decoder_id), "experts", None)
    for name in _EXPERT_PARAMETERS:
        parameter = getattr(experts_module, name, None)
        if isinstance(parameter, torch.Tensor):
            parameter.data = parameter.data.new_empty((0, *parameter.shape[1:]))
