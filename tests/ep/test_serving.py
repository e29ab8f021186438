"""The server's sync expert parallelism: real worker processes behind the engine and the HTTP server."""

from __future__ import annotations

import re

import httpx
import pytest

from moeserve.engine.engine import EngineConfig, build_engine
from moeserve.engine.request import SamplingParams
from moeserve.engine.scheduler import SchedulerConfig
from moeserve.errors import MoeserveError

PROMPTS = ["def main():", "import os\nimport sys\n\nclass Foo(object):\n    def __init__(self", "x = ["]
CONFIG = EngineConfig(SchedulerConfig(max_running=2), max_context=128)


def _greedy(model) -> list[list[int]]:
    engine = build_engine(model, CONFIG)
    ids = [engine.add_request(model.tokenizer(p)["input_ids"], SamplingParams(max_tokens=10, ignore_eos=True)).request_id
           for p in PROMPTS]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id] += output.token_ids
    return [tokens[i] for i in ids]


def test_serving_with_expert_workers_gives_the_same_tokens_and_metrics(start_server):
    from moeserve.ep.serving import start_expert_parallel
    from moeserve.models.loader import load_model
    from moeserve.models.reference import reference_split_tokens

    plain = _greedy(load_model())
    model = load_model()
    service = start_expert_parallel(model, 3, reference_split_tokens(model.tokenizer, held_out=False, max_tokens=1024))
    try:
        assert sorted(set(service.expert2worker.flatten().tolist())) == [0, 1]
        assert _greedy(model) == plain
        rows_before = sum(map(sum, service.stats.worker_rows))
        assert rows_before > 0
        with start_server(model, CONFIG, expert_parallel=service) as (url, _):
            reply = httpx.post(f"{url}/v1/completions", timeout=60,
                               json={"model": "tiny-moe", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0,
                                     "ignore_eos": True})
            assert reply.status_code == 200
            assert reply.json()["choices"][0]["text"] == model.tokenizer.decode(plain[0], skip_special_tokens=True)
            assert httpx.get(f"{url}/health").status_code == 200
            text = httpx.get(f"{url}/metrics").text
        assert re.search(r'^moeserve:ep_balancedness\{layer="0"\} (0\.\d+|1\.0)', text, re.MULTILINE)
        assert re.search(r"^moeserve:ep_expert_wait_seconds_total \S+", text, re.MULTILINE)
        assert "moeserve:expert_load_tokens" not in text  # the MoE layers are bypassed: no false zeros
        # Leaving the server stopped the expert workers (its shutdown hook).
        assert not service.alive()
    finally:
        service.stop()
    assert all(not process.is_alive() for process in service.processes)


def test_expert_parallel_refuses_too_few_or_too_many_processes():
    import torch

    from moeserve.ep.serving import start_expert_parallel
    from moeserve.models.loader import load_model

    model = load_model()
    with pytest.raises(MoeserveError, match="at least 2 processes"):
        start_expert_parallel(model, 1, torch.zeros(8, dtype=torch.long))
    with pytest.raises(MoeserveError, match="only 16 experts"):
        start_expert_parallel(model, 18, torch.zeros(8, dtype=torch.long))
