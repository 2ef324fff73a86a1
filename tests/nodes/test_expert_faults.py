"""An expert node (a real process) against malformed or hostile control-plane peers that
hold the token: each bad request fails alone with a typed error, the attention node's
requests beside them are unharmed, the node's log stays short and its worker thread free."""

import asyncio

import pytest

from afkv import Engine, SamplingParams
from afkv.errors import FrameError
from afkv.nodes.rendezvous import lookup
from afkv.serve.launch import Deployment
from afkv.transport.control import ControlClient, ControlLimits
from tests.helpers import random_prompt
from tests.nodes.test_disaggregated import _colocated, _write_config

PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)
BOUND_S = 60.0


@pytest.fixture(scope="module")
def dep(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("expert-faults")
    path = _write_config(tmp, 1, 1, timeout_s=3.0)
    with Deployment(path, tiny_dir["mixtral"], start_attention=False, log_dir=tmp / "logs") as dep:
        yield dep


async def _peer(dep, name: str, heartbeats: bool = True) -> ControlClient:
    """An authenticated peer; heartbeats=False: one that sends nothing of its own (dropped)."""
    [(host, port)] = lookup(dep._store, "expert", 1, 5.0)
    limits = ControlLimits(heartbeat_interval_s=0.5) if heartbeats else ControlLimits()
    return await ControlClient.connect(host, port, token=dep.token, role="attention", node_id=name, limits=limits)


MALFORMED = [
    {"type": "step", "caps": [8], "mb_caps": [16], "epoch": 0},  # from a peer that never joined
    {"type": "step", "caps": [8, 8], "mb_caps": [16]},  # capacities for two micro-batches, one announced
    {"type": "step", "caps": "eight", "mb_caps": [16]},
    {"type": "step", "mb_caps": [16]},
    {"type": "nccl_init", "key": 7, "gpu": ""},
    {"type": "eplb_prepare", "placement": {"num_nodes": 1}, "peers": []},
    {"type": "eplb_commit", "epoch": 99},  # nothing prepared
    {"type": "expert_weights", "pieces": 3, "max_bytes": "x"},
    {"type": "ffn_time", "caps": ["x"]},
    {"type": "ffn", "layer": 0},  # no such message (the message plane is gone)
]


async def test_malformed_requests_fail_alone_beside_a_real_step(dep, tiny_dir):
    model = tiny_dir["mixtral"]
    cfg = dep.attached_config()
    prompts = [random_prompt(6 + i, 256, seed=i) for i in range(4)]
    expected = await _colocated(model, cfg, prompts, PARAMS)
    log_file = dep.log_dir / f"node{dep.expert_rank(0)}.log"
    lines_before = len(log_file.read_text().splitlines())
    flooder = await _peer(dep, "flooder")
    async with Engine(model, cfg, progress=False) as engine:
        async def flood():
            refused = 0
            while not done.is_set():
                for msg in MALFORMED:
                    with pytest.raises(FrameError):
                        await flooder.request(msg, timeout_s=BOUND_S)
                    refused += 1
            return refused

        done = asyncio.Event()
        flooding = asyncio.create_task(flood())
        try:
            async with asyncio.timeout(BOUND_S):
                got = await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))
        finally:
            done.set()
        assert [g.token_ids for g in got] == expected
        assert await flooding >= len(MALFORMED)
    await flooder.aclose()
    new_lines = log_file.read_text().splitlines()[lines_before:]
    assert len(new_lines) < 4 * len(MALFORMED), new_lines[:20]  # once per kind, not once per request


async def test_nccl_init_never_blocks_the_worker(dep):
    """nccl_init naming ids that are not in the rendezvous is refused at once; a request that
    needs the node's worker thread (stats) is answered right after."""
    client = await _peer(dep, "joiner")
    try:
        for _ in range(3):
            with pytest.raises(FrameError, match="no data-plane ids"):
                await client.request({"type": "nccl_init", "key": "afkv/nccl/9/0/1", "gpu": ""}, timeout_s=BOUND_S)
        reply = await client.request({"type": "stats"}, timeout_s=10.0)  # the store's timeout is 60 s
        assert reply["index"] == 0
    finally:
        await client.aclose()


async def test_frames_are_bounded_and_idle_peers_dropped(dep):
    client = await _peer(dep, "sizes", heartbeats=False)
    try:
        assert (await client.request({"type": "stats"}, timeout_s=BOUND_S))["index"] == 0
        async with asyncio.timeout(BOUND_S):  # no heartbeats: dropped after expert_timeout_s
            await client.wait_closed()
    finally:
        await client.aclose()
    client = await _peer(dep, "huge", heartbeats=False)
    try:
        await client.send({"type": "stats", "pad": b"x" * (2 * 2**20)})  # above any message: closed unread
        async with asyncio.timeout(BOUND_S):
            await client.wait_closed()
    finally:
        await client.aclose()
