"""Placement policies on hand-made loads with known answers, and on the real DeepSeek trace."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moeserve.placement.balance import (
    balancedness,
    choose_replica_shortest_queue,
    coactivation,
    expert_loads,
    greedy_placement,
    logical_to_physical,
    place_physical_experts,
    plan_placement,
    rank_loads,
    refine_anticorrelated,
    replicate,
    same_rank_coactivation,
    step_balancedness,
)
from moeserve.traces.format import Trace, TraceMeta, load_trace


def make_trace(experts: list | np.ndarray, offsets: list[int], num_experts: int) -> Trace:
    ids = np.asarray(experts, dtype=np.int16)
    meta = TraceMeta(
        model="test/tiny", num_experts=num_experts, top_k=ids.shape[2], phase="decode", source="unit test"
    )
    return Trace(experts=ids, offsets=np.array(offsets, dtype=np.int64), meta=meta)


def random_trace(num_tokens: int, num_layers: int, num_experts: int, top_k: int, seed: int = 0) -> Trace:
    """Skewed (Zipf-like) routing, one sequence per 10 tokens."""
    generator = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_experts + 1)
    experts = np.empty((num_tokens, num_layers, top_k), dtype=np.int16)
    for token, layer in itertools.product(range(num_tokens), range(num_layers)):
        experts[token, layer] = generator.choice(
            num_experts, size=top_k, replace=False, p=popularity / popularity.sum()
        )
    offsets = list(range(0, num_tokens, 10)) + [num_tokens]
    return make_trace(experts, offsets, num_experts)


def busiest(loads: list[float], expert2rank: np.ndarray, num_ranks: int) -> float:
    return float(rank_loads(np.array(loads, dtype=float), expert2rank, num_ranks).max())


def optimum(loads: list[float], num_ranks: int, capacity: int) -> float:
    """Brute force: the lightest possible busiest rank with at most ``capacity`` experts a rank."""
    assignments = np.array(list(itertools.product(range(num_ranks), repeat=len(loads))))  # [A, E]
    on_rank = assignments[:, :, None] == np.arange(num_ranks)  # [A, E, R]
    fits = on_rank.sum(axis=1).max(axis=1) <= capacity  # [A]
    busiest_load = (on_rank * np.array(loads, dtype=float)[None, :, None]).sum(axis=1).max(axis=1)  # [A]
    return float(busiest_load[fits].min())


# ---------------------------------------------------------------- statistics of a trace


def test_expert_loads_and_coactivation_count_tokens_and_skip_unknown():
    # E=4, k=3, L=1; the third token names expert 2 twice (counted once as a pair).
    trace = make_trace([[[0, 1, -1]], [[0, 1, 2]], [[2, 2, 3]]], [0, 3], num_experts=4)
    np.testing.assert_array_equal(expert_loads(trace), [[2, 2, 3, 1]])
    pairs = coactivation(trace)[0]
    expected = np.zeros((4, 4), dtype=np.int64)
    for first, second, count in [(0, 1, 2), (0, 2, 1), (1, 2, 1), (2, 3, 1)]:
        expected[first, second] = expected[second, first] = count
    np.testing.assert_array_equal(pairs, expected)


# ---------------------------------------------------------------- balancedness


def test_balancedness_is_mean_over_max():
    assert balancedness(np.array([3.0, 3.0, 3.0])) == 1.0
    assert balancedness(np.array([4, 0, 0, 0])) == 0.25
    assert balancedness(np.array([2.0, 1.0, 1.0, 0.0])) == pytest.approx(0.5)
    assert math.isnan(balancedness(np.zeros(4)))


def test_step_balancedness_charges_each_step_its_busiest_rank():
    # Two steps of two tokens (k=1) on 2 ranks: step 0 all on rank 0, step 1 one each.
    token_ranks = np.array([[0], [0], [0], [1]])
    # mean loads per step: 1 + 1; busiest: 2 + 1.
    assert step_balancedness(token_ranks, num_ranks=2, step_tokens=2) == pytest.approx(2 / 3)
    # One step of all four tokens: loads 3 and 1.
    assert step_balancedness(token_ranks, num_ranks=2, step_tokens=4) == pytest.approx(2 / 3)
    assert step_balancedness(np.array([[0], [1], [0], [1]]), 2, 2) == 1.0


# ---------------------------------------------------------------- greedy placement


@pytest.mark.parametrize(
    ("loads", "num_ranks", "expected_busiest"),
    [
        ([8, 7, 6, 5], 2, 13),  # {8, 5} and {7, 6}
        ([10, 1, 1, 1, 1, 1], 2, 12),  # three slots a rank: 10 must share with two ones
        ([5, 5, 4, 4, 3, 3], 3, 8),  # pairs {5, 3}, {5, 3}, {4, 4}
        ([9, 2, 2, 2, 2, 2, 2, 3], 4, 11),
    ],
)
def test_greedy_reaches_the_known_optimum(loads, num_ranks, expected_busiest):
    expert2rank = greedy_placement(np.array(loads, dtype=float), num_ranks)
    capacity = -(-len(loads) // num_ranks)
    assert optimum(loads, num_ranks, capacity) == expected_busiest
    assert busiest(loads, expert2rank, num_ranks) == expected_busiest
    assert np.bincount(expert2rank, minlength=num_ranks).max() == capacity


def test_greedy_gives_every_rank_the_same_expert_count_when_ranks_divide_experts():
    loads = np.random.default_rng(1).uniform(1.0, 3.0, size=64)
    expert2rank = greedy_placement(loads, 8)
    np.testing.assert_array_equal(np.bincount(expert2rank, minlength=8), [8] * 8)
    assert balancedness(rank_loads(loads, expert2rank, 8)) > 0.98


def test_greedy_capacity_per_rank_allows_uneven_counts():
    expert2rank = greedy_placement(np.array([10.0, 1, 1, 1, 1, 1]), 2, capacity_per_rank=6)
    assert busiest([10, 1, 1, 1, 1, 1], expert2rank, 2) == 10
    np.testing.assert_array_equal(np.bincount(expert2rank, minlength=2), [1, 5])


# ---------------------------------------------------------------- anti-correlation


def test_refine_separates_a_pair_that_always_cofires():
    loads = np.array([5.0, 5.0, 5.0, 5.0])
    pairs = np.zeros((4, 4))
    pairs[0, 1] = pairs[1, 0] = 100.0  # 0 and 1 always fire together
    pairs[2, 3] = pairs[3, 2] = 1.0
    start = np.array([0, 0, 1, 1])
    assert same_rank_coactivation(start, pairs) == 101.0
    refined = refine_anticorrelated(start, loads, pairs, iterations=10)
    assert refined[0] != refined[1]
    assert same_rank_coactivation(refined, pairs) == 0.0
    np.testing.assert_array_equal(np.bincount(refined, minlength=2), [2, 2])
    np.testing.assert_array_equal(start, [0, 0, 1, 1])  # input untouched


def test_refine_keeps_the_busiest_rank_within_tolerance():
    loads = np.array([3.0, 3.0, 1.0, 5.0])  # ranks {0, 1} and {2, 3}: 6 and 6
    pairs = np.zeros((4, 4))
    pairs[0, 1] = pairs[1, 0] = 100.0
    start = np.array([0, 0, 1, 1])
    # Every swap that separates 0 and 1 makes a rank carry 8.
    np.testing.assert_array_equal(refine_anticorrelated(start, loads, pairs, 10, load_tolerance=0.0), start)
    refined = refine_anticorrelated(start, loads, pairs, 10, load_tolerance=0.34)
    assert refined[0] != refined[1]
    assert busiest([3, 3, 1, 5], refined, 2) <= 6 * 1.34


def test_refine_never_moves_a_replica_onto_a_rank_holding_its_twin():
    # Physical 0 and 1 are replicas of one expert; pulling 2 away from 3 would co-locate them.
    loads = np.ones(4)
    pairs = np.zeros((4, 4))
    pairs[2, 3] = pairs[3, 2] = 50.0
    start = np.array([0, 1, 1, 0])  # ranks: {0, 3} and {1, 2}
    groups = np.array([7, 7, 8, 9])
    refined = refine_anticorrelated(start, loads, pairs, 10, groups=groups)
    assert refined[0] != refined[1]
    assert refined[2] != refined[3]


# ---------------------------------------------------------------- replication


def test_replicate_gives_the_hottest_expert_the_replicas():
    phy2log, count = replicate(np.array([100.0, 10, 10, 10]), num_ranks=4, num_replicas=2)
    np.testing.assert_array_equal(phy2log, [0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(count, [3, 1, 1, 1])


def test_replicate_goes_by_load_per_replica_and_caps_at_one_per_rank():
    # Two ranks: expert 0 can have two copies at most; the next slot goes to the next hottest.
    phy2log, count = replicate(np.array([100.0, 10, 30, 10]), num_ranks=2, num_replicas=2)
    np.testing.assert_array_equal(phy2log, [0, 1, 2, 3, 0, 2])
    np.testing.assert_array_equal(count, [2, 1, 2, 1])


def test_physical_placement_spreads_replicas_and_balances_per_replica_load():
    loads = np.array([160.0, 40, 20, 20, 20, 20, 20, 20])
    # Expert 0 takes copies while its load per copy (80, 53, 40) beats the rest, up to one per
    # rank; the last extra slot goes to expert 1.
    phy2log, count = replicate(loads, num_ranks=4, num_replicas=4)
    np.testing.assert_array_equal(count, [4, 2, 1, 1, 1, 1, 1, 1])
    physical2rank = place_physical_experts(phy2log, loads, num_ranks=4)
    np.testing.assert_array_equal(np.sort(physical2rank[phy2log == 0]), [0, 1, 2, 3])
    assert len(set(physical2rank[phy2log == 1])) == 2
    np.testing.assert_array_equal(np.bincount(physical2rank, minlength=4), [3, 3, 3, 3])
    per_replica = loads[phy2log] / count[phy2log]
    np.testing.assert_allclose(rank_loads(per_replica, physical2rank, 4), [80, 80, 80, 80])


def test_logical_to_physical_lists_replicas_in_order():
    log2phy = logical_to_physical(np.array([0, 1, 2, 0, 2, 0]), num_experts=3)
    np.testing.assert_array_equal(log2phy, [[0, 3, 5], [1, -1, -1], [2, 4, -1]])


def test_shortest_queue_spreads_a_hot_experts_tokens():
    # Expert 0 has replicas 0 (rank 0) and 2 (rank 1); expert 1 lives on rank 0.
    log2phy = np.array([[0, 2], [1, -1]])
    physical2rank = np.array([0, 0, 1])
    hot = np.zeros((10, 1), dtype=np.int64)
    chosen = choose_replica_shortest_queue(hot, log2phy, physical2rank)
    np.testing.assert_array_equal(chosen[:, 0], [0, 2] * 5)
    # Rank 0 already busy with expert 1: expert 0's tokens go to rank 1 until queues even out.
    mixed = np.array([[1, 0], [1, 0], [0, -1], [0, -1]])
    chosen = choose_replica_shortest_queue(mixed, log2phy, physical2rank)
    np.testing.assert_array_equal(chosen, [[1, 2], [1, 2], [0, -1], [2, -1]])
    # Queues start empty every step: with one-token steps the tie always goes to the first.
    chosen = choose_replica_shortest_queue(hot, log2phy, physical2rank, step_tokens=1)
    np.testing.assert_array_equal(chosen[:, 0], [0] * 10)


# ---------------------------------------------------------------- the entry point


def test_plan_placement_splits_by_sequence_and_accounts_for_every_assignment():
    trace = random_trace(num_tokens=200, num_layers=2, num_experts=16, top_k=2)
    plan = plan_placement(trace, num_ranks=4, num_replicas=4)
    assert (plan.train_sequences, plan.held_out_sequences) == (10, 10)
    assert (plan.train_tokens, plan.held_out_tokens) == (100, 100)
    for layer in plan.layers:
        assert layer.expert2rank.shape == (16,)
        assert layer.phy2log.shape == layer.physical2rank.shape == (20,)
        np.testing.assert_array_equal(np.bincount(layer.physical2rank, minlength=4), [5] * 4)
        for loads in (layer.fitted_rank_loads, layer.fitted_rank_loads_replicated):
            assert loads.sum() == pytest.approx(100 * 2)
        for loads in (layer.held_out_rank_loads, layer.held_out_rank_loads_replicated):
            assert loads.sum() == 100 * 2
        assert layer.fitted_balancedness_replicated >= layer.fitted_balancedness - 1e-9
        assert layer.held_out_step_balancedness <= layer.held_out_balancedness + 1e-9


def test_plan_without_replicas_uses_one_placement_and_without_held_out_reports_nan():
    trace = random_trace(num_tokens=60, num_layers=1, num_experts=8, top_k=2)
    plan = plan_placement(trace, num_ranks=2, train_fraction=1.0)
    (layer,) = plan.layers
    np.testing.assert_array_equal(layer.phy2log, np.arange(8))
    np.testing.assert_array_equal(layer.physical2rank, layer.expert2rank)
    assert plan.held_out_tokens == 0
    assert math.isnan(plan.mean_held_out_balancedness)
    assert math.isnan(plan.mean_held_out_step_balancedness_replicated)
    assert plan.mean_fitted_balancedness == layer.fitted_balancedness


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: greedy_placement(np.ones(4), 0), "num_ranks must be an integer >= 1, got 0"),
        (lambda: greedy_placement(np.ones(4), True), "num_ranks must be an integer >= 1, got True"),
        (lambda: greedy_placement(np.ones(4), 5), "num_ranks is 5, more than the 4 experts"),
        (lambda: greedy_placement(np.ones(4), 2, capacity_per_rank=1), "cannot hold 4 experts"),
        (lambda: greedy_placement(np.array([1.0, -2.0]), 1), r"loads\[1\] is -2.0"),
        (lambda: balancedness(np.array([])), "rank_loads must be a non-empty 1-D array"),
        (lambda: replicate(np.ones(4), 2, -1), "num_replicas must be an integer >= 0, got -1"),
        (lambda: replicate(np.ones(4), 2, 5), "num_replicas is 5, but 4 experts on 2 ranks take at most 4"),
        (lambda: replicate(np.ones(2), 4, 1), "num_ranks is 4, more than the 3 physical experts"),
        (lambda: place_physical_experts(np.array([0, 0]), np.ones(2), 1), "gives expert 1 no physical slot"),
        (
            lambda: choose_replica_shortest_queue(np.array([[0, 9]]), np.array([[0], [1]]), np.array([0, 1])),
            r"token 0 slot 1 names expert 9; ids must be in \[0, 2\)",
        ),
        (lambda: refine_anticorrelated(np.array([0, 1]), np.ones(2), np.ones((3, 3))), r"shape \(2, 2\)"),
        (lambda: step_balancedness(np.array([[0]]), 1, 0), "step_tokens must be an integer >= 1"),
    ],
)
def test_bad_input_to_policies_raises_naming_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_ranks": 0}, "num_ranks must be an integer >= 1, got 0"),
        ({"num_ranks": 9}, "num_ranks is 9, more than the 8 experts per layer"),
        ({"num_ranks": 2, "num_replicas": -1}, "num_replicas must be an integer >= 0, got -1"),
        ({"num_ranks": 2, "num_replicas": 9}, "num_replicas is 9, but 8 experts on 2 ranks take at most 8"),
        ({"num_ranks": 2, "train_fraction": 0.0}, r"train_fraction must be a number in \(0, 1\], got 0.0"),
        ({"num_ranks": 2, "train_fraction": 1.5}, r"train_fraction must be a number in \(0, 1\], got 1.5"),
        ({"num_ranks": 2, "step_tokens": 0}, "step_tokens must be an integer >= 1, got 0"),
    ],
)
def test_bad_plan_options_raise_naming_the_value(options, message):
    trace = random_trace(num_tokens=20, num_layers=1, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match=message):
        plan_placement(trace, **options)


def test_plan_refuses_a_training_part_without_routing():
    trace = make_trace(np.full((4, 1, 2), -1), [0, 2, 4], num_experts=4)
    with pytest.raises(ValueError, match="training part .* has no routed tokens"):
        plan_placement(trace, num_ranks=2)


# ---------------------------------------------------------------- the real DeepSeek trace


@pytest.fixture(scope="module")
def deepseek_layers(shared_dir) -> Trace:
    """The DeepSeek-V2-Lite trace, every fifth MoE layer (0, 5, ..., 25) to keep the test fast."""
    trace = load_trace(shared_dir / "traces" / "deepseek-v2-lite-puffin-a.npz")
    return Trace(experts=trace.experts[:, ::5], offsets=trace.offsets, meta=trace.meta)


def test_deepseek_held_out_balance_with_replication_reaches_the_bar(deepseek_layers):
    plain = plan_placement(deepseek_layers, num_ranks=8, num_replicas=0, anticorrelation=False)
    plan = plan_placement(deepseek_layers, num_ranks=8, num_replicas=8)
    assert plan.mean_held_out_balancedness_replicated >= 0.9
    assert plan.mean_held_out_balancedness_replicated > plain.mean_held_out_balancedness
    assert plan.mean_held_out_step_balancedness_replicated > plain.mean_held_out_step_balancedness
    # Fitted figures flatter: the held-out part is what a deployment would see.
    assert plan.mean_fitted_balancedness_replicated > plan.mean_held_out_balancedness_replicated


def test_deepseek_anticorrelation_keeps_cofiring_experts_apart_on_held_out_tokens(deepseek_layers):
    plain = plan_placement(deepseek_layers, num_ranks=8, anticorrelation=False)
    refined = plan_placement(deepseek_layers, num_ranks=8, anticorrelation=True)
    random_share = (64 / 8 - 1) / (64 - 1)
    assert plain.mean_held_out_same_rank_pair_share == pytest.approx(random_share, abs=0.01)
    assert refined.mean_held_out_same_rank_pair_share < 0.8 * random_share
    assert refined.mean_held_out_step_balancedness > plain.mean_held_out_step_balancedness
