"""Eviction policies and the cache simulator on hand-made streams with known answers, and on real traces.

Hand-made counts follow the textbook stream 1 2 3 4 1 2 5 1 2 3 4 5 with 3 frames (FIFO 9 faults,
LRU 10, OPT 7). Assertions are on hit counts, never timings.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pytest

from moeserve.memory.cache_sim import (
    NEVER,
    PolicyContractError,
    check_capacity,
    lru_stack_distances,
    replay,
    simulate,
)
from moeserve.memory.policies import (
    EVICTION_POLICIES,
    SCAN_LIMIT,
    EvictionPolicy,
    LRFUPolicy,
    reuse_scores,
)
from moeserve.traces.format import Trace, TraceMeta, load_trace

SHARED = Path(__file__).resolve().parents[3] / "shared"
DEEPSEEK = SHARED / "traces" / "deepseek-v2-lite-puffin-a.npz"
ONLINE = [name for name in EVICTION_POLICIES.names() if EVICTION_POLICIES.get(name).online]

TEXTBOOK = [[key] for key in (1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5)]


def hits_of(
    policy_name: str, steps: Sequence[Sequence[int]], capacity: int, num_streams: int = 1
) -> list[int]:
    return replay(steps, EVICTION_POLICIES.get(policy_name)(capacity, num_streams), capacity)


def random_steps(rng: np.random.Generator, num_steps: int, num_keys: int, width: int, skew: float = 1.0):
    """Steps of ``width`` distinct keys drawn with Zipf-like popularity (skew 0 = uniform)."""
    popularity = 1.0 / np.arange(1, num_keys + 1) ** skew
    popularity /= popularity.sum()
    return [rng.choice(num_keys, size=width, replace=False, p=popularity).tolist() for _ in range(num_steps)]


def random_trace(seed: int, tokens: int = 300, layers: int = 3, experts: int = 8, top_k: int = 2) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.stack(
        [np.stack([rng.permutation(experts)[:top_k] for _ in range(layers)]) for _ in range(tokens)]
    ).astype(np.int16)  # [T, L, K]
    cuts = np.sort(rng.choice(np.arange(1, tokens), size=3, replace=False))
    offsets = np.concatenate([[0], cuts, [tokens]]).astype(np.int64)
    meta = TraceMeta(
        model="test/random", num_experts=experts, top_k=top_k, phase="decode", source="unit test"
    )
    return Trace(experts=ids, offsets=offsets, meta=meta)


# -- known answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected_hits"),
    [("lru", 2), ("fifo", 3), ("belady", 5), ("lifo", 4), ("lfu", 2)],
)
def test_textbook_stream_hit_counts(policy: str, expected_hits: int) -> None:
    # LIFO: keeps 1 and 2 from the start and hits them twice each. LFU (ties by least recent):
    # evicts 1, 2, 3, 4 in turn, then holds 1 and 2 (hits at steps 7, 8) while 3, 4, 5 churn.
    assert sum(hits_of(policy, TEXTBOOK, 3)) == expected_hits


def test_textbook_stream_which_steps_hit() -> None:
    assert hits_of("lru", TEXTBOOK, 3) == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert hits_of("fifo", TEXTBOOK, 3) == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1]
    assert hits_of("belady", TEXTBOOK, 3) == [0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1]
    assert hits_of("lifo", TEXTBOOK, 3) == [0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0]


def test_lfu_keeps_the_popular_key_that_lru_drops() -> None:
    # Key 0 is used often early, then a scan of new keys passes by: LRU forgets 0, LFU keeps it.
    steps = [[0], [1], [0], [2], [0], [3], [4], [5], [0]]
    assert hits_of("lfu", steps, 2)[-1] == 1
    assert hits_of("lru", steps, 2)[-1] == 0


def test_lrfu_spans_lru_and_lfu() -> None:
    rng = np.random.default_rng(3)
    steps = random_steps(rng, 400, 12, 1, skew=1.2)
    like_lru = replay(steps, LRFUPolicy(4, half_life=1e-3), 4)
    like_lfu = replay(steps, LRFUPolicy(4, half_life=1e300), 4)
    assert like_lru == hits_of("lru", steps, 4)
    assert like_lfu == hits_of("lfu", steps, 4)


def test_multi_key_steps_known_counts() -> None:
    # Capacity 3, steps of 2. LRU: {0,1} -> {0,1,2} (hit 0) -> {0,2,3}: evicts 1 (hit 0) -> hit 2, 3.
    steps = [[0, 1], [0, 2], [3, 0], [2, 3]]
    assert hits_of("lru", steps, 3) == [0, 1, 1, 2]
    # FIFO evicts the first inserted unpinned: at step 2 that is 1 (0 is pinned).
    assert hits_of("fifo", steps, 3) == [0, 1, 1, 2]
    # LIFO evicts the newest unpinned: at step 2 that is 2, so step 3 misses 2.
    assert hits_of("lifo", steps, 3) == [0, 1, 1, 1]
    assert hits_of("belady", steps, 3) == [0, 1, 1, 2]


# -- pinning and the contract -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", EVICTION_POLICIES.names())
def test_pinned_keys_of_the_current_step_are_never_evicted(policy: str) -> None:
    # Crafted so that every policy's unconstrained choice is a pinned key at least once:
    # LRU/LFU/LRFU: 0 is oldest and least used when requested again; LIFO/FIFO: 1 is newest/oldest.
    crafted = [[0, 1], [1, 2], [0, 1], [2, 3], [3, 0], [1, 2]]
    replay(crafted, EVICTION_POLICIES.get(policy)(2), 2)
    rng = np.random.default_rng(0)
    for capacity in (3, 4, 6):
        steps = random_steps(rng, 300, 10, 3, skew=1.0)
        # replay raises PolicyContractError on any pinned or non-resident victim.
        hits = hits_of(policy, steps, capacity)
        assert len(hits) == len(steps)
    # The many-key path (heap or numpy) too, in a shared cache.
    steps = random_steps(rng, 600, 3 * SCAN_LIMIT, 3)
    hits_of(policy, steps, SCAN_LIMIT + 6, num_streams=3)


class _EvictsPinned(EvictionPolicy):
    """A broken policy: evicts the first key of the current step."""

    def evict(self, count: int, pinned: Collection[int], time: int) -> list[int]:
        return list(pinned)[:count]

    def on_step(self, keys: Sequence[int], loaded: Collection[int], time: int) -> None:
        pass


def test_replay_rejects_a_policy_that_evicts_a_pinned_key() -> None:
    with pytest.raises(PolicyContractError, match="needed by the current step"):
        replay([[0, 1], [0, 2]], _EvictsPinned(2), 2)


def test_replay_rejects_a_step_wider_than_the_cache() -> None:
    with pytest.raises(ValueError, match="more than capacity 2"):
        replay([[0, 1], [2, 3, 4]], EVICTION_POLICIES.get("lru")(2), 2)


@pytest.mark.parametrize("scope", ["per-layer", "global"])
def test_capacity_below_top_k_or_above_num_experts_is_rejected(scope: str) -> None:
    trace = random_trace(0, top_k=3)
    with pytest.raises(ValueError, match="below the minimum 3"):
        simulate(trace, "lru", 2, scope)
    with pytest.raises(ValueError, match="maximum is 8"):
        simulate(trace, "lru", 9, scope)
    check_capacity(3, 8, 3)


def test_unknown_policy_and_scope_are_rejected() -> None:
    trace = random_trace(0)
    with pytest.raises(KeyError, match="known: belady"):
        simulate(trace, "random", 4)
    with pytest.raises(ValueError, match="known: per-layer, global"):
        simulate(trace, "lru", 4, scope="device")


# -- properties -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_belady_beats_every_online_policy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for capacity, width, skew in ((3, 1, 0.0), (4, 2, 1.0), (6, 3, 0.7), (5, 4, 1.3)):
        steps = random_steps(rng, 300, 12, width, skew)
        best = sum(hits_of("belady", steps, capacity))
        for policy in ONLINE:
            assert sum(hits_of(policy, steps, capacity)) <= best, (policy, capacity, width)


@pytest.mark.parametrize("scope", ["per-layer", "global"])
def test_belady_beats_every_online_policy_on_a_trace(scope: str) -> None:
    trace = random_trace(5, tokens=200)
    best = simulate(trace, "belady", 4, scope).hits.sum()
    for policy in ONLINE:
        assert simulate(trace, policy, 4, scope).hits.sum() <= best, policy


@pytest.mark.parametrize("scope", ["per-layer", "global"])
@pytest.mark.parametrize("policy", EVICTION_POLICIES.names())
def test_every_expert_resident_misses_only_cold(policy: str, scope: str) -> None:
    trace = random_trace(1, tokens=120)
    result = simulate(trace, policy, trace.meta.num_experts, scope)
    np.testing.assert_array_equal(result.misses, result.cold_misses)
    assert result.warm_hit_rate == 1.0
    assert result.cold_misses.tolist() == [8, 8, 8]  # every expert of every layer seen once


def test_counts_add_up_with_unknown_and_repeated_ids() -> None:
    trace = random_trace(2, tokens=100)
    experts = trace.experts.copy()
    experts[::7, 0, 1] = -1  # unknown routing requests nothing
    experts[::5, 1, 1] = experts[::5, 1, 0]  # a repeated id is requested once
    trace = Trace(experts=experts, offsets=trace.offsets, meta=trace.meta)
    expected_requests = np.array([200 - len(range(0, 100, 7)), 200 - len(range(0, 100, 5)), 200])
    for policy in ("lru", "belady", "predicted-reuse"):
        result = simulate(trace, policy, 3)
        np.testing.assert_array_equal(result.requests, expected_requests)
        assert result.overall_hit_rate == result.hits.sum() / expected_requests.sum()


def test_warmup_counts_only_later_tokens() -> None:
    trace = random_trace(3)
    full = simulate(trace, "lru", 4)
    split = simulate(trace, "lru", 4, warmup_sequences=2)
    assert split.warmup_tokens == int(trace.offsets[2])
    assert split.evaluated_tokens == trace.num_tokens - split.warmup_tokens
    assert split.requests.sum() == split.evaluated_tokens * trace.num_layers * 2
    assert split.hits.sum() <= full.hits.sum()
    with pytest.raises(ValueError, match="warmup_sequences 9"):
        simulate(trace, "lru", 4, warmup_sequences=9)


@pytest.mark.parametrize("policy", ONLINE)
def test_online_policies_do_not_see_the_future(policy: str) -> None:
    # Same first 900 steps, different futures: the hits of those steps must not change. 1500
    # steps make predicted-reuse refit its model several times (chunks of 512).
    rng = np.random.default_rng(11)
    prefix = random_steps(rng, 900, 16, 2, skew=1.0)
    future_a = random_steps(rng, 600, 16, 2, skew=1.0)
    future_b = random_steps(rng, 600, 16, 2, skew=0.0)
    hits_a = hits_of(policy, prefix + future_a, 5)
    hits_b = hits_of(policy, prefix + future_b, 5)
    assert hits_a[:900] == hits_b[:900]


def test_reuse_scores_are_causal() -> None:
    rng = np.random.default_rng(4)
    ids = np.array(random_steps(rng, 1400, 10, 2))
    other = ids.copy()
    other[1000:] = np.array(random_steps(rng, 400, 10, 2))
    np.testing.assert_array_equal(reuse_scores(ids, 10)[:1000], reuse_scores(other, 10)[:1000])


# -- the LRU fast path against replay (its plain reference) -----------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_lru_stack_distances_match_replay(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(25):
        num_keys = int(rng.integers(3, 80))  # past 64: more than one bitset word
        width = int(rng.integers(1, min(num_keys, 5) + 1))
        ids = np.array(random_steps(rng, int(rng.integers(1, 60)), num_keys, width, skew=1.0))
        ids[rng.random(ids.shape) < 0.2] = -1
        steps = [[key for key in row if key >= 0] for row in ids.tolist()]
        distances = lru_stack_distances(ids, num_keys)
        assert (distances[ids < 0] == NEVER).all()
        for capacity in range(width, num_keys + 1, max(1, num_keys // 6)):
            expected = hits_of("lru", steps, capacity)
            assert (distances < capacity).sum(axis=1).tolist() == expected, (capacity, ids.tolist())


def test_simulate_lru_fast_path_equals_replay() -> None:
    trace = random_trace(6, tokens=250)
    result = simulate(trace, "lru", 3)
    for layer in range(trace.num_layers):
        steps = trace.experts[:, layer, :].astype(np.int64).tolist()
        assert result.hits[layer] == sum(hits_of("lru", steps, 3))


# -- the real DeepSeek-V2-Lite trace --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepseek() -> Trace:
    if not DEEPSEEK.is_file():
        pytest.skip(f"{DEEPSEEK} is absent (../shared exists in the project's CI, not in a user's clone)")
    return load_trace(DEEPSEEK)


def test_deepseek_lru_hit_rates(deepseek: Trace) -> None:
    # The shared README's 0.20 / 0.37 / 0.44 / 0.69 replay requests one at a time, so a load may
    # evict an expert the same token still needs; with a token's top-6 resident together (this
    # simulator) LRU does better, most at 6 slots where only the previous token's set survives.
    readme = {6: 0.20, 12: 0.37, 16: 0.44, 32: 0.69}
    pinned = {6: 0.2648, 12: 0.3964, 16: 0.4698, 32: 0.7051}
    hits = dict.fromkeys(readme, 0)
    requests = 0
    for layer in range(deepseek.num_layers):
        ids = deepseek.experts[:, layer, :].astype(np.int64)
        distances = lru_stack_distances(ids, deepseek.meta.num_experts)
        requests += ids.size
        for capacity in readme:
            hits[capacity] += int((distances < capacity).sum())
    for capacity, expected in pinned.items():
        rate = hits[capacity] / requests
        assert rate == pytest.approx(expected, abs=5e-4)
        assert readme[capacity] - 0.01 <= rate <= readme[capacity] + 0.07
    # At 6 slots (= top_k) every policy keeps exactly the previous token's experts: 0.267 shared.
    assert hits[6] / requests == pytest.approx(0.267, abs=0.003)


def test_deepseek_predicted_reuse_beats_lru_and_lrfu(deepseek: Trace) -> None:
    # A slice keeps this fast: layers 0 and 13, the first 6000 tokens; capacity 16 of 64. (Whole
    # trace: LRU 0.470, LRFU 0.499, predicted-reuse 0.521, Belady 0.662.)
    part = Trace(
        experts=deepseek.experts[:6000, ::13].copy(),
        offsets=np.append(deepseek.offsets[deepseek.offsets < 6000], 6000),
        meta=deepseek.meta,
    )
    rates = {
        policy: simulate(part, policy, 16).overall_hit_rate for policy in ("lru", "lrfu", "predicted-reuse")
    }
    assert rates["lrfu"] > rates["lru"] + 0.03
    assert rates["predicted-reuse"] > rates["lrfu"] + 0.005
