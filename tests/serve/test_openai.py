"""The official openai client (AsyncOpenAI) against a live `afkv serve` on loopback (a tiny model
with the default model's tokenizer): answers, usage and logprobs equal the engine's, stop
strings, seeds, SSE streaming, error codes and bodies, disconnects, /metrics."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import pytest_asyncio

from afkv import Engine, SamplingParams
from afkv.config import EngineConfig, KVConfig
from afkv.errors import ConfigError
from afkv.serve.http import check_bind
from tests.serve.conftest import API_KEY, http, live_server, metric_sum, openai_client, scrape, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny-chat"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tiny_chat_dir):
    cfg = EngineConfig(kv=KVConfig(block_size=16, num_blocks=512))
    async with Engine(tiny_chat_dir, cfg, progress=False) as engine:
        async with live_server(engine, MODEL, engine.tokenizer) as (server, url):
            yield engine, server, url


@pytest.fixture
def client(served):
    return openai_client(served[2])


async def test_models(served, client):
    assert [m.id for m in (await client.models.list()).data] == [MODEL]
    with pytest.raises(openai.NotFoundError) as exc:
        await client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=4)
    assert exc.value.status_code == 404 and exc.value.body["code"] == "model_not_found"


async def test_chat_matches_the_engine(served, client):
    engine = served[0]
    expected = await engine.complete(MESSAGES, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    got = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == expected.text and got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(engine.tokenize(MESSAGES)) == len(expected.prompt_token_ids)
    assert got.usage.completion_tokens == 12 and got.usage.total_tokens == got.usage.prompt_tokens + 12
    assert got.id.startswith("chatcmpl-") and got.object == "chat.completion" and got.model == MODEL

    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=12,
                                                  temperature=0, stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    events = [e async for e in stream]
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == expected.text
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 12
    assert events[-1].usage.prompt_tokens == len(expected.prompt_token_ids)
    assert all(e.usage is None for e in events[:-1])


async def test_completions_and_logprobs_match_the_engine(served, client):
    engine = served[0]
    prompt = "The capital of France is"
    expected = await engine.complete(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3))
    got = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                          extra_body={"ignore_eos": True})
    choice = got.choices[0]
    assert choice.text == expected.text and got.usage.completion_tokens == 8
    assert got.usage.prompt_tokens == len(engine.tokenize(prompt))
    tok = engine.tokenizer
    assert choice.logprobs.tokens == [tok.token_text(t) for t in expected.token_ids]
    assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    for top, exp in zip(choice.logprobs.top_logprobs, expected.top_logprobs):
        assert top == pytest.approx({tok.token_text(t): v for t, v in exp.items()}, abs=1e-5)
    assert choice.logprobs.text_offset[0] == 0

    # token ids as the prompt; streamed text adds up to the same answer
    stream = await client.completions.create(model=MODEL, prompt=engine.tokenize(prompt), max_tokens=8, temperature=0,
                                             stream=True, logprobs=1, extra_body={"ignore_eos": True})
    events = [e async for e in stream]
    assert "".join(e.choices[0].text for e in events) == expected.text
    assert sum(len(e.choices[0].logprobs.tokens) for e in events) == 8
    assert events[-1].choices[0].finish_reason == "length"

    chat = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=2)
    exp = await engine.complete(MESSAGES, SamplingParams(max_tokens=6, temperature=0, logprobs=2))
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(exp.logprobs, abs=1e-5)
    assert [c.token for c in content] == [tok.token_text(t) for t in exp.token_ids]
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)


async def test_stop_strings_and_seeds(served, client):
    engine = served[0]
    params = dict(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=1.0, seed=5,
                  extra_body={"ignore_eos": True})
    a = (await client.completions.create(**params)).choices[0]
    b = (await client.completions.create(**params)).choices[0]
    assert a.text == b.text and len(a.text) > 10  # same seed, same text
    c = (await client.completions.create(**params | {"seed": 6})).choices[0]
    assert c.text != a.text
    stop = a.text[8:11]
    cut = (await client.completions.create(**params | {"stop": [stop, "\x00never"]})).choices[0]
    assert cut.finish_reason == "stop" and cut.text == a.text[: a.text.index(stop)]
    stream = await client.completions.create(**params | {"stop": stop, "stream": True})
    events = [e async for e in stream]
    assert "".join(e.choices[0].text for e in events) == cut.text
    assert events[-1].choices[0].finish_reason == "stop"
    assert engine.stats().num_running == 0


async def test_error_codes_and_bodies(served, client):
    bad = [
        (dict(temperature=5.0), "temperature"),
        (dict(n=2), "n"),
        (dict(top_logprobs=3), "top_logprobs"),  # without logprobs
        (dict(extra_body={"top_p": 0}), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
    ]
    for kwargs, param in bad:
        with pytest.raises(openai.BadRequestError) as exc:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)
        body = exc.value.body
        assert exc.value.status_code == 400 and body["type"] == "invalid_request_error", kwargs
        assert body["param"] == param and param in body["message"], (kwargs, body)
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(model=MODEL, messages=[])
    assert exc.value.status_code == 400 and exc.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        await client.completions.create(model=MODEL, prompt="", max_tokens=4)
    assert "empty" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        await client.completions.create(model=MODEL, prompt="hello " * 600, max_tokens=4)
    assert exc.value.body["code"] == "context_length_exceeded" and "context" in exc.value.body["message"]
    for stream in (False, True):  # a streaming request fails with its status code too, before any event
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=MODEL, prompt=[10**9], max_tokens=4, stream=stream)

    url = served[2]
    chat = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
    for key, what in ((None, "missing"), ("wrong", "incorrect")):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        status, body = await http(url, "/v1/chat/completions", "POST", chat, headers)
        error = json.loads(body)["error"]
        assert status == 401 and error["code"] == "invalid_api_key" and what in error["message"]
    with pytest.raises(openai.AuthenticationError):
        await openai_client(url, api_key="wrong").models.list()
    assert (await http(url, "/health"))[0] == 200  # health and metrics need no key
    assert (await http(url, "/metrics"))[0] == 200
    status, body = await http(url, "/v1/completions", "POST", b"{not json", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert served[0].stats().num_running == 0  # the engine kept serving
    assert (await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)).usage.completion_tokens >= 1


async def test_binding_beyond_loopback_needs_a_key():
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("0.0.0.0", "k", False)
    check_bind("0.0.0.0", None, allow_unauthenticated=True)
    with pytest.raises(ConfigError, match="without an API key"):
        check_bind("0.0.0.0", None, False)


async def test_disconnect_aborts_and_frees_blocks(served):
    engine, server, url = served
    free = engine.stats().num_free_blocks
    before = await scrape(url)
    for stream in (False, True):
        client = openai_client(url)
        params = dict(model=MODEL, prompt="Once upon a time", max_tokens=400, temperature=0,
                      extra_body={"ignore_eos": True})
        if stream:
            events = await client.completions.create(**params, stream=True)
            async for _ in events:
                break  # one event, then the client goes away
            await events.close()
        else:
            task = asyncio.create_task(client.completions.create(**params))
            await wait_until(lambda: engine.stats().num_running == 1, what="the request to run")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_free_blocks == free,
                         what="the aborted request's blocks to be freed")
    after = await scrape(url)
    aborts = metric_sum(after, "afkv_requests_total", outcome="abort") - metric_sum(before, "afkv_requests_total",
                                                                                     outcome="abort")
    assert aborts == 2
    assert engine.stats().num_generated_tokens < 2 * 400 + metric_sum(before, "afkv_generation_tokens_total")


async def test_metrics(served, client):
    url = served[2]
    await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    m = await scrape(url)
    engine = served[0]
    stats = engine.stats()
    assert metric_sum(m, "afkv_num_requests_running") == 0 and metric_sum(m, "afkv_num_requests_waiting") == 0
    assert metric_sum(m, "afkv_generation_tokens_total") == stats.num_generated_tokens
    assert metric_sum(m, "afkv_kv_device_blocks") == stats.num_blocks == 512
    assert metric_sum(m, "afkv_kv_tier_capacity_blocks", tier="device") == 512
    assert metric_sum(m, "afkv_kv_hit_blocks_total", tier="device") == engine.kv_metrics().hit_blocks["device"]
    assert ("afkv_kv_spilled_bytes_total", (("node", "0"), ("to", "host"))) in m
    assert metric_sum(m, "afkv_layer_seconds", part="attention") > 0
    assert metric_sum(m, "afkv_requests_total", endpoint="completions", outcome="length") >= 1
    finished = metric_sum(m, "afkv_requests_total", outcome="length") + metric_sum(m, "afkv_requests_total",
                                                                                    outcome="stop")
    assert metric_sum(m, "afkv_e2e_request_latency_seconds_count") == finished
    assert metric_sum(m, "afkv_time_to_first_token_seconds_count") == finished
    assert metric_sum(m, "afkv_request_completion_tokens_total") <= stats.num_generated_tokens


async def test_default_model_through_http(default_model_dir):
    """The embedded default model (what `afkv serve` serves without --model): chat and completions
    through HTTP equal the engine's greedy answers, usage counts its tokens."""
    async with Engine(None, progress=False) as engine:
        async with live_server(engine, "default", engine.tokenizer) as (server, url):
            client = openai_client(url)
            expected = await engine.complete(MESSAGES, SamplingParams(max_tokens=8, temperature=0))
            got = await client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=8,
                                                       temperature=0)
            assert got.choices[0].message.content == expected.text
            assert got.choices[0].finish_reason == expected.finish_reason
            assert got.usage.completion_tokens == len(expected.token_ids)
            assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
            stream = await client.completions.create(model="default", prompt="The capital of France is", max_tokens=6,
                                                     temperature=0, stream=True)
            text = "".join([e.choices[0].text async for e in stream])
            assert text == (await engine.complete("The capital of France is",
                                                  SamplingParams(max_tokens=6, temperature=0))).text
            await client.close()
