"""The expert cache's host tier and its CUDA copies: two tiers stay exact, both budgets hold, host hits replace disk reads.

Reference: the same checkpoint loaded all-resident (and, in test_cache.py, the plain synchronous
cache without a host tier against the same). On CPU the host tier is a second RAM tier and the
copier the synchronous one; the CUDA path (pinned host buffers, copies on a side stream ordered
by events) runs only in the tests marked ``gpu``, which skip without a CUDA device. Assertions
are on values and counts, never timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

from moeserve.config import MoEConfig
from moeserve.errors import MoeserveError
from moeserve.memory.cache import CacheStats, ExpertBudgetError, ExpertCache
from moeserve.memory.host_tier import HostTier
from moeserve.memory.offload import apply_expert_cache, remove_expert_cache
from moeserve.memory.prefetch import PrefetchConfig
from moeserve.memory.store import ExpertStore
from moeserve.models.loader import MoEModel, load_model
from moeserve.moe.types import ResidentExperts, RouterOutput
from tests.memory.test_cache import (  # noqa: F401 (one_thread: the module's autouse fixture)
    REFERENCE_EXPERT_BYTES,
    ExpertUses,
    assert_bit_identical,
    cached,
    greedy_logits,
    one_thread,
)

INLINE = PrefetchConfig(background=False)
ALL_EXPERTS = 64  # 4 MoE layers x 16 experts in the reference model, stored in fp32 like the model computes


class BudgetWatch:
    """Routing observer placed after the cache's: both budgets hold once every step is served."""

    def __init__(self, cache: ExpertCache) -> None:
        self.cache = cache
        self.steps = 0

    def __call__(self, layer_index: int, routing: RouterOutput) -> None:
        host_tier = self.cache.host_tier
        assert host_tier is not None
        host = host_tier.stats()
        assert self.cache.resident_bytes <= self.cache.budget_bytes
        assert host.resident_bytes <= host.allocated_bytes <= host.budget_bytes
        self.steps += 1


def run_two_tiers(model: MoEModel, prompt_ids: list[int], budget: str, host_memory: str | int,
                  prefetch: bool | PrefetchConfig = False) -> tuple[list[torch.Tensor], CacheStats, int]:
    """Greedy logits, the cache's stats and the store's bytes read, for one generation through both tiers."""
    cache = apply_expert_cache(model, budget, "lru", prefetch=prefetch, host_memory=host_memory)
    uses, watch = ExpertUses(), BudgetWatch(cache)
    for layer in model.layers:
        layer.observers += [uses, watch]
    try:
        got = greedy_logits(model, prompt_ids)
        cache.wait_for_prefetch()
        stats = cache.stats()
        store_bytes = cache.store.bytes_read
        assert cache.host_tier is not None
        host = cache.host_tier.stats()
    finally:
        for layer in model.layers:
            layer.observers.remove(uses)
            layer.observers.remove(watch)
        remove_expert_cache(model, cache)
    assert watch.steps > 0
    # Every resident load came from the host tier (a host hit) or from disk through it.
    assert stats.hits + stats.misses == uses.uses
    assert stats.loads - stats.prefetch_loads == stats.misses - stats.prefetch_waits
    assert stats.loads == stats.host_hits + stats.disk_loads
    assert (host.hits, host.loads) == (stats.host_hits, stats.disk_loads)
    assert stats.bytes_read == stats.disk_loads * REFERENCE_EXPERT_BYTES == store_bytes
    assert stats.max_resident_bytes <= stats.budget_bytes
    assert stats.max_host_resident_bytes <= stats.host_budget_bytes
    assert (stats.host_tier, stats.copier, stats.device) == ("ram", "synchronous", "cpu")
    return got, stats, store_bytes


# -- exact through two tiers --------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [False, True, INLINE], ids=["lru", "background-prefetch", "inline-prefetch"])
@pytest.mark.parametrize("host_memory", ["100%", "50%"])
def test_two_tiers_are_bit_identical_and_hold_both_budgets(model, prompt_ids, expected_logits, prefetch, host_memory):
    got, stats, _ = run_two_tiers(model, prompt_ids, "25%", host_memory, prefetch)
    assert_bit_identical(got, expected_logits)  # 33 forwards: the prefill and 32 greedy tokens
    assert stats.host_budget_bytes == int(float(host_memory[:-1]) / 100 * ALL_EXPERTS * REFERENCE_EXPERT_BYTES)
    assert stats.host_budget_bytes > stats.budget_bytes
    assert stats.misses > 0 and stats.host_hits > 0  # evicted from the slots, found again in host memory
    if host_memory == "100%":
        # Nothing leaves the host tier: each expert is read from disk at most once.
        assert stats.host_evictions == 0 and stats.disk_loads <= ALL_EXPERTS
    else:
        assert stats.host_evictions > 0
        assert stats.max_host_resident_bytes == stats.host_budget_bytes // REFERENCE_EXPERT_BYTES * REFERENCE_EXPERT_BYTES


def test_a_host_tier_of_one_expert_serializes_loads_and_stays_exact(model, prompt_ids, expected_logits):
    # The forward thread and the background loader contend for the only host buffer.
    got, stats, _ = run_two_tiers(model, prompt_ids, "25%", REFERENCE_EXPERT_BYTES, prefetch=True)
    assert_bit_identical(got, expected_logits)
    assert stats.max_host_resident_bytes == REFERENCE_EXPERT_BYTES
    assert stats.host_evictions == stats.disk_loads - 1


def test_a_second_pass_is_served_from_the_host_tier(model, prompt_ids, expected_logits):
    with cached(model, "25%", "lru", host_memory="100%") as (cache, _):
        first = greedy_logits(model, prompt_ids)
        read_by_first = cache.store.bytes_read
        cache.reset_stats()
        second = greedy_logits(model, prompt_ids)
        stats = cache.stats()
        assert cache.store.bytes_read == read_by_first  # no new disk read
    assert_bit_identical(first, expected_logits)
    assert_bit_identical(second, expected_logits)
    assert stats.loads > 0 and stats.host_hits == stats.loads
    assert stats.disk_loads == 0 and stats.bytes_read == 0
    figures = stats.to_dict()
    assert figures["host_hits"] == stats.loads and figures["disk_loads"] == 0
    assert figures["host_tier"] == "ram" and figures["host_budget_bytes"] == ALL_EXPERTS * REFERENCE_EXPERT_BYTES
    assert 0 < figures["host_resident_bytes"] <= figures["max_host_resident_bytes"] <= figures["host_budget_bytes"]


def test_bfloat16_slots_are_converted_from_the_host_tier_exactly(tmp_path):
    from moeserve.models.random_init import save_random_checkpoint

    folder = save_random_checkpoint("mixtral", tmp_path / "mixtral")  # stored in fp32
    reference = load_model(folder, dtype=torch.bfloat16, load_tokenizer=False)
    prompt = torch.randint(2, 96, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = greedy_logits(reference, prompt)
    served = load_model(folder, dtype=torch.bfloat16, load_tokenizer=False)
    with cached(served, "25%", "lru", per_layer=True, host_memory="100%") as (cache, _):
        assert cache.staging_bytes == 0  # the host buffers are where reads land
        got = greedy_logits(served, prompt)
        stats = cache.stats()
    assert_bit_identical(got, expected)
    assert stats.host_hits > 0 and stats.max_resident_bytes <= stats.budget_bytes


# -- the host tier alone --------------------------------------------------------------------------

SHAPE = ((4, 2), (2, 2), torch.float32)  # gate_up [4, 2] + down [2, 2] fp32: 48 bytes
EXPERT = 48


def test_host_tier_evicts_the_least_recently_used_expert():
    tier = HostTier(2 * EXPERT, pin=False)
    for key in ("a", "b"):
        buffer, hit = tier.acquire(key, SHAPE)
        assert not hit
        buffer.gate_up.fill_(ord(key))
        tier.release(key, buffer, None)
    buffer, hit = tier.acquire("a", SHAPE)  # "b" is now the least recently used
    assert hit and float(buffer.gate_up[0, 0]) == ord("a")
    tier.release("a", buffer, None)
    buffer, hit = tier.acquire("c", SHAPE)
    assert not hit
    tier.release("c", buffer, None)
    assert tier.holds("a") and tier.holds("c") and not tier.holds("b")
    stats = tier.stats()
    assert (stats.hits, stats.loads, stats.evictions) == (1, 3, 1)
    assert stats.resident_bytes == stats.allocated_bytes == stats.max_resident_bytes == 2 * EXPERT


def test_host_tier_never_evicts_an_expert_in_use_and_waits_for_room():
    tier = HostTier(EXPERT, pin=False)
    first, _ = tier.acquire("a", SHAPE)  # in use: being read
    acquired: list = []
    waiter = threading.Thread(target=lambda: acquired.append(tier.acquire("b", SHAPE)))
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive() and not acquired  # the only buffer is in use
    assert tier.stats().evictions == 0
    tier.release("a", first, None)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    buffer, hit = acquired[0]
    assert not hit and buffer is first  # "a" was evicted and its buffer reused
    tier.release("b", buffer, None, filled=False)  # a failed read: the expert is dropped
    stats = tier.stats()
    assert not tier.holds("a") and not tier.holds("b") and stats.resident_bytes == 0
    assert stats.allocated_bytes == EXPERT  # the buffer stays for reuse, within the budget


def test_host_tier_refuses_an_expert_larger_than_its_budget():
    with pytest.raises(ValueError, match="does not fit"):
        HostTier(EXPERT - 1, pin=False).acquire("a", SHAPE)


# -- bad input ------------------------------------------------------------------------------------


def test_pinned_buffers_are_charged_what_the_pinned_allocator_takes():
    """A pinned block is rounded up to a power of two by PyTorch's caching host allocator; plain RAM is not."""
    shape = ((320, 128), (128, 160), torch.float32)  # the reference model's expert: 245,760 bytes
    assert HostTier(10**6, pin=False).charged_bytes(shape) == 245_760
    assert HostTier(10**6, pin=True).charged_bytes(shape) == 262_144
    assert HostTier(10**6, pin=True).charged_bytes(((8, 4), (4, 4), torch.float32)) == 256  # 192 -> 256
    tier = HostTier(300_000, pin=False)
    buffer, hit = tier.acquire("a", shape)
    assert not hit and buffer.gate_up.shape == (320, 128) and buffer.down.shape == (128, 160)
    assert buffer.down.data_ptr() == buffer.gate_up.data_ptr() + 320 * 128 * 4  # one allocation, two views
    tier.release("a", buffer, None)


def test_uniform_blocks_serve_every_shape_within_one_block():
    """Uniform blocks (the pinned tier's layout, here in plain RAM): a budget of one block of the
    largest shape serves two shapes in turn by viewing the same block, and never allocates more."""
    small, large = ((8, 4), (4, 4), torch.float32), ((16, 8), (8, 8), torch.bfloat16)  # 192 and 384 bytes
    tier = HostTier(384, pin=False, shapes=[small, large], uniform=True)
    assert tier.block_bytes == 384 and tier.charged_bytes(small) == 384
    blocks = set()
    for key, shape in [("a", small), ("b", large), ("c", small), ("a", small)]:
        buffer, hit = tier.acquire(key, shape)
        assert not hit and buffer.gate_up.dtype == shape[2]
        assert buffer.gate_up.shape == shape[0] and buffer.down.shape == shape[1]
        buffer.gate_up.fill_(1)
        buffer.down.fill_(2)
        assert buffer.down.data_ptr() == buffer.gate_up.data_ptr() + buffer.gate_up.numel() * shape[2].itemsize
        blocks.add(buffer.block.data_ptr())
        tier.release(key, buffer, None)
        assert tier.stats().allocated_bytes == 384
    assert len(blocks) == 1 and tier.stats().evictions == 3
    with pytest.raises(ValueError, match="does not fit"):
        HostTier(383, pin=False, shapes=[small, large], uniform=True).acquire("a", small)


def test_host_budget_below_one_expert_is_refused_naming_the_minimum(model):
    store = ExpertStore(model.path)
    with pytest.raises(ExpertBudgetError, match=f"minimum is one expert = {REFERENCE_EXPERT_BYTES} bytes"):
        ExpertCache(store, store.layers, budget_bytes=4 * REFERENCE_EXPERT_BYTES, top_k=2,
                    host_budget_bytes=REFERENCE_EXPERT_BYTES - 1)
    with pytest.raises(ExpertBudgetError, match="minimum is one expert"):
        apply_expert_cache(model, "25%", host_memory="1KB")
    assert all(isinstance(layer.experts, ResidentExperts) for layer in model.layers)  # untouched


def test_expert_cache_config_needs_an_expert_budget_for_a_host_tier():
    from moeserve.config import ExpertCacheConfig

    with pytest.raises(ValueError, match="host memory '50%' needs an expert memory budget"):
        ExpertCacheConfig(host_memory="50%")
    with pytest.raises(ValueError, match="host memory"):
        ExpertCacheConfig(memory="25%", host_memory=" ")
    assert ExpertCacheConfig(memory="25%", host_memory="50%").host_memory == "50%"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(MoeserveError, match="torch sees no CUDA device"):
        load_model(device="cuda")
    with pytest.raises(MoeserveError, match="cpu or cuda"):
        load_model(device="tpu")


def moeserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moeserve.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_refuses_bad_tier_options_clearly():
    small = moeserve("generate", "--max-new-tokens", "2", "--expert-memory", "25%", "--host-memory", "1KB")
    assert small.returncode == 2 and "Traceback" not in small.stderr
    assert str(REFERENCE_EXPERT_BYTES) in small.stderr  # the minimum: one expert as stored
    alone = moeserve("generate", "--max-new-tokens", "2", "--host-memory", "50%")
    assert alone.returncode == 2 and "need --expert-memory" in alone.stderr
    if not torch.cuda.is_available():
        cuda = moeserve("generate", "--max-new-tokens", "2", "--device", "cuda")
        assert cuda.returncode == 2 and "no CUDA device" in cuda.stderr and "Traceback" not in cuda.stderr


def test_bench_offload_json_reports_the_host_tier():
    result = moeserve("bench", "offload", "--threads", "1", "--expert-memory", "25%", "--policies", "lru",
                      "--new-tokens", "8", "--host-memory", "100%", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["host_memory"] == "100%" and payload["device"] == "cpu"
    baseline, lru = payload["results"]
    assert baseline["host_tier"] == "none"
    assert lru["host_tier"] == "ram" and lru["identical_to_resident"]
    assert lru["host_budget_bytes"] == ALL_EXPERTS * REFERENCE_EXPERT_BYTES
    assert lru["host_hits"] + lru["disk_loads"] == lru["loads"]
    assert lru["bytes_read"] == lru["disk_loads"] * REFERENCE_EXPERT_BYTES
    assert 0 < lru["max_host_resident_bytes"] <= lru["host_budget_bytes"]


# -- the CUDA path (pinned host tier, side-stream copies) ---------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefetch", [False, True], ids=["lru", "background-prefetch"])
def test_cuda_two_tiers_are_bit_identical_to_all_resident_on_cuda(prompt_ids, dtype, prefetch):
    # Both run the per-expert loop backend on the GPU (the resident model would otherwise use
    # grouped_mm, which rounds differently): only where the weights come from differs.
    loop = MoEConfig(backend="loop")
    reference = load_model(load_tokenizer=False, device="cuda", dtype=dtype, moe=loop)
    expected = greedy_logits(reference, prompt_ids)
    served = load_model(load_tokenizer=False, device="cuda", dtype=dtype, moe=loop, load_experts=False)
    cache = apply_expert_cache(served, "25%", "lru", prefetch=prefetch, host_memory="50%")
    watch = BudgetWatch(cache)
    for layer in served.layers:
        layer.observers.append(watch)
    try:
        got = greedy_logits(served, prompt_ids)
        cache.wait_for_prefetch()
        stats = cache.stats()
        assert cache.host_tier is not None
        buffers = cache.host_tier.buffers()
        assert buffers and all(buffer.gate_up.is_pinned() and buffer.down.is_pinned() for buffer in buffers)
        assert all(view.device.type == "cuda" for view in cache.views)
    finally:
        remove_expert_cache(served, cache)
    assert_bit_identical(got, expected)
    assert (stats.host_tier, stats.copier) == ("pinned", "cuda-stream")
    assert stats.device.startswith("cuda")
    assert stats.host_hits > 0 and stats.max_resident_bytes <= stats.budget_bytes
    assert stats.max_host_resident_bytes <= stats.host_budget_bytes


@pytest.mark.gpu
def test_cuda_generate_with_two_tiers_gives_the_resident_tokens():
    from moeserve.config import SamplingConfig
    from moeserve.engine.generate import generate

    sampling = SamplingConfig(max_new_tokens=32, stop_at_eos=False)
    loop = MoEConfig(backend="loop")
    resident = generate(load_model(device="cuda", moe=loop), "def main():\n", sampling)
    served = load_model(device="cuda", moe=loop, load_experts=False)
    cache = apply_expert_cache(served, "25%", "lru", host_memory="100%")
    try:
        cached_run = generate(served, "def main():\n", sampling)
    finally:
        remove_expert_cache(served, cache)
    assert cached_run.token_ids == resident.token_ids


@pytest.mark.gpu
def test_cuda_offload_bench_runs_the_committee_and_exact_rows():
    from moeserve.bench.offload import run_offload_bench

    result = run_offload_bench(None, ["50%"], ["lru"], committee=True, committee_swaps=1, calibration_tokens=512,
                               new_tokens=16, device="cuda", host_memory="100%")
    rows = {row.policy: row for row in result.rows}
    assert result.device.startswith("cuda") and set(rows) == {"resident", "lru", "committee"}
    assert rows["lru"].identical_to_resident and rows["lru"].host_tier == "pinned"
    assert rows["committee"].served_exactly is not None and 0 < rows["committee"].served_exactly <= 1
    assert rows["committee"].max_resident_bytes <= rows["committee"].budget_bytes


@pytest.mark.gpu
def test_cuda_evaluation_and_trace_recording_match_the_cpu():
    from moeserve.models.evaluate import evaluate_tokens
    from moeserve.models.reference import reference_split_tokens
    from moeserve.traces.record import record_texts

    cpu, gpu = load_model(), load_model(device="cuda")
    tokens = reference_split_tokens(cpu.tokenizer, held_out=True, max_tokens=600)
    cpu_report, _ = evaluate_tokens(cpu, tokens, max_tokens=512)
    gpu_report, _ = evaluate_tokens(gpu, tokens, max_tokens=512)
    assert gpu_report.tokens == cpu_report.tokens
    assert abs(gpu_report.accuracy - cpu_report.accuracy) <= 0.01
    assert gpu_report.perplexity == pytest.approx(cpu_report.perplexity, rel=1e-3)
    text = ["def add(a, b):\n    return a + b\n"]
    cpu_trace, gpu_trace = record_texts(cpu, text), record_texts(gpu, text)
    agree = (cpu_trace.experts == gpu_trace.experts).mean()
    assert agree >= 0.99, f"only {agree:.3f} of routed experts agree"
