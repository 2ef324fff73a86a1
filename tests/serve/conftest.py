"""A live `afkv serve` on loopback, in the test's event loop: an OpenAIServer on a real socket
in front of an Engine the test can also call directly (to compare answers and count blocks)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from afkv.serve.http import OpenAIServer, ServedModel

API_KEY = "test-key"


@contextlib.asynccontextmanager
async def live_server(engine, name: str, tokenizer, api_key: str | None = API_KEY):
    server = OpenAIServer(engine, ServedModel(name, tokenizer), api_key)
    ready = asyncio.Event()
    task = asyncio.create_task(server.serve("127.0.0.1", 0, ready))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield server, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        await asyncio.wait_for(task, 30)


def openai_client(base_url: str, api_key: str = API_KEY, **kw):
    import openai

    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=60.0, **kw)


async def wait_until(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll `predicate()` (bounded): the engine frees blocks at its next step."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(metrics: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


async def http(url: str, path: str, method: str = "GET", body: bytes | None = None,
               headers: dict | None = None) -> tuple[int, bytes]:
    """A plain HTTP request (urllib, in a thread) -> (status, body)."""
    import urllib.error
    import urllib.request

    def go():
        req = urllib.request.Request(url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    return await asyncio.to_thread(go)


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    status, body = await http(url, "/metrics")
    assert status == 200
    return parse_metrics(body.decode())
