"""``moeserve bench serve``: a load generator for any OpenAI-compatible server.

It sends streaming completion requests with prompts cut from real text (Python's standard
library sources, plus any corpus file given, e.g. ../shared/corpora/tinyshakespeare.txt) at
log-normally spread lengths, either closed-loop at a fixed concurrency or open-loop at a
Poisson request rate capped by the concurrency, and reports output-token throughput and the
percentiles of time to first token (TTFT), time per output token (TPOT), inter-token latency
(ITL) and end-to-end latency, with every error counted by status.

Optionally, in the same run: malformed requests mixed into the load (each must get a 4xx),
``/health`` polled throughout, and the server's resident memory read from its ``/metrics``
(``process_resident_memory_bytes``) after warm-up and at the end.

It can also start the servers it compares (``launch_server``): moeserve's own and
``transformers serve --continuous-batching``, one at a time on free ports, so one command
measures both with the same prompts. Knows nothing of torch.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from moeserve.errors import MoeserveError
from moeserve.ports import free_port


@dataclass(frozen=True)
class LoadConfig:
    """The workload: how many requests, how they arrive, how long they are."""

    requests: int = 100
    concurrency: int = 16
    request_rate: float | None = None
    """Requests per second (Poisson arrivals); None sends as fast as the concurrency allows."""
    prompt_chars_median: int = 600
    """Median prompt length in characters (about 4 characters per token on source code)."""
    max_tokens_median: int = 64
    """Median max_tokens; both lengths are log-normal with sigma ``length_sigma``."""
    length_sigma: float = 0.6
    max_prompt_chars: int = 4000
    max_max_tokens: int = 256
    ignore_eos: bool = False
    """Ask for exactly max_tokens (vLLM's ``ignore_eos``); some servers refuse it (transformers serve)."""
    warmup: int = 4
    """Requests sent one at a time first (one-time costs), not counted."""
    warmup_wave: bool = True
    """Then one wave of ``concurrency`` requests at once, not counted: a server's memory and
    connections reach their steady state under concurrent load before anything is measured."""
    malformed: int = 0
    """Malformed requests mixed into the load (each must be answered with a 4xx)."""
    seed: int = 0
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1:
            raise ValueError(f"requests and concurrency must be >= 1, got {self.requests} and {self.concurrency}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError(f"request_rate must be > 0, got {self.request_rate}")
        if self.prompt_chars_median < 1 or self.max_tokens_median < 1:
            raise ValueError("prompt_chars_median and max_tokens_median must be >= 1")
        if self.malformed < 0 or self.warmup < 0:
            raise ValueError("malformed and warmup must be >= 0")

    @property
    def warmup_total(self) -> int:
        """Prompts the warm-up uses (make ``warmup_total + requests`` prompts)."""
        return self.warmup + (self.concurrency if self.warmup_wave else 0)


def default_text_files(corpus: Path | None = None) -> list[Path]:
    """Python standard library sources, and the corpus file if given."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4000)
    if corpus is not None:
        if not corpus.is_file():
            raise MoeserveError(f"corpus file {corpus} does not exist")
        files.append(corpus)
    if not files:
        raise MoeserveError(f"no text found under {stdlib}")
    return files


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    max_tokens: int


def make_prompts(files: list[Path], config: LoadConfig, count: int, seed_offset: int = 0) -> list[PromptSpec]:
    """``count`` prompts cut at line starts from random places in ``files``, log-normal lengths."""
    rng = random.Random(config.seed + seed_offset)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    specs = []
    for _ in range(count):
        text = rng.choice(texts)
        chars = int(min(config.max_prompt_chars, max(16, rng.lognormvariate(math.log(config.prompt_chars_median), config.length_sigma))))
        start = rng.randrange(max(1, len(text) - chars))
        line_start = text.rfind("\n", 0, start) + 1
        prompt = text[line_start : line_start + chars]
        max_tokens = int(min(config.max_max_tokens, max(1, rng.lognormvariate(math.log(config.max_tokens_median), config.length_sigma))))
        specs.append(PromptSpec(prompt, max_tokens))
    return specs


MALFORMED_BODIES: list[tuple[str, Callable[[str], bytes]]] = [
    ("invalid JSON", lambda model: b'{"model": "' + model.encode() + b'", "prompt": '),
    ("not an object", lambda model: b"[1, 2, 3]"),
    ("wrong type", lambda model: json.dumps({"model": model, "prompt": "x", "max_tokens": "ten"}).encode()),
    ("negative max_tokens", lambda model: json.dumps({"model": model, "prompt": "x", "max_tokens": -5}).encode()),
    ("huge max_tokens", lambda model: json.dumps({"model": model, "prompt": "x", "max_tokens": 10**9}).encode()),
    ("unknown model", lambda model: json.dumps({"model": model + "-nope", "prompt": "x"}).encode()),
    ("unknown field", lambda model: json.dumps({"model": model, "prompt": "x", "bogus_field": {"a": 1}}).encode()),
    ("missing prompt", lambda model: json.dumps({"model": model}).encode()),
    ("temperature out of range", lambda model: json.dumps({"model": model, "prompt": "x", "temperature": -1}).encode()),
]


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    ok: bool
    status: int
    prompt_chars: int
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    response_id: str | None = None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"mean": sum(ordered) / len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


_RSS = re.compile(r"^process_resident_memory_bytes\s+([0-9.e+]+)", re.MULTILINE)


async def _server_rss(client: httpx.AsyncClient, url: str) -> float | None:
    try:
        response = await client.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    match = _RSS.search(response.text) if response.status_code == 200 else None
    return float(match.group(1)) if match else None


async def _one_request(client: httpx.AsyncClient, url: str, model: str, spec: PromptSpec, config: LoadConfig) -> RequestRecord:
    body: dict[str, Any] = {
        "model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    record = RequestRecord(ok=False, status=0, prompt_chars=len(spec.prompt))
    start = time.perf_counter()
    last = start
    chunks = 0
    finished = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=config.timeout_s) as response:
            record.status = response.status_code
            if response.status_code != 200:
                record.error = (await response.aread()).decode(errors="replace")[:300]
                record.e2e_s = time.perf_counter() - start
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    record.ok = record.error is None
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = str(event["error"])[:300]
                    continue
                record.response_id = record.response_id or event.get("id")
                usage = event.get("usage")
                if usage:
                    record.output_tokens = int(usage.get("completion_tokens", 0))
                for choice in event.get("choices") or []:
                    if choice.get("finish_reason"):
                        finished = True  # some servers (transformers serve) send no [DONE]
                    if choice.get("text"):
                        now = time.perf_counter()
                        if record.ttft_s is None:
                            record.ttft_s = now - start
                        else:
                            record.itl_s.append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        record.error = f"{type(error).__name__}: {error}"
    record.e2e_s = time.perf_counter() - start
    if finished and record.error is None:
        record.ok = True
    if record.output_tokens == 0:
        record.output_tokens = chunks  # no usage chunk: one token per text chunk
    return record


async def _one_malformed(client: httpx.AsyncClient, url: str, model: str, index: int) -> tuple[str, int]:
    name, build = MALFORMED_BODIES[index % len(MALFORMED_BODIES)]
    try:
        response = await client.post(f"{url}/v1/completions", content=build(model),
                                     headers={"content-type": "application/json"}, timeout=30)
        return name, response.status_code
    except httpx.HTTPError:
        return name, 0


async def _poll_health(client: httpx.AsyncClient, url: str, stop: asyncio.Event, results: list[int],
                       rss: list[float]) -> None:
    """``/health`` every 0.5 s; the server's RSS from ``/metrics`` every 5 s (when it exports it)."""
    polls = 0
    while not stop.is_set():
        try:
            response = await client.get(f"{url}/health", timeout=10)
            results.append(response.status_code)
        except httpx.HTTPError:
            results.append(0)
        polls += 1
        if polls % 10 == 0:
            sample = await _server_rss(client, url)
            if sample is not None:
                rss.append(sample)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass


async def run_load(url: str, model: str, specs: list[PromptSpec], config: LoadConfig) -> dict[str, Any]:
    """Send the workload to ``url`` and summarise what came back."""
    url = url.rstrip("/")
    limits = httpx.Limits(max_connections=config.concurrency + 8, max_keepalive_connections=config.concurrency + 8)
    async with httpx.AsyncClient(limits=limits) as client:
        for spec in specs[: config.warmup]:  # sequential warm-up: one-time costs stay out of the figures
            await _one_request(client, url, model, spec, config)
        # One concurrent wave: the steady state under load (memory, connections) before measuring.
        await asyncio.gather(*(_one_request(client, url, model, spec, config)
                               for spec in specs[config.warmup : config.warmup_total]))
        measured = specs[config.warmup_total :]
        rss_start = await _server_rss(client, url)
        health: list[int] = []
        rss_samples: list[float] = []
        stop = asyncio.Event()
        health_task = asyncio.create_task(_poll_health(client, url, stop, health, rss_samples))
        semaphore = asyncio.Semaphore(config.concurrency)
        rng = random.Random(config.seed + 7)

        async def limited(spec: PromptSpec) -> RequestRecord:
            async with semaphore:
                return await _one_request(client, url, model, spec, config)

        async def malformed(index: int) -> tuple[str, int]:
            async with semaphore:
                return await _one_malformed(client, url, model, index)

        tasks: list[asyncio.Task] = []
        bad_tasks: list[asyncio.Task] = []
        bad_every = max(1, len(measured) // config.malformed) if config.malformed else 0
        start = time.perf_counter()
        for index, spec in enumerate(measured):
            tasks.append(asyncio.create_task(limited(spec)))
            if bad_every and index % bad_every == 0 and len(bad_tasks) < config.malformed:
                bad_tasks.append(asyncio.create_task(malformed(len(bad_tasks))))
            if config.request_rate is not None:
                await asyncio.sleep(rng.expovariate(config.request_rate))
        while len(bad_tasks) < config.malformed:
            bad_tasks.append(asyncio.create_task(malformed(len(bad_tasks))))
        records: list[RequestRecord] = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - start
        bad_results = list(await asyncio.gather(*bad_tasks))
        stop.set()
        await health_task
        rss_end = await _server_rss(client, url)
    return summarise(records, wall, bad_results, health, rss_start, rss_end, rss_samples)


def summarise(records: list[RequestRecord], wall_s: float, malformed: list[tuple[str, int]], health: list[int],
              rss_start: float | None, rss_end: float | None, rss_samples: list[float]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    statuses: dict[str, int] = {}
    for record in records:
        if not record.ok:
            statuses[str(record.status)] = statuses.get(str(record.status), 0) + 1
    ids = [r.response_id for r in ok if r.response_id]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.ttft_s is not None and r.output_tokens > 1]
    malformed_status = [status for _, status in malformed]
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "errors_by_status": statuses,
        "server_errors_5xx": sum(1 for r in records if r.status >= 500) + sum(1 for s in malformed_status if s >= 500),
        "duplicate_response_ids": len(ids) - len(set(ids)),
        "wall_s": wall_s,
        "request_throughput_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_throughput_tokens_per_s": output_tokens / wall_s if wall_s > 0 else 0.0,
        "output_tokens": output_tokens,
        "ttft_s": _percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _percentiles(tpot),
        "itl_s": _percentiles([gap for r in ok for gap in r.itl_s]),
        "e2e_s": _percentiles([r.e2e_s for r in ok]),
        "malformed": {
            "sent": len(malformed),
            "answered_4xx": sum(1 for s in malformed_status if 400 <= s < 500),
            "by_kind": {name: status for name, status in malformed},
        },
        "health_checks": {"count": len(health), "failed": sum(1 for s in health if s != 200)},
        "server_rss_bytes": {
            "after_warmup": rss_start,
            "end": rss_end,
            "max": max([*rss_samples, rss_end]) if rss_end is not None else None,
            "growth_fraction": (rss_end - rss_start) / rss_start if rss_start and rss_end else None,
            "max_growth_fraction": (max([*rss_samples, rss_end]) - rss_start) / rss_start if rss_start and rss_end else None,
            "samples": rss_samples,
        },
        "first_errors": [r.error for r in records if r.error][:3],
    }


# -- servers this benchmark can start itself -----------------------------------------------------


SERVER_KINDS = ("moeserve", "transformers")
"""``moeserve``: this project's server; ``transformers``: ``transformers serve --continuous-batching``."""


@dataclass(frozen=True)
class LaunchedServer:
    kind: str
    url: str
    model_name: str
    pid: int


def _server_command(kind: str, model: Path, port: int, extra: list[str]) -> tuple[list[str], str]:
    if kind == "moeserve":
        return [sys.executable, "-m", "moeserve.cli", "serve", str(model), "--port", str(port),
                "--log-level", "warning", *extra], model.name
    if kind == "transformers":
        executable = Path(sys.executable).with_name("transformers")
        return [str(executable), "serve", "--continuous-batching", "--device", "cpu", "--port", str(port),
                "--log-level", "warning", *extra, str(model)], str(model)
    raise MoeserveError(f"unknown server kind {kind!r}; known: {', '.join(SERVER_KINDS)}")


@contextmanager
def launch_server(kind: str, model: Path, threads: int | None, extra: list[str] | None = None,
                  ready_timeout_s: float = 180.0) -> Iterator[LaunchedServer]:
    """Start a server on a free loopback port, wait until it answers a completion, stop it after."""
    port = free_port()
    command, model_name = _server_command(kind, model, port, extra or [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads is not None:
        env.update(MOESERVE_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise MoeserveError(f"{kind} server exited with {process.returncode}: "
                                    f"{(process.stderr.read() if process.stderr else '')[-2000:]}")
            try:
                response = httpx.post(f"{url}/v1/completions", timeout=60,
                                      json={"model": model_name, "prompt": "x", "max_tokens": 1})
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise MoeserveError(f"{kind} server did not answer within {ready_timeout_s:.0f} s")
            time.sleep(0.5)
        yield LaunchedServer(kind, url, model_name, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def report_row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run a table shows (milliseconds for latencies)."""

    def ms(section: str, key: str) -> float | None:
        value = result[section][key]
        return None if value is None else value * 1000

    return {
        "server": name,
        "ok": f"{result['completed']}/{result['requests']}",
        "tok/s": result["output_throughput_tokens_per_s"],
        "TTFT p50": ms("ttft_s", "p50"),
        "TTFT p99": ms("ttft_s", "p99"),
        "TPOT p50": ms("tpot_s", "p50"),
        "ITL p99": ms("itl_s", "p99"),
        "E2E p50": ms("e2e_s", "p50"),
        "E2E p99": ms("e2e_s", "p99"),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median output throughput, with every round's throughput and TTFT p50 attached."""
    ordered = sorted(runs, key=lambda r: r["output_throughput_tokens_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds"] = {
        "output_throughput_tokens_per_s": [r["output_throughput_tokens_per_s"] for r in runs],
        "ttft_p50_s": [r["ttft_s"]["p50"] for r in runs],
    }
    return chosen


def ratios_to(base: dict[str, Any], other: dict[str, Any]) -> dict[str, float | None]:
    """``other`` over ``base``: output throughput and median TTFT (medians over rounds)."""

    def median(values: list[float | None]) -> float | None:
        present = sorted(v for v in values if v is not None)
        return present[(len(present) - 1) // 2] if present else None

    def ratio(key: str) -> float | None:
        top, bottom = median(other["rounds"][key]), median(base["rounds"][key])
        return top / bottom if top is not None and bottom else None

    return {"output_throughput": ratio("output_throughput_tokens_per_s"), "ttft_p50": ratio("ttft_p50_s")}
