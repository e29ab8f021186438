"""``moeserve bench ep``: the command builds the config, runs both modes and reports them."""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from moeserve.cli import app


def test_bench_ep_json_reports_both_modes_and_their_ratio() -> None:
    args = ["bench", "ep", "--expert-parallel", "2", "--requests", "4", "--prompt-tokens", "4",
            "--new-tokens", "3", "--rounds", "1", "--repeats", "1", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload["median"]) == {"sync", "async"}
    for figures in payload["median"].values():
        assert figures["throughput_tokens_per_s"] > 0
        assert figures["latency_p50_s"] > 0
        assert 0 < figures["mean_balancedness"] <= 1
        # Processor time / wall time of each process: it ran some of the time, and never on more
        # processors than the machine has (gloo's threads count).
        assert 0 < figures["attention_cpu_fraction"] <= (os.cpu_count() or 1)
        assert 0 < figures["mean_expert_cpu_fraction"] <= (os.cpu_count() or 1)
    assert payload["median_async_over_sync"] > 0
    assert payload["same_tokens_every_repeat"] is True
    layers = payload["repeats"][0]["modes"]["async"]["metrics"]["layers"]
    assert len(layers) == 4 and layers[0]["queue_depth_mean"] > 0


def test_bench_ep_rejects_bad_options_before_starting_processes() -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["bench", "ep", "--mode", "barrier"]).exit_code == 2
    assert runner.invoke(app, ["bench", "ep", "--expert-parallel", "1"]).exit_code == 2
    assert runner.invoke(app, ["bench", "ep", "--scheduler", "nope"]).exit_code == 2
