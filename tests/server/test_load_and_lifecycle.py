"""Queue limits, client disconnects and shutdown draining, on live servers with small limits."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx

from moeserve.engine.engine import EngineConfig
from moeserve.engine.scheduler import SchedulerConfig

LONG = {"model": "tiny-moe", "prompt": "def f(", "max_tokens": 300, "temperature": 0, "ignore_eos": True}


def _gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)", text, re.MULTILINE))


def test_a_full_queue_answers_429_with_retry_after(server_model, start_server):
    config = EngineConfig(SchedulerConfig(max_running=1, max_waiting=1), max_context=512)
    with start_server(server_model, config) as (url, _):
        results: list[httpx.Response] = []

        def send():
            results.append(httpx.post(f"{url}/v1/completions", json=LONG, timeout=120))

        threads = [threading.Thread(target=send) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = sorted(r.status_code for r in results)
        refused = [r for r in results if r.status_code == 429]
        assert 200 in statuses and refused, statuses
        assert set(statuses) <= {200, 429}
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error" for r in refused)
        assert all(r.json()["usage"]["completion_tokens"] == 300 for r in results if r.status_code == 200)
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_that_disconnects_frees_its_slot(server_model, start_server):
    config = EngineConfig(SchedulerConfig(max_running=1, max_waiting=4), max_context=2048)
    with start_server(server_model, config) as (url, _):
        body = {**LONG, "max_tokens": 2000, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
            assert received and json.loads(received[0][5:])["choices"][0]["text"] is not None
        # The stream was closed after a few tokens: the request must be aborted, not run to 2000 tokens.
        deadline = time.monotonic() + 30
        while _gauge(url, 'moeserve:request_success_total') < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        text = httpx.get(f"{url}/metrics").text
        assert re.search(r'^moeserve:request_success_total\{finished_reason="abort"\} 1\.0', text, re.MULTILINE)
        assert _gauge(url, "moeserve:num_requests_running") == 0
        assert _gauge(url, "moeserve:generation_tokens_total") < 2000
        # The freed slot serves the next request.
        reply = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 5}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5


def test_a_non_streaming_client_that_gives_up_is_cancelled_too(server_model, start_server):
    config = EngineConfig(SchedulerConfig(max_running=1, max_waiting=4), max_context=2048)
    with start_server(server_model, config) as (url, _):
        try:
            httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 2000}, timeout=1.0)
        except httpx.ReadTimeout:
            pass  # the client closes its connection after 1 s
        deadline = time.monotonic() + 30
        while _gauge(url, "moeserve:request_success_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        text = httpx.get(f"{url}/metrics").text
        assert re.search(r'^moeserve:request_success_total\{finished_reason="abort"\} 1\.0', text, re.MULTILINE)
        assert _gauge(url, "moeserve:generation_tokens_total") < 2000


def test_shutdown_drains_running_requests(server_model, start_server):
    config = EngineConfig(SchedulerConfig(max_running=2, max_waiting=4), max_context=512)
    results: list[httpx.Response] = []
    with start_server(server_model, config) as (url, server):
        def send():
            results.append(httpx.post(f"{url}/v1/completions", json=LONG, timeout=120))

        threads = [threading.Thread(target=send) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while server.loop.engine.num_running < 2 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        # Leaving the block asks uvicorn to exit while both requests are mid-generation.
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in results)


def test_an_engine_bug_answers_500_and_the_server_goes_on(server_model, start_server):
    config = EngineConfig(SchedulerConfig(max_running=2, max_waiting=4), max_context=256)
    with start_server(server_model, config) as (url, server):
        engine = server.loop.engine  # type: ignore[attr-defined]
        original = engine._postprocess

        def broken(*args, **kwargs):
            engine._postprocess = original  # fail once
            raise RuntimeError("injected postprocess bug")

        engine._postprocess = broken
        failed = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 5}, timeout=60)
        assert failed.status_code == 500 and "injected postprocess bug" in failed.json()["error"]["message"]
        reply = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 5}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_warmed_up_server_counts_only_served_tokens(server_model, start_server):
    """``warm_up=True`` (what `moeserve serve` uses) runs the largest steps on the engine thread
    before the first request; the expert-load counter starts after it."""
    config = EngineConfig(SchedulerConfig(max_running=2, max_prefill_tokens=64), max_context=96)
    with start_server(server_model, config, warm_up=True) as (url, server):
        assert len(server.loop.engine.runner.cache.keys) == len(server_model.layers)  # the warm-up ran
        body = {"model": "tiny-moe", "prompt": "def f(", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        usage = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["usage"]
        routed = _gauge(url, "moeserve:expert_load_tokens_total") / len(server_model.layers)
        # Every token the model ran (the prompt, then each generated token but the last) routed to top-2 experts.
        assert routed == 2 * (usage["prompt_tokens"] + usage["completion_tokens"] - 1)
        assert httpx.get(f"{url}/health").status_code == 200
