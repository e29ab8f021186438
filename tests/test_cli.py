"""The command line, run as a real subprocess: JSON outputs carry the documented keys and values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MOESERVE = [sys.executable, "-m", "moeserve.cli"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*MOESERVE, *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {result.stderr}")
    return result


def test_generate_json():
    payload = json.loads(run("generate", "--prompt", "import sys\n", "--max-new-tokens", "8", "--json").stdout)
    assert payload["new_tokens"] <= 8 and payload["prompt_tokens"] > 0
    assert payload["tokens_per_s"] > 0 and payload["time_to_first_token_s"] > 0
    assert isinstance(payload["text"], str)
    assert len(payload["routing"]["layers"]) == 4 and payload["routing"]["num_experts"] == 16


def test_generate_with_expert_workers_gives_the_same_tokens():
    args = ("generate", "--prompt", "class Parser:", "--max-new-tokens", "8", "--threads", "1", "--json")
    plain = json.loads(run(*args).stdout)
    parallel = json.loads(run(*args, "--expert-parallel", "2").stdout)
    assert parallel["token_ids"] == plain["token_ids"]
    rows = parallel["expert_parallel"]["worker_rows"]
    assert len(rows) == 4 and all(sum(layer) > 0 for layer in rows)


def test_trace_record_then_stats(tmp_path: Path):
    text = tmp_path / "input.py"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 40)
    out = tmp_path / "trace.npz"
    run("trace", "record", "--text", str(text), "--out", str(out), "--chunk-chars", "300")
    stats = json.loads(run("trace", "stats", str(out), "--json").stdout)
    assert stats["num_layers"] == 4 and stats["top_k"] == 2 and stats["num_sequences"] >= 2
    assert all(layer["load_skew"] >= 1.0 for layer in stats["layers"])


def test_bad_model_folder_is_one_clear_error(tmp_path: Path):
    result = run("generate", str(tmp_path / "missing"), "--json", check=False)
    assert result.returncode == 2
    assert "no such folder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("trace", ["deepseek-v2-lite-puffin-a.npz", "mixtral-8x7b-gsm8k.npz"])
def test_trace_stats_reads_shared_traces(shared_dir: Path, trace: str):
    stats = json.loads(run("trace", "stats", str(shared_dir / "traces" / trace), "--json").stdout)
    assert stats["num_experts"] in (64, 8)
    assert stats["mean_temporal_locality"] > stats["random_temporal_locality"]


def test_generate_under_expert_memory_budget_is_exact():
    full = json.loads(run("generate", "--prompt", "import os\n", "--max-new-tokens", "24", "--json").stdout)
    cached = json.loads(
        run("generate", "--prompt", "import os\n", "--max-new-tokens", "24", "--expert-memory", "25%", "--json").stdout
    )
    assert cached["token_ids"] == full["token_ids"]
    cache = cached["expert_cache"]
    assert cache["max_resident_bytes"] <= cache["budget_bytes"]
    assert cache["loads"] > 0 and 0 < cache["hit_rate"] < 1


def test_generate_in_bfloat16_is_exact_under_a_budget_and_a_bad_dtype_is_named():
    args = ("generate", "--prompt", "import os\n", "--max-new-tokens", "16", "--dtype", "bfloat16", "--json")
    resident = json.loads(run(*args).stdout)
    assert resident["new_tokens"] > 0 and resident["tokens_per_s"] > 0
    cached = json.loads(run(*args, "--expert-memory", "25%").stdout)
    assert cached["token_ids"] == resident["token_ids"]  # exact caching holds in bf16 too
    bad = run("generate", "--dtype", "float16", "--max-new-tokens", "2", check=False)
    assert bad.returncode == 2 and "--dtype must be float32 or bfloat16" in bad.stderr
    parallel = run(*args, "--expert-parallel", "2", check=False)
    assert parallel.returncode == 2 and "--expert-parallel runs float32 only" in parallel.stderr


def test_expert_memory_below_minimum_names_it():
    result = run("generate", "--expert-memory", "1KB", "--max-new-tokens", "2", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "491520" in result.stderr  # two experts of the reference model (top-2), in bytes


def test_committee_plan_then_eval(tmp_path: Path):
    text = tmp_path / "calib.py"
    text.write_text("import os\n\n\ndef walk(path):\n    for root, dirs, files in os.walk(path):\n        yield root\n" * 30)
    plan = tmp_path / "plan.json"
    run("committee", "plan", "--out", str(plan), "--budget", "0.5", "--calibration", str(text), "--tokens", "512")
    members = json.loads(plan.read_text())["members"]
    assert sum(len(m) for m in members) == 32 and all(len(m) >= 2 for m in members)
    report = json.loads(run("committee", "eval", "--plan", str(plan), "--text", str(text), "--tokens", "256", "--json").stdout)
    assert report["tokens"] == 256 and 0 < report["served_exactly"] <= 1
    assert report["accuracy_change_pp"] == pytest.approx(100 * (report["committee"]["accuracy"] - report["full"]["accuracy"]))
    assert report["skipped_slots"] == 0 and report["full_tokens_per_s"] > 0 and report["committee_tokens_per_s"] > 0
    skipping = json.loads(run("committee", "eval", "--plan", str(plan), "--text", str(text), "--tokens", "256",
                              "--skip-threshold", "0.3", "--json").stdout)
    assert skipping["skipped_slots"] > 0 and skipping["served_exactly"] < report["served_exactly"]
    refused = run("generate", "--skip-threshold", "0.3", "--max-new-tokens", "2", check=False)
    assert refused.returncode == 2 and "--skip-threshold needs --committee" in refused.stderr


def test_generate_with_committee_plan_reports_telemetry(tmp_path: Path):
    text = tmp_path / "calib.py"
    text.write_text("class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n" * 30)
    plan = tmp_path / "plan.json"
    run("committee", "plan", "--out", str(plan), "--budget", "0.5", "--calibration", str(text), "--tokens", "512")
    members = [set(m) for m in json.loads(plan.read_text())["members"]]
    payload = json.loads(
        run("generate", "--committee", str(plan), "--max-new-tokens", "8", "--routing", "--json").stdout
    )
    assert 0 < payload["committee"]["served_exactly"] <= 1
    # Only committee members were routed to (the routing facts are recorded after the committee).
    for layer, stats in enumerate(payload["routing"]["layers"]):
        for pair in stats["top_pairs"]:
            assert {pair["first"], pair["second"]} <= members[layer]


def test_generate_with_committee_swaps_under_a_budget(tmp_path: Path):
    plan = tmp_path / "plan.json"
    run("committee", "plan", "--out", str(plan), "--budget", "0.5", "--tokens", "512")
    payload = json.loads(run("generate", "--committee", str(plan), "--committee-swaps", "1", "--expert-memory", "50%",
                             "--max-new-tokens", "8", "--json").stdout)
    scheduler = payload["committee"]["scheduler"]
    assert scheduler["max_swaps"] == 1 and 0 <= scheduler["swaps_completed"] <= scheduler["swaps_started"]
    assert all(len(members) >= 2 for members in scheduler["members"].values())
    assert payload["expert_cache"]["max_resident_bytes"] <= payload["expert_cache"]["budget_bytes"]
    refused = run("generate", "--committee-swaps", "1", "--max-new-tokens", "4", check=False)
    assert refused.returncode == 2 and "--committee-swaps needs --committee" in refused.stderr
    warm = json.loads(run("generate", "--committee", str(plan), "--committee-warm-in", "--expert-memory", "50%",
                          "--max-new-tokens", "8", "--json").stdout)
    scheduler = warm["committee"]["scheduler"]
    assert scheduler["max_swaps"] == 0 and scheduler["warm_in_joined"] + scheduler["warm_in_loading"] > 0
    assert warm["expert_cache"]["max_resident_bytes"] <= warm["expert_cache"]["budget_bytes"]
    refused = run("generate", "--committee", str(plan), "--committee-warm-in", "--max-new-tokens", "4", check=False)
    assert refused.returncode == 2 and "--committee-warm-in needs --committee and --expert-memory" in refused.stderr


def test_serve_then_bench_serve_against_it_then_sigterm_drains():
    import signal
    import time

    import httpx

    from moeserve.ports import free_port

    port = free_port()
    server = subprocess.Popen([*MOESERVE, "serve", "--port", str(port), "--threads", "1", "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        bench = json.loads(run("bench", "serve", "--url", url, "--requests", "6", "--concurrency", "3",
                               "--max-tokens", "6", "--prompt-chars", "120", "--malformed", "3", "--json").stdout)
        result = bench["results"][url]
        assert result["completed"] == 6 and result["malformed"]["answered_4xx"] == 3
        assert result["output_throughput_tokens_per_s"] > 0
        # A long request in flight when SIGTERM arrives still completes: shutdown drains.
        body = {"model": "tiny-moe", "prompt": "def f(", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        import threading

        replies: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: replies.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120)))
        sender.start()
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        sender.join()
        assert replies[0].status_code == 200 and replies[0].json()["usage"]["completion_tokens"] == 200
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_bench_serve_needs_a_target():
    result = run("bench", "serve", check=False)
    assert result.returncode != 0 and "--url" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors given without a GPU")
def test_device_options_without_a_gpu_are_clear_errors(shared_dir: Path):
    layer = run("bench", "moe-layer", "--device", "cuda", "--tokens", "1", check=False)
    assert layer.returncode != 0 and "no CUDA device" in layer.stderr and "Traceback" not in layer.stderr
    trace = str(shared_dir / "traces" / "mixtral-8x7b-gsm8k.npz")
    sim = run("simulate", "ep", "--trace", trace, "--attention-workers", "1", "--expert-workers", "1",
              "--device", "cuda", check=False)
    assert sim.returncode != 0 and "apply to --calibrate" in sim.stderr


def test_bench_ep_refuses_a_checkpoint_without_tokenizer_before_starting_workers(tiny_checkpoints):
    result = run("bench", "ep", "--model", str(tiny_checkpoints["deepseek_v2"]), "--expert-parallel", "2", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has no tokenizer" in result.stderr and "rank 0 failed" not in result.stderr
