"""``bench serve``'s load generator against a live moeserve server (real HTTP, real streaming)."""

from __future__ import annotations

import asyncio

from moeserve.bench.serve import MALFORMED_BODIES, LoadConfig, default_text_files, make_prompts, run_load


def test_prompts_come_from_real_text_with_spread_lengths():
    config = LoadConfig(requests=40, prompt_chars_median=300, max_tokens_median=32, seed=5)
    specs = make_prompts(default_text_files(), config, 40)
    assert specs == make_prompts(default_text_files(), config, 40)  # seeded
    lengths = sorted(len(s.prompt) for s in specs)
    assert lengths[0] < 300 < lengths[-1] and all(len(s.prompt) > 0 for s in specs)
    assert len({s.max_tokens for s in specs}) > 5 and all(1 <= s.max_tokens <= config.max_max_tokens for s in specs)


def test_run_load_reports_throughput_latencies_and_checks_malformed_requests(server_url):
    config = LoadConfig(requests=12, concurrency=4, prompt_chars_median=200, max_tokens_median=8, max_max_tokens=16,
                        warmup=1, malformed=len(MALFORMED_BODIES), ignore_eos=True)
    specs = make_prompts(default_text_files(), config, config.warmup_total + config.requests)
    result = asyncio.run(run_load(server_url, "tiny-moe", specs, config))
    assert result["completed"] == 12 and result["errors"] == 0 and result["server_errors_5xx"] == 0
    assert result["duplicate_response_ids"] == 0
    assert result["output_tokens"] == sum(s.max_tokens for s in specs[config.warmup_total :])  # ignore_eos: exactly max_tokens
    assert config.warmup_total == 1 + 4  # one sequential request, then one wave of `concurrency`
    assert result["output_throughput_tokens_per_s"] > 0
    for section in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert 0 < result[section]["p50"] <= result[section]["p99"]
    assert result["malformed"]["answered_4xx"] == result["malformed"]["sent"] == len(MALFORMED_BODIES)
    assert result["health_checks"]["failed"] == 0
    assert result["server_rss_bytes"]["after_warmup"] > 0 and result["server_rss_bytes"]["end"] > 0
