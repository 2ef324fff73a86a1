"""Faults seen by an attached client (`Engine.attach`) of a deployment of real processes on
loopback: every request ends with a typed error or its last chunk, within a bound."""

import asyncio
import signal

import pytest

from afkv import Engine, SamplingParams
from afkv.errors import ExpertUnavailableError
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
    path = _write_config(tmp_path, 1, 1, timeout_s=2.0)
    with Deployment(path, tiny_dir["mixtral"]) as dep:
        expert = dep.procs[dep.expert_rank(0)]
        async with await Engine.attach(dep.address, token=dep.token) as engine:
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
