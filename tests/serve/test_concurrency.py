"""200 concurrent streaming requests through HTTP, 50 of whose clients disconnect at random
points: every KV block comes back, the other 150 finish untouched, /metrics agrees."""

from __future__ import annotations

import asyncio
import random


from afkv import Engine
from afkv.config import EngineConfig, KVConfig, SchedulerConfig
from tests.serve.conftest import live_server, metric_sum, openai_client, scrape, wait_until

NUM_REQUESTS, NUM_LEAVING, MAX_TOKENS = 200, 50, 12


async def test_200_streams_with_50_disconnects(tiny_chat_dir):
    cfg = EngineConfig(kv=KVConfig(block_size=16, num_blocks=1024), scheduler=SchedulerConfig(max_num_seqs=64))
    rng = random.Random(0)
    leaving = dict(zip(rng.sample(range(NUM_REQUESTS), NUM_LEAVING),
                       (rng.randrange(0, MAX_TOKENS) for _ in range(NUM_LEAVING))))  # request -> events it reads
    async with Engine(tiny_chat_dir, cfg, progress=False) as engine:
        async with live_server(engine, "tiny", engine.tokenizer) as (server, url):
            client = openai_client(url)

            async def one(i: int):
                stream = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"Question number {i}: why?"}],
                    max_tokens=MAX_TOKENS, temperature=0.8, seed=i, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                events = []
                async for event in stream:
                    events.append(event)
                    if i in leaving and len(events) > leaving[i]:
                        await stream.close()  # the client goes away mid-stream
                        return None
                return events

            results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(NUM_REQUESTS))), 240)
            await wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_waiting == 0,
                             what="every request to end")
            stats = engine.stats()
            assert stats.num_free_blocks == stats.num_blocks  # every block freed (cached ones are free)
            for i, events in enumerate(results):
                if i in leaving:
                    continue
                assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
                assert events[-1].usage.completion_tokens == MAX_TOKENS

            m = await scrape(url)
            length = metric_sum(m, "afkv_requests_total", outcome="length")
            aborted = metric_sum(m, "afkv_requests_total", outcome="abort")
            assert metric_sum(m, "afkv_requests_total") == NUM_REQUESTS == length + aborted
            assert length >= NUM_REQUESTS - NUM_LEAVING  # a client may leave after its last token was sent
            assert metric_sum(m, "afkv_e2e_request_latency_seconds_count") == length
            assert metric_sum(m, "afkv_inter_token_latency_seconds_count") == length * (MAX_TOKENS - 1)
            assert metric_sum(m, "afkv_http_requests_in_progress") == 0
            assert metric_sum(m, "afkv_num_requests_running") == 0
            sent = metric_sum(m, "afkv_request_completion_tokens_total")
            assert length * MAX_TOKENS <= sent <= stats.num_generated_tokens
            await client.close()
