"""An attention node's API port against hostile or broken clients, on a deployment of real
processes (1 attention node, 1 expert node, a tiny model that takes text): typed refusals,
deadlines after the handshake, bounded frames; the requests of other clients go on."""

import asyncio

import pytest

import afkv
from afkv import SamplingParams
from afkv.errors import FrameError, FrameTooLargeError, PeerLostError, PromptTooLongError
from afkv.nodes.rendezvous import lookup
from afkv.serve.api import params_to_wire
from afkv.serve.launch import Deployment
from afkv.transport.control import HEADER, MAGIC, SCHEMA_VERSION, ControlClient, ControlLimits, encode_frame
from tests.nodes.test_disaggregated import _write_config

CLIENT_TIMEOUT_S = 3.0
STREAM = SamplingParams(max_tokens=60, ignore_eos=True)
BOUND_S = 60.0


@pytest.fixture(scope="module")
def dep(tiny_text_dir, tmp_path_factory):
    path = _write_config(tmp_path_factory.mktemp("api"), 1, 1, timeout_s=5.0,
                         extra=f"client_timeout_s = {CLIENT_TIMEOUT_S}")
    with Deployment(path, tiny_text_dir) as dep:
        yield dep


@pytest.fixture
async def expected(dep):
    async with await afkv.attach(dep.address, token=dep.token) as engine:
        return (await engine.complete("hello", STREAM)).token_ids


class Raw:
    """An authenticated client speaking the API protocol by hand; collects what the node sends."""

    def __init__(self):
        self.messages: list[dict] = []
        self.arrived = asyncio.Condition()

    async def connect(self, dep, name: str, heartbeats: bool = True) -> ControlClient:
        """heartbeats=False: a client that sends nothing of its own (the node drops it)."""
        [(host, port)] = lookup(dep._store, "attention", 1, 5.0)
        limits = ControlLimits(heartbeat_interval_s=0.5) if heartbeats else ControlLimits()

        async def handler(conn, msg):
            async with self.arrived:
                self.messages.append(msg)
                self.arrived.notify_all()

        return await ControlClient.connect(host, port, token=dep.token, role="client", node_id=name, handler=handler,
                                           limits=limits)

    async def until(self, predicate) -> list[dict]:
        async with asyncio.timeout(BOUND_S), self.arrived:
            await self.arrived.wait_for(lambda: predicate(self.messages))
        return self.messages


def _finished(rid):
    return lambda msgs: any(m.get("rid") == rid and (m["type"] == "failed" or m["chunk"]["finish_reason"])
                            for m in msgs)


async def test_generate_without_rid_or_with_a_rid_in_flight_is_refused_typed(dep, expected):
    raw = Raw()
    client = await raw.connect(dep, "rids")
    try:
        generate = {"type": "generate", "prompt": "hello", "params": params_to_wire(STREAM)}
        with pytest.raises(FrameError, match="needs an int 'rid'"):
            await client.request(generate, timeout_s=BOUND_S)
        with pytest.raises(FrameError, match="needs an int 'rid'"):
            await client.request({**generate, "rid": True}, timeout_s=BOUND_S)
        await client.request({**generate, "rid": 5}, timeout_s=BOUND_S)
        with pytest.raises(FrameError, match="rid 5 is already streaming"):
            await client.request({**generate, "rid": 5}, timeout_s=BOUND_S)
        msgs = await raw.until(_finished(5))
        tokens = [t for m in msgs if m.get("rid") == 5 for t in m["chunk"]["token_ids"]]
        assert tokens == expected  # the first stream went on, alone under its rid
    finally:
        await client.aclose()


async def test_idle_and_slow_clients_are_dropped(dep):
    raw = Raw()
    idle = await raw.connect(dep, "idle", heartbeats=False)  # never sends anything
    async with asyncio.timeout(BOUND_S):
        await idle.wait_closed()
    assert isinstance(idle.closed_reason, PeerLostError)
    slow = await raw.connect(dep, "slow", heartbeats=False)
    frame = encode_frame({"type": "stats", "id": 1})
    async with asyncio.timeout(BOUND_S):
        for byte in frame[:5]:  # one byte at a time, then nothing: never a whole frame
            slow._conn._writer.write(bytes([byte]))
            await slow._conn._writer.drain()
        await slow.wait_closed()
    assert isinstance(slow.closed_reason, PeerLostError)


async def test_frames_are_bounded_per_message_type(dep, expected):
    raw = Raw()
    client = await raw.connect(dep, "sizes")
    try:
        with pytest.raises(FrameTooLargeError, match="'stats' message may hold"):
            await client.request({"type": "stats", "pad": "x" * 100_000}, timeout_s=BOUND_S)
        assert (await client.request({"type": "stats"}, timeout_s=BOUND_S))["num_steps"] >= 0
        # a frame above what any message may hold closes that connection, unread
        client._conn._writer.write(HEADER.pack(MAGIC, SCHEMA_VERSION, 8 * 2**20))
        async with asyncio.timeout(BOUND_S):
            await client.wait_closed()
    finally:
        await client.aclose()


async def test_huge_text_prompt_beside_a_stream(dep, expected):
    """A client sends a 3 MiB text prompt while another streams: the stream is unharmed (the
    node's loop never tokenizes: it refuses the frame unread, or tokenizes on its thread)."""
    async with await afkv.attach(dep.address, token=dep.token) as engine:
        beside = asyncio.create_task(engine.complete("hello", STREAM))
        raw = Raw()
        client = await raw.connect(dep, "huge")
        with pytest.raises(PeerLostError):
            async with asyncio.timeout(BOUND_S):
                await client.request({"type": "generate", "rid": 1, "prompt": "x" * (3 * 2**20),
                                      "params": params_to_wire(STREAM)}, timeout_s=BOUND_S)
        await client.aclose()
        async with asyncio.timeout(BOUND_S):
            assert (await beside).token_ids == expected
        with pytest.raises(PromptTooLongError):  # the attached client refuses it itself
            await engine.complete("x" * (3 * 2**20), STREAM)


async def test_a_bad_request_beside_three_good_ones(dep, expected):
    """Parameters that only a raw client can send (bool for an int, a tiny temperature) fail
    that request alone, typed; three good requests in flight at the same time finish."""
    async with await afkv.attach(dep.address, token=dep.token) as engine:
        raw = Raw()
        client = await raw.connect(dep, "bad-params")
        try:
            for rid, bad in enumerate(({"logprobs": True}, {"prompt_logprobs": True}, {"temperature": 1e-40},
                                       {"seed": "x"}, {"no_such_field": 1})):
                good = [asyncio.create_task(engine.complete("hello", STREAM)) for _ in range(3)]
                await client.request({"type": "generate", "rid": rid, "prompt": "hello",
                                      "params": {**params_to_wire(STREAM), **bad}}, timeout_s=BOUND_S)
                [failed] = [m for m in await raw.until(_finished(rid)) if m.get("rid") == rid]
                assert failed["type"] == "failed" and failed["error"]["class"] == "InvalidSamplingParamsError"
                async with asyncio.timeout(BOUND_S):
                    assert [(await g).token_ids for g in good] == [expected] * 3
        finally:
            await client.aclose()
