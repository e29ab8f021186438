"""The official openai client against a live server on loopback: completions, chat, streaming, errors."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import openai
import pytest

MODEL = "tiny-moe"


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_greedy_is_deterministic_and_counts_usage(client):
    first = client.completions.create(model=MODEL, prompt="def main(", max_tokens=12, temperature=0)
    second = client.completions.create(model=MODEL, prompt="def main(", max_tokens=12, temperature=0)
    assert first.choices[0].text == second.choices[0].text and first.choices[0].text
    assert first.choices[0].finish_reason in ("length", "stop")
    assert first.usage is not None and first.usage.completion_tokens <= 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_streamed_completion_equals_the_unstreamed_one(client):
    whole = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=16, temperature=0)
    stream = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert "".join(pieces) == whole.choices[0].text
    assert reasons == [whole.choices[0].finish_reason]
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_chat_and_streamed_chat(client):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a loop"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_stop_strings_and_seeded_sampling(client):
    full = client.completions.create(model=MODEL, prompt="def main(", max_tokens=16, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model=MODEL, prompt="def main(", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    a = client.completions.create(model=MODEL, prompt="x = ", max_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    b = client.completions.create(model=MODEL, prompt="x = ", max_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    assert a.choices[0].text == b.choices[0].text


def test_concurrent_requests_are_each_answered_once(client, server_url):
    def ask(i: int):
        return client.completions.create(model=MODEL, prompt=f"value_{i} = ", max_tokens=8, temperature=0)

    before = _metric(server_url, "moeserve:request_success_total")
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        replies = list(pool.map(ask, range(24)))
    assert len({r.id for r in replies}) == 24
    assert _metric(server_url, "moeserve:request_success_total") - before == 24


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
        ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 10**7}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x " * 600, "max_tokens": 4}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
        ({"model": MODEL, "prompt": "x", "extra_body": {"no_such_field": 1}}, 400, "no_such_field"),
    ],
)
def test_bad_requests_get_openai_errors(client, kwargs, status, param):
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(**kwargs)
    assert raised.value.status_code == status
    body = raised.value.body
    assert isinstance(body, dict) and body["param"] == param and body["message"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"model": "tiny-moe", "prompt": "x", "max_tokens": "5"}', b'{"model": "tiny-moe"}'],
)
def test_malformed_bodies_are_400_and_the_server_stays_healthy(server_url, content):
    response = httpx.post(f"{server_url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    assert httpx.get(f"{server_url}/health").json() == {"status": "ok"}


def test_an_oversized_body_is_refused_before_parsing(server_url):
    response = httpx.post(f"{server_url}/v1/completions", content=b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}',
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and "at most" in response.json()["error"]["message"]


def test_metrics_have_request_and_moe_series(client, server_url):
    client.completions.create(model=MODEL, prompt="class A:", max_tokens=4, temperature=0)
    text = httpx.get(f"{server_url}/metrics").text
    for name in ("moeserve:num_requests_running", "moeserve:time_to_first_token_seconds_count",
                 "moeserve:inter_token_latency_seconds_count", "moeserve:e2e_request_latency_seconds_count",
                 "moeserve:prompt_tokens_total", "moeserve:generation_tokens_total", "process_resident_memory_bytes"):
        assert re.search(rf"^{re.escape(name)}(\{{[^}}]*\}})? ", text, re.MULTILINE), name
    loads = [float(v) for v in re.findall(r'^moeserve:expert_load_tokens_total\{expert="\d+",layer="0"\} (\S+)', text, re.MULTILINE)]
    assert len(loads) == 16 and sum(loads) > 0
    balance = float(re.search(r'^moeserve:expert_balancedness\{layer="0"\} (\S+)', text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert 0 < balance <= 1
    assert balance == pytest.approx((sum(loads) / 16) / max(loads))


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)", text, re.MULTILINE))


def test_chat_uses_the_tokenizer_template_when_there_is_one(server_model):
    import copy

    from moeserve.server.app import chat_prompt_ids

    tokenizer = copy.deepcopy(server_model.tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    messages = [{"role": "user", "content": "hi"}]
    assert chat_prompt_ids(tokenizer, messages, encode) == encode("user: hi\nassistant:")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert chat_prompt_ids(tokenizer, messages, encode) == encode("<user>hi<assistant>")
