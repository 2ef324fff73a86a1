"""`afkv serve --attach`: the HTTP server in front of a deployment (`afkv launch`) gives the
colocated answers; its node logs record start-up, joins and losses; a lost expert node with no
replica is a 503 (the typed error crosses the attached connection with its fields). And the disaggregated metrics of an attention node (AF timings, EPLB load)."""

from __future__ import annotations

import dataclasses
import re

import openai
import pytest

import afkv
from afkv import Engine, EngineConfig, SamplingParams
from afkv.model.tokenizer import Tokenizer
from afkv.serve.launch import Deployment
from afkv.serve.metrics import engine_samples
from tests.serve.conftest import http, live_server, metric_sum, openai_client, scrape, wait_until

# a node's log line for a lost peer, whichever way the socket ended (afkv.transport.control)
LOSS = re.compile(r"control connection ended: .*(closed the connection|end of stream|connection broken|no whole frame)")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _write_config(tmp_path, extra: str = "") -> str:
    path = tmp_path / "deploy-1a1f.toml"
    path.write_text(f"""
[kv]
block_size = 16
num_blocks = 256
[deployment]
attention_nodes = 1
expert_nodes = 1
micro_batches = 2
port = 0
expert_timeout_s = 5.0
{extra}
""")
    return str(path)


async def test_serve_attach_answers_as_colocated(tiny_chat_dir, tmp_path):
    path = _write_config(tmp_path)
    log_dir = tmp_path / "logs"
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    async with Engine(tiny_chat_dir, dataclasses.replace(EngineConfig.from_toml(path), deployment=None),
                      progress=False) as local:
        chat = await local.complete(MESSAGES, greedy)
        text = await local.complete("The capital of France is", greedy)
    with Deployment(path, tiny_chat_dir, log_dir=log_dir) as dep:
        async with await afkv.attach(dep.address, token=dep.token) as attached:
            async with live_server(attached, "tiny", Tokenizer(tiny_chat_dir)) as (server, url):
                client = openai_client(url)
                got = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10,
                                                           temperature=0, logprobs=True, top_logprobs=2,
                                                           extra_body={"ignore_eos": True})
                assert got.choices[0].message.content == chat.text
                assert [c.logprob for c in got.choices[0].logprobs.content] == pytest.approx(chat.logprobs, abs=1e-4)
                assert got.usage.prompt_tokens == len(chat.prompt_token_ids) and got.usage.completion_tokens == 10
                stream = await client.completions.create(model="tiny", prompt="The capital of France is",
                                                         max_tokens=10, temperature=0, stream=True,
                                                         extra_body={"ignore_eos": True})
                assert "".join([e.choices[0].text async for e in stream]) == text.text
                with pytest.raises(afkv.errors.FrameError, match=r"set_micro_batches needs an int m in \[0, 16\]"):
                    await attached.set_micro_batches(17)
                await attached.set_micro_batches(0)  # automatic: m chosen per step from measured times
                again = await attached.complete("The capital of France is", greedy)
                assert again.text == text.text

                m = await scrape(url)
                assert metric_sum(m, "afkv_generation_tokens_total", node="0") >= 20
                assert metric_sum(m, "afkv_layer_seconds", node="0", part="expert") > 0
                assert metric_sum(m, "afkv_kv_tier_capacity_blocks", node="0", tier="device") == 256  # the node's KV
                assert (await http(url, "/health"))[0] == 200

                logs = {rank: (log_dir / f"node{rank}.log").read_text() for rank in (0, 1)}
                assert "attention node 0 serving on" in logs[0] and "starting" in logs[0]
                assert "expert node 0 serving on" in logs[1] and "joined" in logs[1]  # the attention node joined
                assert "joined" in logs[0]  # the client (the HTTP server) joined the attention node

                dep.kill_node(1)  # the attention node records the loss of its expert node
                with pytest.raises(openai.APIStatusError) as exc:  # no replica serves its experts
                    await client.completions.create(model="tiny", prompt="The capital", max_tokens=3)
                assert exc.value.status_code == 503 and exc.value.body["code"] == "ExpertUnavailableError"
                assert (await http(url, "/health"))[0] == 200  # the attention node answers: the server keeps serving
                # the attention node logs the loss with its reason before it is killed in turn; the
                # reason's wording depends on how the kernel ended the socket (FIN, or RST when bytes
                # were left unread, or a frame cut short)
                await wait_until(lambda: LOSS.search((log_dir / "node0.log").read_text()), 30,
                                 "the attention node to log the loss of its expert node")
                dep.kill_node(0)
                assert (await http(url, "/health"))[0] == 503  # no attention node answers
                await client.close()


async def test_disaggregated_metrics_and_503(tiny_dir, tmp_path):
    """An attention node in this process: AF layer timings and EPLB's max/mean node load in its
    metrics; once its only expert node is lost, HTTP requests get 503 and the server keeps serving."""
    model = str(tiny_dir["mixtral"])
    path = _write_config(tmp_path, "[eplb]\nenabled = true\nslots_per_node = 8")
    with Deployment(path, model, start_attention=False) as dep:
        cfg = EngineConfig.from_toml(path)
        cfg = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
        async with Engine(model, cfg, progress=False) as engine:
            await engine.complete([5, 6, 7, 8], SamplingParams(max_tokens=8, ignore_eos=True))
            samples = {(s.name, s.labels): s.value for s in await engine_samples(engine)}
            for part in ("attention", "transfer", "expert", "idle"):
                assert ("layer_seconds", (("node", "0"), ("part", part))) in samples
            assert samples[("layer_seconds", (("node", "0"), ("part", "expert")))] > 0
            assert samples[("eplb_max_mean_load", ())] >= 1.0

            async with live_server(engine, "tiny", None) as (server, url):
                client = openai_client(url)
                assert (await client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3)).choices
                dep.kill_node(dep.expert_rank(0))  # no replica serves its experts
                with pytest.raises(openai.APIStatusError) as exc:
                    await client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3)
                assert exc.value.status_code == 503 and exc.value.body["type"] == "service_unavailable"
                assert exc.value.body["code"] == "ExpertUnavailableError"
                assert (await http(url, "/health"))[0] == 200
                m = await scrape(url)
                assert metric_sum(m, "afkv_requests_total", outcome="error_5xx") == 1
                await client.close()
