"""bench offload: exact policies reproduce the resident tokens within the budget; Belady bounds them."""

from __future__ import annotations

from moeserve.bench.offload import run_offload_bench


def test_offload_bench_rows_are_exact_and_within_budget():
    result = run_offload_bench(None, ["50%"], ["lru", "fifo"], new_tokens=8)
    baseline, *cached = result.rows
    assert baseline.policy == "resident" and baseline.budget_bytes == result.expert_bytes
    assert [row.policy for row in cached] == ["lru", "fifo"]
    for row in cached:
        assert row.identical_to_resident
        assert row.max_resident_bytes <= row.budget_bytes <= result.expert_bytes // 2
        assert row.hit_rate is not None and row.belady_hit_rate is not None
        assert 0 < row.hit_rate <= row.belady_hit_rate <= 1
    lru = cached[0]
    assert lru.belady_hit_rate >= lru.hit_rate
    assert result.to_dict()["results"][1]["policy"] == "lru"


def test_offload_bench_committee_rows_stay_within_budget():
    result = run_offload_bench(None, ["50%"], ["lru"], new_tokens=8, committee=True, calibration_tokens=512,
                               committee_warm_in=True)
    rows = {row.policy: row for row in result.rows}
    assert [row.policy for row in result.rows][-2:] == ["committee", "committee-warm-in"]
    for name in ("committee", "committee-warm-in"):
        committee = rows[name]
        assert committee.max_resident_bytes <= committee.budget_bytes
        assert committee.served_exactly is not None and 0 < committee.served_exactly <= 1
        assert 0 <= committee.token_agreement <= 1
    # Warming in, a token waits only for the top_k members each layer starts with (the cache
    # is cold); on demand, for every planned member the tokens touch.
    warm, on_demand = rows["committee-warm-in"], rows["committee"]
    model_layers, top_k = 4, 2  # the reference model
    assert warm.stalled_uses <= model_layers * top_k <= on_demand.stalled_uses
    assert all(row.token_agreement == 1.0 for row in result.rows if not row.policy.startswith("committee"))


def test_committee_warm_in_row_needs_the_committee():
    import pytest

    with pytest.raises(ValueError, match="needs committee"):
        run_offload_bench(None, ["50%"], ["lru"], new_tokens=2, committee_warm_in=True)


def test_warm_up_generation_is_left_out_of_the_row_counters(reference_model):
    from moeserve.bench.offload import DEFAULT_PROMPT, _measured_generation
    from moeserve.memory.offload import apply_expert_cache, remove_expert_cache

    counted = {}
    for warmup_tokens in (0, 6):
        cache = apply_expert_cache(reference_model, "50%", "lru")
        try:
            ids, tokens_per_s, rss = _measured_generation(reference_model, cache, DEFAULT_PROMPT, 5, 0.0, warmup_tokens)
            counted[warmup_tokens] = (ids, cache.stats())
        finally:
            remove_expert_cache(reference_model, cache)
        assert tokens_per_s > 0 and rss >= 0
    (cold_ids, cold), (warm_ids, warm) = counted[0], counted[6]
    assert warm_ids == cold_ids  # exact policy: the warm-up changes nothing in the output
    assert warm.steps == cold.steps  # the same layer calls are counted: the timed generation's only
    assert warm.hits + warm.misses == cold.hits + cold.misses


def test_offload_bench_records_its_warm_up():
    result = run_offload_bench(None, ["50%"], ["lru"], new_tokens=4, warmup_tokens=4)
    assert result.to_dict()["warmup_tokens"] == 4
    assert all(row.identical_to_resident for row in result.rows)


def test_offload_bench_committee_row_with_online_swaps():
    result = run_offload_bench(None, ["50%"], ["lru"], new_tokens=6, committee=True, calibration_tokens=512,
                               committee_swaps=1)
    committee = result.rows[-1]
    assert committee.policy == "committee" and result.to_dict()["committee_swaps"] == 1
    assert committee.max_resident_bytes <= committee.budget_bytes
    assert committee.served_exactly is not None and 0 < committee.served_exactly <= 1
