"""Next-layer prefetch for the live expert cache: exact outputs, stall counts, precision and recall.

Reference: the same checkpoint loaded all-resident; prefetch must keep logits bit-identical
(``torch.equal``) at every step of a greedy generation. Stall counts are asserted only for the
inline loader, which is deterministic; the background loader's depend on thread timing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moeserve.memory.cache import ExpertCache
from moeserve.memory.offload import apply_expert_cache, remove_expert_cache
from moeserve.memory.prefetch import PrefetchConfig
from moeserve.memory.store import ExpertStore
from moeserve.models.loader import MoEModel, load_model
from moeserve.moe.types import RouterOutput
from tests.memory.test_cache import ExpertUses, assert_bit_identical, greedy_logits

INLINE = PrefetchConfig(background=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(model: MoEModel, prompt_ids: list[int], budget: str, prefetch: bool | PrefetchConfig):
    """Greedy logits and the cache's stats for one generation under ``budget`` (lru)."""
    cache = apply_expert_cache(model, budget, "lru", prefetch=prefetch)
    uses = ExpertUses()
    for layer in model.layers:
        layer.observers.append(uses)
    try:
        got = greedy_logits(model, prompt_ids)
        cache.wait_for_prefetch()
        stats = cache.stats()
        resident = sum(len(view.resident_experts()) for view in cache.views)
        expert_nbytes = cache.store.expert_nbytes(cache.decoder_layers[0], 0)
    finally:
        for layer in model.layers:
            layer.observers.remove(uses)
        remove_expert_cache(model, cache)
    # Counts hold whatever the timing: every use is a hit or a stalled use; every read is a
    # synchronous miss or a prefetch; what was read and not evicted is resident.
    assert stats.hits + stats.misses == uses.uses
    assert stats.stalled_uses == stats.misses
    assert stats.loads - stats.prefetch_loads == stats.misses - stats.prefetch_waits
    assert stats.evictions == stats.loads - resident
    assert stats.bytes_read == stats.loads * expert_nbytes
    assert stats.max_resident_bytes <= stats.budget_bytes
    return got, stats


@pytest.mark.parametrize("budget", ["25%", "50%"])
@pytest.mark.parametrize("prefetch", [True, INLINE], ids=["background", "inline"])
def test_prefetch_is_bit_identical(model, prompt_ids, expected_logits, budget, prefetch):
    got, stats = run(model, prompt_ids, budget, prefetch)
    assert_bit_identical(got, expected_logits)
    assert stats.prefetch_loads > 0
    assert 0 < stats.prefetch_precision <= 1 and 0 < stats.prefetch_recall <= 1
    figures = stats.to_dict()
    assert figures["stalled_uses"] == stats.misses
    assert figures["prefetch_precision"] == stats.prefetch_precision
    assert figures["prefetch_recall"] == stats.prefetch_recall


@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_inline_prefetch_halves_stalls(model, prompt_ids, budget):
    _, plain = run(model, prompt_ids, budget, False)
    _, prefetched = run(model, prompt_ids, budget, INLINE)
    assert plain.predicted == 0 and plain.prefetch_loads == 0
    # Every layer is predicted, the first one from its decoder layer's input and the LM head.
    assert 2 * prefetched.stalled_uses <= plain.stalled_uses
    assert 2 * prefetched.layer_misses[0] <= plain.layer_misses[0]


def test_each_signal_adds_recall(model, prompt_ids):
    # Inline loads make the counts deterministic. The MoE-input signal alone predicts layers
    # 1..L-1; the decoder-layer-input signal adds the first layer and what attention wrote.
    _, next_layer_only = run(
        model, prompt_ids, "25%", PrefetchConfig(background=False, from_layer_input=False, next_tokens=0)
    )
    _, both = run(model, prompt_ids, "25%", INLINE)
    assert next_layer_only.prefetch_recall < both.prefetch_recall
    assert both.stalled_uses < next_layer_only.stalled_uses
    assert both.prefetch_precision > 0.5


def test_prefetch_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lookahead"):
        PrefetchConfig(lookahead=0)
    with pytest.raises(ValueError, match="next_tokens"):
        PrefetchConfig(next_tokens=-1)
    with pytest.raises(ValueError, match="experts_per_token"):
        PrefetchConfig(experts_per_token=0)


@pytest.mark.parametrize(
    "config",
    [PrefetchConfig(background=False, lookahead=2), PrefetchConfig(background=False, experts_per_token=3)],
    ids=["lookahead-2", "wider"],
)
def test_other_prefetch_settings_stay_bit_identical(model, prompt_ids, expected_logits, config):
    got, stats = run(model, prompt_ids, "25%", config)
    assert_bit_identical(got, expected_logits)
    assert stats.prefetch_loads > 0


def test_prefetch_needs_an_online_policy(model):
    with pytest.raises(ValueError, match="online"):
        apply_expert_cache(model, "50%", "belady", prefetch=True, future=[])


def test_remove_expert_cache_unhooks_the_prefetcher(model, prompt_ids, expected_logits):
    cache = apply_expert_cache(model, "25%", "lru", prefetch=True)
    assert all(len(layer.observers) == 2 for layer in model.layers)
    remove_expert_cache(model, cache)
    assert all(not layer.observers for layer in model.layers)
    assert all(not layer.mlp._forward_pre_hooks for layer in model.hf_model.model.layers)
    assert all(not layer._forward_pre_hooks for layer in model.hf_model.model.layers)
    assert not model.hf_model.get_output_embeddings()._forward_hooks
    assert not model.hf_model.get_input_embeddings()._forward_hooks
    assert_bit_identical(greedy_logits(model, prompt_ids), expected_logits)


# -- the cache's prefetch protocol, without a model -------------------------------------------------


def routing(experts: list[int]) -> RouterOutput:
    ids = torch.tensor([experts])  # [1, k]
    return RouterOutput(topk_ids=ids, topk_weights=torch.ones(ids.shape), logits=torch.zeros(1, 16))


def small_cache(slots: int) -> ExpertCache:
    store = ExpertStore(load_model(load_tokenizer=False).path)
    expert_bytes = store.expert_nbytes(store.layers[0], 0)
    return ExpertCache(store, store.layers, budget_bytes=slots * expert_bytes, top_k=2)


def test_prediction_is_scored_against_the_next_step():
    cache = small_cache(4)
    cache.prefetch(1, [0, 1, 2], background=False)
    stats = cache.stats()
    assert (stats.prefetch_loads, stats.loads, stats.misses) == (3, 3, 0)
    assert cache.views[1].resident_experts() == [0, 1, 2]
    cache.observe(1, routing([1, 5]))
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.prefetch_used) == (1, 1, 1)
    assert stats.prefetch_precision == pytest.approx(1 / 3)
    assert stats.prefetch_recall == pytest.approx(1 / 2)
    cache.observe(1, routing([1, 5]))  # no prediction for this step: nothing more is scored
    assert cache.stats().predicted == 3


def test_prefetch_never_evicts_the_running_step_nor_exceeds_the_budget():
    cache = small_cache(4)
    cache.observe(0, routing([3, 4]))  # the running step pins experts 3 and 4 of layer 0
    cache.prefetch(1, list(range(16)), background=False)
    assert cache.views[0].resident_experts() == [3, 4]
    assert cache.views[1].resident_experts() == [0, 1]  # two free slots; nothing else may go
    assert cache.resident_bytes == cache.budget_bytes == cache.stats().max_resident_bytes


def test_background_prefetch_lands_and_is_waited_for():
    cache = small_cache(6)
    cache.observe(0, routing([3, 4]))
    cache.prefetch(1, [7, 9])
    cache.wait_for_prefetch()
    cache.observe(1, routing([7, 9]))
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.prefetch_loads, stats.prefetch_used) == (2, 2, 2, 2)
    # Racing the loader: a use waits for an expert in flight; the rest of a prediction is dropped
    # once its layer's step begins, and the step loads what it still misses itself.
    cache.prefetch(2, [1, 2])
    cache.observe(2, routing([1, 2]))
    stats = cache.stats()
    assert stats.hits + stats.misses == 6 and stats.loads == 6
    assert stats.loads - stats.prefetch_loads == stats.misses - stats.prefetch_waits
    assert cache.views[1].resident_experts() == [7, 9] and cache.views[2].resident_experts() == [1, 2]
    cache.close()
