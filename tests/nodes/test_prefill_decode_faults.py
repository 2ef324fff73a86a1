"""Faults of the KV hand-off (afkv.nodes.handoff): a prefill node lost or silent mid-transfer, a
corrupt row, a request cancelled during its hand-off. Prefill nodes run in this process
(engines behind real PrefillServers on loopback) so that a test decides exactly how many
batches one hands over before it fails: no timing decides what a test sees.

In every case: the request gets the colocated tokens (another prefill node sends the blocks
still awaited) or a typed error within the bound, a decode node never registers a block whose
rows did not land intact, and every block is freed on both sides."""

import asyncio
import contextlib
import dataclasses
import os

import pytest

from afkv import Engine, EngineConfig, SamplingParams
from afkv.config import DeploymentConfig, KVConfig, SchedulerConfig
from afkv.errors import PrefillUnavailableError
from afkv.kv.block_pool import chain_hashes
from afkv.nodes.handoff import SEGMENT_DIR
from afkv.nodes.rendezvous import RendezvousServer
from afkv.serve import prefill as prefill_module
from afkv.serve.prefill import PrefillServer
from tests.helpers import random_prompt
from tests.serve.conftest import wait_until

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
PROMPT = random_prompt(41, 256, seed=6)  # 10 full blocks of 4: two prefill steps of 24 tokens (6 + 4 blocks)
TOKEN = "pd-test-token"


class Gated:
    """A prefill engine as PrefillServer sees it, which hands over `after` batches and then
    holds the transfer (a node frozen mid-transfer) until its server closes or the decode
    node cancels."""

    def __init__(self, engine: Engine, after: int):
        self.engine, self.after = engine, after
        self.held = asyncio.Event()

    @property
    def kv_manager(self):
        return self.engine.kv_manager

    @property
    def max_model_len(self):
        return self.engine.max_model_len

    async def export_prefill(self, token_ids, want, fmt, into=None, slots=None):
        async with contextlib.aclosing(self.engine.export_prefill(token_ids, want, fmt, into, slots)) as batches:
            n = 0
            async for batch in batches:
                yield batch
                n += 1
                if n >= self.after:
                    self.held.set()
                    await asyncio.Event().wait()


def config(port: int, prefill: int, timeout_s: float = 20.0) -> EngineConfig:
    return EngineConfig(kv=KVConfig(block_size=4, num_blocks=128), scheduler=SchedulerConfig(max_num_batched_tokens=24),
                        deployment=DeploymentConfig(attention_nodes=1, expert_nodes=0, prefill_nodes=prefill, port=port,
                                                    token=TOKEN, prefill_timeout_s=timeout_s))


def received(engine: Engine) -> int:
    return engine.kv_metrics().counters.get("handoff_received_blocks", 0)


def all_free(engine: Engine) -> bool:
    kv = engine.kv_manager
    kv.check_invariants()
    return kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks


@contextlib.asynccontextmanager
async def cluster(model, num_prefill: int, gated_after: int | None, timeout_s: float = 20.0):
    """A rendezvous, `num_prefill` prefill engines behind PrefillServers and a decode engine.
    With gated_after, the prefill node the decode node picks first for PROMPT is Gated.
    -> (decode engine, prefill engines, servers, the Gated wrapper or None, index of the gated node)"""
    store = RendezvousServer("127.0.0.1", 0, TOKEN).start()
    cfg = config(store.port, num_prefill, timeout_s)
    local = dataclasses.replace(cfg, deployment=None)
    prefills = [Engine(model, local, progress=False) for _ in range(num_prefill)]
    servers: list[PrefillServer] = []
    try:
        for e in prefills:
            await e.start()
        async with Engine(model, cfg, progress=False) as decode:
            salt = decode.kv_manager.salt
            [first] = chain_hashes(PROMPT, 4, 1, salt)
            first_pick = decode._prefill.pick(first, set())
            gate = None
            for j, e in enumerate(prefills):
                front = e
                if gated_after is not None and j == first_pick:
                    front = gate = Gated(e, gated_after)
                servers.append(PrefillServer(front, "127.0.0.1", 0, token=TOKEN))
                port = await servers[-1].start()
                store.set(f"afkv/prefill/{j}", f"127.0.0.1:{port}")
            yield decode, prefills, servers, gate, first_pick
    finally:
        for s in servers:
            await s.aclose()
        for e in prefills:
            await e.aclose()
        store.close()


async def expected_tokens(model) -> list[int]:
    async with Engine(model, dataclasses.replace(config(0, 1), deployment=None), progress=False) as e:
        return (await e.complete(PROMPT, PARAMS)).token_ids


@pytest.fixture(scope="module")
def model(tiny_dir):
    return str(tiny_dir["mixtral"])


async def test_prefill_node_lost_mid_transfer_hands_the_rest_to_another(model):
    expected = await expected_tokens(model)
    async with cluster(model, 2, gated_after=1) as (decode, prefills, servers, gate, j):
        task = asyncio.create_task(decode.complete(PROMPT, PARAMS))
        async with asyncio.timeout(60):
            await gate.held.wait()
        await wait_until(lambda: received(decode) == 6, what="first batch")
        await servers[j].aclose()  # the node is lost: its connection closes mid-transfer
        async with asyncio.timeout(60):
            assert (await task).token_ids == expected
        assert received(decode) == 10  # 6 from the lost node, the 4 still awaited from the other
        assert decode._prefill.num_retries == 1
        assert prefills[1 - j].kv_metrics().counters["handoff_sent_blocks"] == 4
        assert all_free(decode)
        for e in prefills:
            await wait_until(lambda: all_free(e), what="prefill blocks freed")


async def test_only_prefill_node_lost_fails_typed_and_frees_everything(model):
    async with cluster(model, 1, gated_after=1) as (decode, prefills, servers, gate, j):
        task = asyncio.create_task(decode.complete(PROMPT, PARAMS))
        async with asyncio.timeout(60):
            await gate.held.wait()
        await servers[0].aclose()
        with pytest.raises(PrefillUnavailableError, match="prefill node 0"):
            async with asyncio.timeout(60):
                await task
        assert all_free(decode)
        await wait_until(lambda: all_free(prefills[0]), what="prefill blocks freed")
        assert decode.stats().num_running == 0


async def test_silent_prefill_node_is_given_up_within_the_timeout(model):
    async with cluster(model, 1, gated_after=1, timeout_s=2.0) as (decode, prefills, servers, gate, j):
        with pytest.raises(PrefillUnavailableError, match="sent nothing for 2 s"):
            async with asyncio.timeout(30):  # bound: 2 s of silence, then the error
                await decode.complete(PROMPT, PARAMS)
        assert all_free(decode)
        # the decode node cancelled the transfer: the frozen node's prefill is aborted too
        await wait_until(lambda: all_free(prefills[0]), what="prefill blocks freed")


async def test_cancel_during_hand_off_frees_blocks_everywhere(model):
    async with cluster(model, 1, gated_after=1) as (decode, prefills, servers, gate, j):
        task = asyncio.create_task(decode.complete(PROMPT, PARAMS))
        async with asyncio.timeout(60):
            await gate.held.wait()
        await wait_until(lambda: received(decode) == 6, what="first batch")
        assert decode.kv_manager.num_sequences == 1 and decode.stats().num_handoffs == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: all_free(decode), what="decode blocks freed")
        await wait_until(lambda: all_free(prefills[0]), what="prefill blocks freed")
        assert decode.stats().num_handoffs == 0
        # the prefill node answered the cancel once its writes were done: the slots are free
        [staging] = decode._prefill.stagings(0)
        await wait_until(lambda: staging._leased == 0, what="staging slots given back")
        # the engines keep serving: the 6 blocks that landed are reused, the rest cross, through
        # the same staging segment (no new one, none opened again)
        expected = await expected_tokens(model)
        servers[0].engine = prefills[0]  # no longer frozen
        async with asyncio.timeout(60):
            assert (await decode.complete(PROMPT, PARAMS)).token_ids == expected
        assert received(decode) == 10
        assert staging.num_buffers == 1 and servers[0].num_opened == 1 and servers[0].carriers["segment"] == 2


async def test_one_staging_segment_serves_every_transfer_of_a_link(model):
    """The link's shared-memory staging segment is made and opened once: later transfers lease
    its slots (one at a time, or several at once after it grew to hold them), its name is gone
    from /dev/shm once the prefill node opened it, and the tokens are the colocated ones."""
    prompts = [random_prompt(n, 256, seed=500 + n) for n in (41, 33, 21, 37, 29, 25)]  # 10, 8, 5, 9, 7, 6 blocks
    async with Engine(model, dataclasses.replace(config(0, 1), deployment=None), progress=False) as e:
        expected = [(await e.complete(p, PARAMS)).token_ids for p in prompts]
    async with cluster(model, 1, gated_after=None) as (decode, prefills, servers, gate, j):
        async with asyncio.timeout(60):
            got = [(await decode.complete(p, PARAMS)).token_ids for p in prompts[:3]]
        [staging] = decode._prefill.stagings(0)
        assert staging.kind == "segment" and staging.num_buffers == 1 and servers[0].num_opened == 1
        assert not list(SEGMENT_DIR.glob(f"afkv-handoff-{os.getpid()}-*"))  # unlinked once opened
        async with asyncio.timeout(60):  # three at once: 24 slots, the segment grows once
            got += [c.token_ids for c in await asyncio.gather(*(decode.complete(p, PARAMS) for p in prompts[3:]))]
        assert got == expected
        assert staging.num_buffers <= 2 and servers[0].num_opened == staging.num_buffers
        assert servers[0].carriers == {"device": 0, "nccl": 0, "segment": 6, "frames": 0}
        await wait_until(lambda: staging._leased == 0, what="staging slots given back")
        assert all_free(decode)


@pytest.mark.parametrize("carrier", ["segment", "frames"])
async def test_corrupt_row_is_never_used(model, monkeypatch, carrier):
    """A row damaged between the two nodes (in the shared segment, or in a frame) fails its
    checksum: nothing of it is written; the blocks still awaited come from the other prefill
    node, and the tokens are the colocated ones."""
    expected = await expected_tokens(model)
    damaged = []
    to_wire = prefill_module.blocks_to_wire

    def damaging(hid, indices, hashes, rows, used):
        frames = to_wire(hid, indices, hashes, rows, used)
        if not damaged:
            assert used == carrier
            if used == "segment":  # rows: the segment's slots, already written
                rows[0, rows.shape[1] // 2] ^= 0x40
            else:
                data = bytearray(frames[0]["rows"])
                data[len(data) // 2] ^= 0x40
                frames[0]["rows"] = bytes(data)
            damaged.append(indices[0])
        return frames

    monkeypatch.setattr(prefill_module, "blocks_to_wire", damaging)
    if carrier == "frames":  # as from a prefill node on another host
        monkeypatch.setattr(prefill_module, "open_segment", lambda offer, nbytes: None)
    async with cluster(model, 2, gated_after=None) as (decode, prefills, servers, gate, j):
        async with asyncio.timeout(60):
            assert (await decode.complete(PROMPT, PARAMS)).token_ids == expected
        assert damaged and decode._prefill.num_retries == 1
        assert received(decode) == 10
        assert all_free(decode)
    assert not list(SEGMENT_DIR.glob(f"afkv-handoff-{os.getpid()}-*"))  # every segment unlinked


async def test_prefill_refuses_a_block_whose_hash_differs(model):
    """A decode node running other weights (or dtype) asks for hashes this prefill node does not
    compute: the prefill request fails with a RequestError naming it, and frees its blocks."""
    from afkv.errors import RequestError

    async with Engine(model, dataclasses.replace(config(0, 1), deployment=None), progress=False) as e:
        with pytest.raises(RequestError, match="hash differs"):
            async for _ in e.export_prefill(PROMPT[:40], {0: bytes(16)}):
                pass
        with pytest.raises(RequestError, match="whole blocks"):
            async for _ in e.export_prefill(PROMPT[:41], {0: bytes(16)}):
                pass
        await wait_until(lambda: all_free(e), what="prefill blocks freed")


async def test_int8_rows_on_the_wire(model):
    """handoff_format = int8: the hand-off completes with half the bytes; the decode node keeps
    serving (tokens may differ from colocated: quantized KV)."""
    store = RendezvousServer("127.0.0.1", 0, TOKEN).start()
    cfg = config(store.port, 1)
    cfg = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, handoff_format="int8"))
    try:
        async with Engine(model, dataclasses.replace(cfg, deployment=None), progress=False) as prefill:
            server = PrefillServer(prefill, "127.0.0.1", 0, token=TOKEN)
            store.set("afkv/prefill/0", f"127.0.0.1:{await server.start()}")
            try:
                async with Engine(model, cfg, progress=False) as decode:
                    async with asyncio.timeout(60):
                        assert len((await decode.complete(PROMPT, PARAMS)).token_ids) == PARAMS.max_tokens
                    counters = decode.kv_metrics().counters
                    assert counters["handoff_received_blocks"] == 10
                    raw = 10 * decode.kv_manager.layout.block_nbytes
                    assert counters["bytes_handoff_received"] < raw // 2 + raw // 16
                    assert all_free(decode)
            finally:
                await server.aclose()
    finally:
        store.close()


async def test_blocks_a_prefill_node_holds_are_handed_over_without_a_step(model):
    """Two decode nodes, one prefill node: the second decode node's request for the same prompt
    is served from the prefill node's cache (prefix reuse on the prefill side), with no step."""
    expected = await expected_tokens(model)
    store = RendezvousServer("127.0.0.1", 0, TOKEN).start()
    cfg = config(store.port, 1)
    try:
        async with Engine(model, dataclasses.replace(cfg, deployment=None), progress=False) as prefill:
            server = PrefillServer(prefill, "127.0.0.1", 0, token=TOKEN)
            store.set("afkv/prefill/0", f"127.0.0.1:{await server.start()}")
            try:
                async with Engine(model, cfg, progress=False) as a, \
                        Engine(model, cfg, progress=False, attention_rank=1) as b:
                    async with asyncio.timeout(60):
                        assert (await a.complete(PROMPT, PARAMS)).token_ids == expected
                        steps = prefill.stats().num_steps
                        assert (await b.complete(PROMPT, PARAMS)).token_ids == expected
                    assert prefill.stats().num_steps == steps
                    assert received(a) == received(b) == 10
                    assert prefill.kv_metrics().counters["handoff_sent_blocks"] == 20
                    for e in (a, b, prefill):
                        await wait_until(lambda: all_free(e), what="blocks freed")
            finally:
                await server.aclose()
    finally:
        store.close()
