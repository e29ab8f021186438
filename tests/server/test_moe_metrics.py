"""MoE features behind the server: an expert cache stays exact and exports its counters; a committee exports gate mass."""

from __future__ import annotations

import re

import httpx
import openai

from moeserve.engine.engine import EngineConfig
from moeserve.engine.scheduler import SchedulerConfig

CONFIG = EngineConfig(SchedulerConfig(max_running=4, max_waiting=16), max_context=256)


def _value(text: str, pattern: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, pattern
    return float(match.group(1))


def test_expert_cache_under_a_budget_serves_the_same_text_and_exports_counters(start_server, server_url):
    from moeserve.memory.offload import apply_expert_cache
    from moeserve.models.loader import load_model

    prompt = {"model": "tiny-moe", "prompt": "def parse(line):", "max_tokens": 16, "temperature": 0}
    exact = httpx.post(f"{server_url}/v1/completions", json=prompt, timeout=60).json()["choices"][0]["text"]
    model = load_model()
    cache = apply_expert_cache(model, "50%", "lru")
    with start_server(model, CONFIG, cache=cache) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(**prompt).choices[0].text == exact
        text = httpx.get(f"{url}/metrics").text
    hits = _value(text, r"^moeserve:expert_cache_hits_total (\S+)")
    misses = _value(text, r"^moeserve:expert_cache_misses_total (\S+)")
    assert hits + misses > 0 and misses > 0
    assert _value(text, r"^moeserve:expert_cache_resident_bytes (\S+)") <= _value(text, r"^moeserve:expert_cache_budget_bytes (\S+)")


def test_committee_exports_gate_mass_served_exactly(start_server):
    from moeserve.memory.committee import apply_committee
    from moeserve.models.loader import load_model

    model = load_model()
    gate = apply_committee(model, {layer: set(range(8)) for layer in range(len(model.layers))})
    with start_server(model, CONFIG, committee=gate) as (url, _):
        httpx.post(f"{url}/v1/completions", json={"model": "tiny-moe", "prompt": "import os", "max_tokens": 8}, timeout=60)
        text = httpx.get(f"{url}/metrics").text
    overall = _value(text, r'^moeserve:committee_gate_mass_served_exactly\{layer="all"\} (\S+)')
    assert 0 < overall < 1  # half the experts: some routed mass was not served exactly


def test_served_committee_with_online_swaps_under_a_budget_exports_its_swaps(start_server):
    from moeserve.memory.committee import CommitteeScheduler, apply_committee
    from moeserve.memory.offload import apply_expert_cache
    from moeserve.models.loader import load_model

    model = load_model(load_experts=False)
    gate = apply_committee(model, {layer: set(range(8)) for layer in range(len(model.layers))})
    cache = apply_expert_cache(model, "50%", "lru", per_layer=True)
    gate.scheduler = CommitteeScheduler(model, gate, max_swaps=2, cache=cache, step_every=1)
    with start_server(model, CONFIG, cache=cache, committee=gate) as (url, _):
        for prompt in ("import os", "class Parser:", "def main(argv):"):
            response = httpx.post(f"{url}/v1/completions", timeout=60,
                                  json={"model": "tiny-moe", "prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
        text = httpx.get(f"{url}/metrics").text
    started = _value(text, r"^moeserve:committee_swaps_started_total (\S+)")
    completed = _value(text, r"^moeserve:committee_swaps_completed_total (\S+)")
    assert started > 0 and 0 <= completed <= started  # experts 8-15 carry mass for these prompts
    assert _value(text, r"^moeserve:expert_cache_resident_bytes (\S+)") <= _value(text, r"^moeserve:expert_cache_budget_bytes (\S+)")
    assert all(len(gate.members(layer)) >= model.top_k for layer in gate.layers)
