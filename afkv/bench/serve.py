"""`afkv bench serve`: what the HTTP server costs. The same workload (N concurrent streaming
requests of distinct random prompts, `gen_len` new tokens each, EOS ignored, greedy) runs on
one Engine twice, alternately, `repeats` times:

    direct  the in-process API: N concurrent `engine.generate` streams
    http    `afkv serve` on loopback in front of that engine, N concurrent SSE streams of
            /v1/completions from a client in another process (a lean HTTP/1.1 client, so that
            its own parsing takes little of the machine's CPU)

tok/s: generated tokens / (last token - first request); TTFT: mean over requests of
first token - request sent, measured where the request is made. The best run of each side
is compared (the machine may be shared); ratio = http / direct.
"""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys
import time
from statistics import mean

import torch

from afkv.config import EngineConfig, KVConfig
from afkv.engine.engine import Engine
from afkv.engine.params import SamplingParams
from afkv.serve.http import OpenAIServer, ServedModel

MODEL_NAME = "bench"


def _prompts(n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, prompt_len), generator=g).tolist()


def _summary(times: list[tuple[float, float, float, int]]) -> dict:
    """times: per request (sent, first token, last token, tokens)."""
    start = min(t[0] for t in times)
    end = max(t[2] for t in times)
    tokens = sum(t[3] for t in times)
    return {"tok_s": tokens / max(end - start, 1e-9), "ttft_s": mean(t[1] - t[0] for t in times),
            "tokens": tokens, "wall_s": end - start}


async def _direct(engine: Engine, prompts: list[list[int]], gen_len: int) -> dict:
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)

    async def one(prompt):
        sent = time.perf_counter()
        first, n = None, 0
        async for chunk in engine.generate(prompt, params):
            n += len(chunk.token_ids)
            first = first or time.perf_counter()
        return sent, first, time.perf_counter(), n

    return _summary(await asyncio.gather(*(one(p) for p in prompts)))


async def _http(port: int, prompts: list[list[int]], gen_len: int) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "afkv.bench.serve", str(port), str(gen_len),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = await proc.communicate(json.dumps(prompts).encode())
    if proc.returncode != 0:
        raise RuntimeError(f"the HTTP client exited with {proc.returncode}")
    return _summary([tuple(t) for t in json.loads(out)])


async def run_serve_bench(model: str | None, config: EngineConfig | None, concurrency: int, prompt_len: int,
                          gen_len: int, repeats: int, progress=print) -> dict:
    # default: device KV for every stream at once (the default 256 MiB holds ~60 such streams of the
    # default model in float32: more would preempt and recompute, timing the scheduler, not HTTP)
    cfg = config or EngineConfig(kv=KVConfig(device_memory_mib=1024))
    runs: dict[str, list[dict]] = {"direct": [], "http": []}
    async with Engine(model, cfg) as engine:
        progress(f"model: {engine.model_dir} ({engine.spec.family.value}, {engine.spec.num_layers} layers)")
        server = OpenAIServer(engine, ServedModel(MODEL_NAME, engine.tokenizer))
        ready = asyncio.Event()
        serving = asyncio.ensure_future(server.serve("127.0.0.1", 0, ready))
        try:
            await ready.wait()
            await _direct(engine, _prompts(4, prompt_len, engine.spec.vocab_size, 999), 4)  # warm-up
            await _http(server.port, _prompts(4, prompt_len, engine.spec.vocab_size, 998), 4)
            for r in range(repeats):
                for side in ("direct", "http"):
                    prompts = _prompts(concurrency, prompt_len, engine.spec.vocab_size, seed=1000 * r + len(side))
                    preempted = engine.stats().num_preemptions
                    res = await (_direct(engine, prompts, gen_len) if side == "direct"
                                 else _http(server.port, prompts, gen_len))
                    res["preemptions"] = engine.stats().num_preemptions - preempted
                    runs[side].append(res)
                    progress(f"  run {r + 1} {side:>6}: {res['tok_s']:.1f} tok/s, TTFT {res['ttft_s'] * 1e3:.0f} ms, "
                             f"{res['preemptions']} preemptions")
        finally:
            server.stop()
            await serving
    best = {side: max(rs, key=lambda x: x["tok_s"]) for side, rs in runs.items()}
    return {
        "bench": "serve",
        "model": str(model or "default"),
        "concurrency": concurrency,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "runs": runs,
        "best": best,
        "tok_s_ratio": best["http"]["tok_s"] / best["direct"]["tok_s"],
        "ttft_ratio": best["http"]["ttft_s"] / best["direct"]["ttft_s"],
    }


def format_table(result: dict) -> str:
    b = result["best"]
    head = f"{'path':>8} | {'tok/s':>8} | {'TTFT ms':>8}"
    lines = [f"{result['concurrency']} concurrent streams, {result['prompt_len']} prompt + {result['gen_len']} new "
             "tokens each (best run of each)", head, "-" * len(head)]
    for side in ("direct", "http"):
        lines.append(f"{side:>8} | {b[side]['tok_s']:>8.1f} | {b[side]['ttft_s'] * 1e3:>8.0f}")
    lines.append(f"HTTP / direct: tok/s x{result['tok_s_ratio']:.3f}, TTFT x{result['ttft_ratio']:.3f}")
    return "\n".join(lines)


# ---- the client process: python -m afkv.bench.serve PORT GEN_LEN < prompts.json -------------------
async def _stream_one(port: int, prompt: list[int], gen_len: int) -> tuple[float, float, float, int]:
    body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": gen_len, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"HTTP status {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    first, tokens, buf = None, 0, b""
    while True:  # chunked transfer encoding of SSE events
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        buf += (await reader.readexactly(size + 2))[:-2]
        *events, buf = buf.split(b"\n\n")
        for event in events:
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                continue
            obj = json.loads(data)
            if obj["choices"]:
                first = first or time.perf_counter()
            elif obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    writer.close()
    return sent, first, time.perf_counter(), tokens


async def _client(port: int, gen_len: int, prompts: list[list[int]]) -> list:
    return await asyncio.gather(*(_stream_one(port, p, gen_len) for p in prompts))


if __name__ == "__main__":
    from afkv.serve import run_async

    _port, _gen_len = int(sys.argv[1]), int(sys.argv[2])
    print(json.dumps(run_async(_client(_port, _gen_len, json.loads(sys.stdin.read())))))
