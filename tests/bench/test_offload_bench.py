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


def test_offload_bench_committee_row_stays_within_budget():
    result = run_offload_bench(None, ["50%"], ["lru"], new_tokens=8, committee=True, calibration_tokens=512)
    committee = result.rows[-1]
    assert committee.policy == "committee"
    assert committee.max_resident_bytes <= committee.budget_bytes
    assert committee.served_exactly is not None and 0 < committee.served_exactly <= 1
    assert 0 <= committee.token_agreement <= 1
    assert all(row.token_agreement == 1.0 for row in result.rows if row.policy != "committee")
