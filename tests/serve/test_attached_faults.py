"""Faults seen by an attached client (`afkv.attach`) of a deployment of real processes on
loopback: every request ends with a typed error or its last chunk, within a bound."""

import asyncio
import signal
import socket

import pytest

import afkv
from afkv import EngineStats, SamplingParams
from afkv.errors import ExpertUnavailableError, PeerLostError
from afkv.serve.launch import Deployment
from tests.nodes.test_disaggregated import _write_config

LONG = SamplingParams(max_tokens=2000, ignore_eos=True)
BOUND_S = 60.0  # no fault may leave a request waiting longer than this


async def _first_chunk_then_wait(engine, prompt):
    """Start a long stream; return (task consuming the rest, event set at its first chunk)."""
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(prompt, LONG):
            started.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(BOUND_S):
        await started.wait()
    return task


@pytest.mark.parametrize("fault", ["kill", "stop"])
async def test_expert_fault_reaches_the_attached_client_typed(tiny_dir, tmp_path, fault):
    path = _write_config(tmp_path, 1, 1, timeout_s=3.0)
    with Deployment(path, tiny_dir["mixtral"]) as dep:
        expert = dep.procs[dep.expert_rank(0)]
        async with await afkv.attach(dep.address, token=dep.token) as engine:
            task = await _first_chunk_then_wait(engine, [5, 6, 7])
            if fault == "kill":
                dep.kill_node(dep.expert_rank(0))
            else:
                expert.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(ExpertUnavailableError) as caught:
                    async with asyncio.timeout(BOUND_S):
                        await task
            finally:
                if fault == "stop":
                    expert.send_signal(signal.SIGCONT)
            # class and fields crossed the wire: which layer, which node
            assert caught.value.nodes == (0,) and isinstance(caught.value.layer, int)


async def test_frozen_attention_node_ends_the_attached_request(tiny_dir, tmp_path):
    """SIGSTOP of the attention node: its heartbeats stop, the client gives up after its
    peer_timeout_s; once the node thaws, the next request reconnects and is served."""
    path = _write_config(tmp_path, 1, 1)
    with Deployment(path, tiny_dir["mixtral"]) as dep:
        attention = dep.procs[0]
        async with await afkv.attach(dep.address, token=dep.token, peer_timeout_s=2.0) as engine:
            task = await _first_chunk_then_wait(engine, [5, 6, 7])
            attention.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(PeerLostError, match="attention node 0 lost"):
                    async with asyncio.timeout(BOUND_S):
                        await task
            finally:
                attention.send_signal(signal.SIGCONT)
            done = await engine.complete([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
            assert len(done.token_ids) == 4
            [stats] = await engine.stats()  # one shape with Engine.stats()
            assert isinstance(stats, EngineStats) and stats.num_generated_tokens >= 4


async def test_attach_where_nothing_listens_fails_at_once():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerLostError, match="nothing listens"):
        async with asyncio.timeout(10):  # the attach timeout (60 s) is not waited for
            await afkv.attach(f"127.0.0.1:{port}", token="t", timeout_s=60.0)
