"""Attention-FFN disaggregation on the CPU: expert nodes as processes on loopback, the
fixed-buffer data plane over host peers.

Every topology and micro-batch count must give the colocated engine's greedy tokens (each
expert node receives only its rows; qwen2_moe: plus the shared expert's, every row).
"""

import asyncio
import dataclasses
import signal
import subprocess
import sys
import time

import pytest

import afkv
from afkv import Engine, EngineConfig, SamplingParams
from afkv.errors import AuthError, PromptTooLongError, RequestFailedError, TransportError
from afkv.serve.launch import Deployment
from afkv.transport.control import ControlClient
from tests.helpers import random_prompt

TOPOLOGIES = [(1, 1), (1, 2), (2, 1), (2, 2)]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def _write_config(tmp_path, attention, experts, *, timeout_s=10.0, extra=""):
    path = tmp_path / f"deploy-{attention}a{experts}f.toml"
    path.write_text(f"""
[kv]
block_size = 4
num_blocks = 256
[scheduler]
max_num_batched_tokens = 24
[deployment]
attention_nodes = {attention}
expert_nodes = {experts}
micro_batches = 2
port = 0
expert_timeout_s = {timeout_s}
{extra}
""")
    return path


def _attached_config(path, dep: Deployment) -> EngineConfig:
    return dep.attached_config()


async def _colocated(model, cfg: EngineConfig, prompts, params=PARAMS):
    async with Engine(model, dataclasses.replace(cfg, deployment=None), progress=False) as e:
        return [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe", "default"])
def model(request, tiny_dir, default_model_dir):
    return None if request.param == "default" else str(tiny_dir[request.param])


@pytest.mark.parametrize("attention,experts", TOPOLOGIES, ids=[f"{a}A{f}F" for a, f in TOPOLOGIES])
async def test_topologies_match_colocated(model, attention, experts, tmp_path):
    path = _write_config(tmp_path, attention, experts)
    vocab = 256 if model else 49152
    prompts = [random_prompt(4 + 5 * i, vocab, seed=i) for i in range(5)]
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached_config(path, dep)
        expected = await _colocated(model, cfg, prompts)
        engines = [Engine(model, cfg, progress=False, attention_rank=i) for i in range(attention)]
        for e in engines:
            await e.start()
        try:
            assert type(engines[0]._remote).__name__ == "RemoteFFN"
            for m in (1, 2, 3, 0):  # 0: chosen per step from measured times (m changes between steps)
                for e in engines:
                    e.set_micro_batches(m)
                # every attention node runs its own batch, all at the same time
                results = await asyncio.gather(*(
                    asyncio.gather(*(e.complete(p, PARAMS) for p in prompts)) for e in engines))
                for per_engine in results:
                    assert [r.token_ids for r in per_engine] == expected, f"m={m}"
            timings = engines[0].layer_timings()
            assert timings["expert_s"] > 0 and timings["attention_s"] > 0
        finally:
            for e in engines:
                await e.aclose()


async def test_expert_node_death_fails_requests_then_recovers(tiny_dir, tmp_path):
    model = str(tiny_dir["mixtral"])
    path = _write_config(tmp_path, 1, 2, timeout_s=3.0)
    prompts = [random_prompt(6, 256, seed=i) for i in range(3)]
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached_config(path, dep)
        expected = await _colocated(model, cfg, prompts)
        async with Engine(model, cfg, progress=False) as engine:
            started = asyncio.Event()

            async def consume():
                async for _ in engine.generate(prompts[0], long):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            t0 = time.monotonic()
            dep.kill_node(dep.expert_rank(1))
            with pytest.raises(RequestFailedError, match="expert node"):
                async with asyncio.timeout(20):
                    await task
            assert time.monotonic() - t0 < 3.0 + 5.0  # within the configured timeout (plus slack)
            # while the node is down, requests fail fast with a clear error; nothing hangs
            with pytest.raises(RequestFailedError):
                async with asyncio.timeout(20):
                    await engine.complete(prompts[1], PARAMS)
            # the node comes back: the attention node serves again, same tokens
            dep.start_node(dep.expert_rank(1))
            dep.wait_ready("expert", 2)
            got = [r.token_ids for r in await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))]
            assert got == expected
            kv = engine.kv_manager
            assert kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks


async def test_automatic_micro_batches_measure_then_keep_one(tiny_dir, tmp_path):
    # micro_batches = 0: the engine times m = 1 and m = 2 on the decode steps of a 4-row bucket
    # (2 warm-up + 5 counted steps each), then runs the faster; tokens stay the colocated ones
    model = str(tiny_dir["mixtral"])
    path = _write_config(tmp_path, 1, 1)
    path.write_text(path.read_text().replace("micro_batches = 2", "micro_batches = 0"))
    prompts = [random_prompt(5, 256, seed=10 + i) for i in range(4)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached_config(path, dep)
        assert cfg.deployment.micro_batches == 0
        expected = await _colocated(model, cfg, prompts, params)
        async with Engine(model, cfg, progress=False) as engine:
            assert engine.micro_batch_choices() == {}
            got = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
            assert [g.token_ids for g in got] == expected
            choices = engine.micro_batch_choices()
            assert list(choices) == [4] and choices[4] in (1, 2)
            engine.set_micro_batches(2)  # fixed: measuring stops
            assert engine.micro_batch_choices() == {} and engine.micro_batches == 2


@pytest.mark.parametrize("batching", ["per_attention_node", "merged"])
async def test_attention_node_leaving_drops_its_data_plane(tiny_dir, tmp_path, batching):
    # an attention node's control connection ends: the expert node aborts that node's peers and
    # drops its link (no receive left waiting for a dead peer, no lane kept); the other attention
    # node goes on; one whose connection broke while it lives joins again and gets the same tokens
    model = str(tiny_dir["mixtral"])
    path = _write_config(tmp_path, 2, 1, extra=f'expert_batching = "{batching}"')
    prompts = [random_prompt(6, 256, seed=20 + i) for i in range(3)]
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached_config(path, dep)
        expected = await _colocated(model, cfg, prompts)
        a, b = (Engine(model, cfg, progress=False, attention_rank=i) for i in range(2))
        await a.start()
        await b.start()
        try:
            async def expert_stats():
                return await a._remote.links.request(0, {"type": "stats"})

            for e in (a, b):
                assert [r.token_ids for r in await asyncio.gather(*(e.complete(p, PARAMS) for p in prompts))] == expected
            assert (await expert_stats())["links"] == 2
            await b.aclose()
            async with asyncio.timeout(20):
                while (stats := await expert_stats())["links"] != 1:
                    await asyncio.sleep(0.05)
            assert stats["links_dropped"] == 1
            assert [r.token_ids for r in await asyncio.gather(*(a.complete(p, PARAMS) for p in prompts))] == expected
            # a's control connection breaks while a lives: its data plane is dropped, its next
            # step finds the peers gone, joins again and is computed again
            await a._remote.links._clients[0].aclose()
            async with asyncio.timeout(30):
                got = await asyncio.gather(*(a.complete(p, PARAMS) for p in prompts))
            assert [r.token_ids for r in got] == expected
            stats = await expert_stats()
            assert stats["links"] == 1 and stats["links_dropped"] == 2
        finally:
            await a.aclose()
            await b.aclose()


async def test_hung_expert_node_times_out(tiny_dir, tmp_path):
    model = str(tiny_dir["mixtral"])
    path = _write_config(tmp_path, 1, 1, timeout_s=1.5)
    with Deployment(path, model, start_attention=False) as dep:
        async with Engine(model, _attached_config(path, dep), progress=False) as engine:
            assert len((await engine.complete([5, 6, 7], PARAMS)).token_ids) == 12
            dep.procs[dep.expert_rank(0)].send_signal(signal.SIGSTOP)  # alive but silent
            try:
                t0 = time.monotonic()
                with pytest.raises(RequestFailedError, match="did not answer|expert node"):
                    async with asyncio.timeout(20):
                        await engine.complete([5, 6, 7], PARAMS)
                assert time.monotonic() - t0 < 1.5 + 4.0
            finally:
                dep.procs[dep.expert_rank(0)].send_signal(signal.SIGCONT)
        # shutdown with a peer that was stalled does not deadlock (we got here)


async def test_token_required_and_bad_frames_rejected(tiny_dir, tmp_path):
    model = str(tiny_dir["mixtral"])
    path = _write_config(tmp_path, 1, 1, extra='token = "s3cret"')
    with Deployment(path, model, start_attention=False) as dep:
        from afkv.nodes.rendezvous import lookup

        [(host, port)] = lookup(dep._store, "expert", 1, 5.0)
        with pytest.raises(AuthError):
            await ControlClient.connect(host, port, token="wrong", role="attention", node_id="intruder")
        with pytest.raises(AuthError):
            await ControlClient.connect(host, port, role="attention", node_id="intruder")
        # garbage and an oversize length header close that connection only
        for junk in (b"GARBAGE" * 10, b"AFKC\x00\x01\xff\xff\xff\xff"):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(junk)
            await writer.drain()
            async with asyncio.timeout(5):
                await reader.read()  # the node closes the connection
            writer.close()
        # a malformed step from an authenticated peer gets an error, the node keeps serving
        client = await ControlClient.connect(host, port, token="s3cret", role="attention", node_id="probe")
        with pytest.raises(TransportError, match="malformed step"):
            await client.request({"type": "step", "caps": "x", "mb_caps": [16]}, timeout_s=5)
        await client.aclose()
        async with Engine(model, _attached_config(path, dep), progress=False) as engine:
            assert len((await engine.complete([1, 2, 3], PARAMS)).token_ids) == 12


async def test_launch_and_attach(tiny_dir, tmp_path):
    model = str(tiny_dir["qwen3_moe"])
    path = _write_config(tmp_path, 2, 1)
    prompts = [random_prompt(5 + i, 256, seed=i) for i in range(4)]
    with Deployment(path, model) as dep:
        expected = await _colocated(model, _attached_config(path, dep), prompts)
        async with await afkv.attach(dep.address, token=dep.token) as engine:
            got = await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))
            assert [g.token_ids for g in got] == expected
            assert got[0].prompt_token_ids == prompts[0] and got[0].metrics.ttft_s > 0
            with pytest.raises(PromptTooLongError):
                await engine.complete([5] * 600, PARAMS)
            chunks = [c async for c in engine.generate(prompts[0], SamplingParams(max_tokens=3, logprobs=2))]
            assert len(chunks) == 3 and len(chunks[0].top_logprobs[0]) == 2
            stats = await engine.stats()
            assert len(stats) == 2 and sum(s.num_generated_tokens for s in stats) >= 4 * 12


def test_cli_launch_stops_cleanly_on_ctrl_c(tiny_dir, tmp_path):
    path = _write_config(tmp_path, 1, 1)
    # started with SIGINT ignored, as a shell without job control starts a background job (CI):
    # Python then installs no KeyboardInterrupt handler, and launch must install its own
    proc = subprocess.Popen([sys.executable, "-m", "afkv.cli", "launch", str(path), "--model", str(tiny_dir["llama"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("127.0.0.1:")
        proc.send_signal(signal.SIGINT)
        # communicate drains both pipes while waiting (the launcher and its nodes log to stderr);
        # the bound covers the nodes' 15 s of grace before SIGKILL
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert "stopping" in err
    finally:
        if proc.poll() is None:
            proc.kill()
