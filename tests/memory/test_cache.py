"""ExpertCache and apply_expert_cache: exact outputs under a byte budget, counters, budget errors, parsing.

Reference: the same checkpoint loaded all-resident. Exact policies must give logits bit-identical
(``torch.equal``) to it at every step of a greedy generation, prefill included. Assertions are on
values and counts, never timings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from moeserve.errors import MoeserveError
from moeserve.memory.cache import (
    CachedLayerExperts,
    ExpertBudgetError,
    ExpertCache,
    ExpertMemory,
    parse_expert_memory,
)
from moeserve.memory.offload import apply_expert_cache, remove_expert_cache
from moeserve.memory.store import ExpertStore
from moeserve.models.loader import MoEModel, load_model
from moeserve.moe.types import ResidentExperts, RouterOutput

NEW_TOKENS = 32
REFERENCE_EXPERT_BYTES = (
    3 * 160 * 128 * 4
)  # one expert of the reference model: gate, up, down fp32 [160 x 128]
PROMPT = (
    'import os\nimport sys\n\n\ndef main(argv):\n    """Print every argument."""\n    for name in argv:\n'
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny models run several times faster on one thread of a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def greedy_logits(
    model: MoEModel, prompt_ids: list[int], after_step: Callable[[], None] | None = None
) -> list[torch.Tensor]:
    """Logits of every forward of a greedy generation: the prefill [1, S, V], then NEW_TOKENS decode steps."""
    from transformers import DynamicCache

    steps: list[torch.Tensor] = []
    with torch.inference_mode():
        kv_cache = DynamicCache(config=model.config)
        input_ids = torch.tensor([prompt_ids], device=model.device)  # [1, S]
        for _ in range(NEW_TOKENS + 1):
            logits = model.hf_model(input_ids=input_ids, past_key_values=kv_cache, use_cache=True).logits
            steps.append(logits.clone())
            if after_step is not None:
                after_step()
            input_ids = logits[:, -1:].argmax(dim=-1)  # [1, 1]
    return steps


def assert_bit_identical(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"logits differ at step {step} (0 is the prefill)"


class ExpertUses:
    """Routing observer counting distinct experts per layer call: what the experts stage asks for."""

    def __init__(self) -> None:
        self.uses = 0
        self.widest = 0

    def __call__(self, layer_index: int, routing: RouterOutput) -> None:
        distinct = len(set(routing.topk_ids.reshape(-1).tolist()))
        self.uses += distinct
        self.widest = max(self.widest, distinct)


@contextmanager
def cached(model: MoEModel, *args, **kwargs) -> Iterator[tuple[ExpertCache, ExpertUses]]:
    """The model served by a new cache and an expert-use counter, restored afterwards."""
    cache = apply_expert_cache(model, *args, **kwargs)
    uses = ExpertUses()
    for layer in model.layers:
        layer.observers.append(uses)
    try:
        yield cache, uses
    finally:
        for layer in model.layers:
            layer.observers.remove(uses)
        remove_expert_cache(model, cache)


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory) -> Path:
    from moeserve.models.random_init import save_random_checkpoint

    return save_random_checkpoint("mixtral", tmp_path_factory.mktemp("cache") / "mixtral")


def check_counts(cache: ExpertCache, uses: ExpertUses) -> None:
    stats = cache.stats()
    assert stats.hits + stats.misses == uses.uses
    assert stats.loads == stats.misses
    assert stats.bytes_read == stats.loads * cache.store.expert_nbytes(cache.decoder_layers[0], 0)
    assert stats.bytes_read == cache.store.bytes_read
    resident = sum(len(view.resident_experts()) for view in cache.views)
    assert stats.evictions == stats.loads - resident
    assert stats.resident_bytes == resident * cache.expert_bytes(0) == cache.resident_bytes
    assert 0 < stats.max_resident_bytes <= cache.allocated_bytes <= cache.budget_bytes
    assert sum(stats.layer_hits) == stats.hits and sum(stats.layer_misses) == stats.misses


# -- exact: bit-identical to all experts resident ---------------------------------------------------


@pytest.mark.parametrize("budget", ["25%", "50%"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "lifo"])
def test_exact_policies_are_bit_identical_within_budget(model, prompt_ids, expected_logits, policy, budget):
    resident_after_step: list[int] = []
    with cached(model, budget, policy) as (cache, uses):
        budget_bytes = cache.budget_bytes
        assert budget_bytes == int(float(budget[:-1]) / 100 * 64 * REFERENCE_EXPERT_BYTES)
        assert cache.capacity == budget_bytes // REFERENCE_EXPERT_BYTES
        got = greedy_logits(model, prompt_ids, lambda: resident_after_step.append(cache.resident_bytes))
        check_counts(cache, uses)
        stats = cache.stats()
    assert_bit_identical(got, expected_logits)
    assert max(resident_after_step) <= stats.max_resident_bytes <= budget_bytes
    assert stats.hits > 0 and stats.misses > 0
    assert stats.split_steps == 0  # 16 or 32 slots hold any one layer's 16 experts


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared", "per-layer"])
def test_steps_wider_than_the_cache_are_split_and_stay_exact(model, prompt_ids, expected_logits, per_layer):
    # The minimum budget: top-2 experts (per layer when per_layer), while the prefill routes to more.
    minimum = 2 * REFERENCE_EXPERT_BYTES * (4 if per_layer else 1)
    with cached(model, minimum, "lru", per_layer=per_layer) as (cache, uses):
        got = greedy_logits(model, prompt_ids)
        check_counts(cache, uses)
        stats = cache.stats()
        assert cache.capacity == (8 if per_layer else 2)
    assert uses.widest > 2
    assert stats.split_steps > 0
    assert stats.max_resident_bytes == minimum
    assert_bit_identical(got, expected_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_mixtral_is_bit_identical(mixtral_folder, dtype):
    # The checkpoint is stored in fp32; bf16 exercises loading through a staging buffer and converting.
    reference = load_model(mixtral_folder, dtype=dtype, load_tokenizer=False)
    prompt = torch.randint(2, 96, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = greedy_logits(reference, prompt)
    served = load_model(mixtral_folder, dtype=dtype, load_tokenizer=False)
    with cached(served, "25%", "lru", per_layer=True) as (cache, uses):
        assert cache.capacity == 2 * 2  # 25% of 8 experts in each of 2 layers
        assert (cache.staging_bytes > 0) == (dtype != torch.float32)
        got = greedy_logits(served, prompt)
        check_counts(cache, uses)
        assert cache.stats().max_resident_bytes <= cache.budget_bytes
    assert_bit_identical(got, expected)
    # remove_expert_cache made the model all-resident again.
    assert all(isinstance(layer.experts, ResidentExperts) for layer in served.layers)
    assert_bit_identical(greedy_logits(served, prompt), expected)


def test_belady_with_the_recorded_future_is_exact_and_hits_most(model, prompt_ids, expected_logits):
    with cached(model, "25%", "lru", record_steps=True) as (cache, _):
        greedy_logits(model, prompt_ids)
        lru, future = cache.stats(), cache.step_log
    assert future is not None and len(future) == lru.steps
    with cached(model, "25%", "belady", future=future) as (cache, uses):
        got = greedy_logits(model, prompt_ids)
        check_counts(cache, uses)
        belady = cache.stats()
    assert_bit_identical(got, expected_logits)
    assert belady.requests == lru.requests
    assert belady.hits >= lru.hits
    with (
        cached(model, "25%", "belady", future=future[:10]) as (cache, _),
        pytest.raises(MoeserveError, match="step 10"),
    ):
        greedy_logits(model, prompt_ids)


# -- the transform ----------------------------------------------------------------------------------


def test_apply_frees_the_models_experts_and_refuses_twice(model):
    with cached(model, "50%") as (cache, _):
        for layer, decoder_id in zip(model.layers, model.decoder_layer_ids, strict=True):
            experts = model.hf_model.model.layers[decoder_id].mlp.experts
            assert experts.gate_up_proj.numel() == 0 and experts.down_proj.numel() == 0
            assert isinstance(layer.experts, CachedLayerExperts)
            assert layer.experts.stacked() is None
            assert cache.observe in layer.observers
        assert cache.resident_bytes == 0  # nothing is loaded before the first forward
        with pytest.raises(ValueError, match="already"):
            apply_expert_cache(model, "50%")
    experts = model.hf_model.model.layers[model.decoder_layer_ids[0]].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (16, 320, 128)


@pytest.mark.parametrize(
    ("per_layer", "minimum", "experts"),
    [(False, 2 * REFERENCE_EXPERT_BYTES, "2 experts"), (True, 8 * REFERENCE_EXPERT_BYTES, "(8 experts)")],
)
def test_budget_below_top_k_experts_is_refused_naming_the_minimum(model, per_layer, minimum, experts):
    with pytest.raises(ExpertBudgetError) as error:
        apply_expert_cache(model, minimum - 1, per_layer=per_layer)
    assert f"minimum is {minimum} bytes" in str(error.value) or f"= {minimum} bytes" in str(error.value)
    assert experts in str(error.value)
    assert all(isinstance(layer.experts, ResidentExperts) for layer in model.layers)  # untouched


@pytest.mark.parametrize(
    ("policy", "error", "match"),
    [
        ("predicted-reuse", ValueError, "whole step stream"),
        ("belady", ValueError, "reads the future"),
        ("no-such-policy", KeyError, "known: "),
    ],
)
def test_policies_that_cannot_run_live_are_refused(model, policy, error, match):
    with pytest.raises(error, match=match):
        apply_expert_cache(model, "50%", policy)
    assert all(isinstance(layer.experts, ResidentExperts) for layer in model.layers)


def test_unannounced_requests_load_on_demand(mixtral_folder):
    # Without the routing observer, a missing expert is loaded as a one-expert step; a resident one is
    # returned as it is, unseen by the policy and the counters.
    store = ExpertStore(mixtral_folder)
    expert_bytes = store.expert_nbytes(0, 0)
    cache = ExpertCache(store, store.layers, budget_bytes=3 * expert_bytes - 1, top_k=2)
    assert cache.capacity == 2
    view = cache.views[1]
    for expert in (3, 5, 3, 7, 5):
        expected = store.read_expert(1, expert)
        assert torch.equal(view.gate_up(expert), expected.gate_up)
        assert torch.equal(view.down(expert), expected.down)
        assert cache.resident_bytes <= 2 * expert_bytes
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (0, 3, 1)  # lru: 3 5 (3) 7 evicts 3, (5)
    assert view.resident_experts() == [5, 7]


# -- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("25%", ExpertMemory(fraction=0.25)),
        ("100%", ExpertMemory(fraction=1.0)),
        ("0.5", ExpertMemory(fraction=0.5)),
        ("1", ExpertMemory(fraction=1.0)),
        (".25", ExpertMemory(fraction=0.25)),
        ("2GiB", ExpertMemory(nbytes=2 * 2**30)),
        ("512MB", ExpertMemory(nbytes=512 * 10**6)),
        ("1.5 gib", ExpertMemory(nbytes=3 * 2**29)),
        ("64KiB", ExpertMemory(nbytes=65536)),
        ("1000000B", ExpertMemory(nbytes=10**6)),
    ],
)
def test_parse_expert_memory(text, expected):
    assert parse_expert_memory(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "0", "0%", "150%", "2", "-1GiB", "5XB", "GiB", "25 %%", "0.1B"])
def test_parse_expert_memory_refuses(text):
    with pytest.raises(ValueError, match="expert memory"):
        parse_expert_memory(text)


def test_expert_memory_resolves_against_total_bytes():
    assert ExpertMemory(fraction=0.25).resolve(1000) == 250
    assert ExpertMemory(nbytes=123).resolve(1000) == 123
    with pytest.raises(ValueError):
        ExpertMemory(nbytes=1, fraction=0.5)
