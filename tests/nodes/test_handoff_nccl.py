"""The nccl carrier of the KV hand-off (afkv.nodes.handoff) on the CPU: the NCCL primitives
(handoff.NCCL: gpu, new_id, join -> a channel with send / recv / abort) are faked over
in-process queues, every caller of `gpu` another "GPU", so that the protocol around them runs
for real: the offer, the join before the ack, receives posted in message order into the decode
node's leased slots, the fallback when the communicator cannot be made, cancel, a prefill node
lost or silent while a receive is posted. Prefill nodes run in this process behind real
PrefillServers (tests/nodes/test_prefill_decode_faults.py's cluster). The two-GPU run of the
real primitives is tests/nodes/test_prefill_decode_gpu.py::test_1p1d_over_nccl_between_two_gpus."""

import asyncio
import dataclasses
import gc
import itertools
import queue
import secrets
import threading
import weakref

import pytest

from afkv import Engine
from afkv.errors import PeerLostError, PrefillUnavailableError, TransportError
from afkv.nodes import handoff
from tests.helpers import random_prompt
from tests.nodes.test_prefill_decode_faults import (
    PARAMS,
    PROMPT,
    all_free,
    cluster,
    config,
    expected_tokens,
    received,
)
from tests.serve.conftest import wait_until


class FakeChannel:
    """One end of a fake communicator: the prefill node's sends put row copies on the
    communicator's queue, the decode node's receives take them (in order, sizes checked)."""

    def __init__(self, nccl: "FakeNccl", q: queue.Queue, rank: int, lose_after: int | None, fail: bool):
        self.nccl, self.q, self.rank, self.lose_after, self.fail = nccl, q, rank, lose_after, fail
        self.aborted = False
        self.sends = 0

    def send(self, views, timeout_s):
        self.sends += 1
        if self.lose_after is not None and self.sends > self.lose_after:
            if self.fail:
                raise TransportError("fake NCCL: ncclSend failed: remote process exited")
            return  # the node is lost: these bytes never leave
        for v in views:
            self.q.put(v.clone())

    def recv(self, views, timeout_s):
        self.nccl.recvs_posted += 1
        for v in views:
            try:
                got = self.q.get(timeout=timeout_s)
            except queue.Empty:
                self.abort()
                raise PeerLostError(f"fake NCCL: no progress within {timeout_s:.0f} s") from None
            if got is None or self.aborted:
                raise PeerLostError("fake NCCL: the communicator was aborted")
            if got.shape != v.shape:
                raise TransportError(f"fake NCCL: {tuple(got.shape)} sent, {tuple(v.shape)} received")
            v.copy_(got)

    def abort(self):
        self.nccl.aborts += 1
        self.aborted = True
        if self.rank == 0:
            self.q.put(None)  # wakes this end's receive (as NCCL: the other end's abort does not)

    def close(self):
        pass


class FakeNccl:
    """fail_join: the prefill side's join fails (ncclCommInitRank); lose_after: the first
    communicator's sender loses every send after that many (fail_send: its sends fail then);
    hang_first: both joins of the first communicator block until that event is set (as
    ncclCommInitRank does when the other rank never comes; `hung`: their threads)."""

    def __init__(self, fail_join: bool = False, lose_after: int | None = None, fail_send: bool = False,
                 hang_first: threading.Event | None = None):
        self.fail_join, self.lose_after, self.fail_send = fail_join, lose_after, fail_send
        self.hang_first = hang_first
        self._gpus = itertools.count()
        self._queues: dict[str, queue.Queue] = {}
        self.joins: list[tuple[str, int]] = []
        self.hung: list[threading.Thread] = []
        self.aborts = self.recvs_posted = 0

    def gpu(self, device):
        return f"fake-gpu-{next(self._gpus)}"  # every node on a GPU of its own

    def new_id(self):
        return secrets.token_hex(16)

    def join(self, unique_id, rank, device):
        self.joins.append((unique_id, rank))
        if self.hang_first is not None and unique_id == self.joins[0][0]:
            self.hung.append(threading.current_thread())
            self.hang_first.wait()
        if self.fail_join and rank == 1:
            raise TransportError("fake: ncclCommInitRank failed: unhandled system error")
        first = not self._queues or unique_id in list(self._queues)[:1]
        q = self._queues.setdefault(unique_id, queue.Queue())
        return FakeChannel(self, q, rank, self.lose_after if first and rank == 1 else None, self.fail_send)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return str(tiny_dir["mixtral"])


def nccl_blocks(engine: Engine) -> int:
    return engine.kv_metrics().counters.get("handoff_received_nccl_blocks", 0)


async def test_nccl_is_offered_taken_and_its_communicator_kept(model, monkeypatch):
    """Decode and prefill nodes on two "GPUs": every transfer takes nccl over one communicator
    (joined once, by both ranks), the blocks land in the decode node's leased slots, the tokens
    are the colocated ones, and every slot and block is given back."""
    fake = FakeNccl()
    monkeypatch.setattr(handoff, "NCCL", fake)
    prompts = [PROMPT] + [random_prompt(n, 256, seed=700 + n) for n in (33, 21, 37)]  # 10, 8, 5, 9 blocks
    async with Engine(model, dataclasses.replace(config(0, 1), deployment=None), progress=False) as e:
        expected = [(await e.complete(p, PARAMS)).token_ids for p in prompts]
    async with cluster(model, 1, gated_after=None) as (decode, prefills, servers, gate, j):
        async with asyncio.timeout(60):
            got = [(await decode.complete(p, PARAMS)).token_ids for p in prompts[:2]]
            got += [c.token_ids for c in await asyncio.gather(*(decode.complete(p, PARAMS) for p in prompts[2:]))]
        assert got == expected
        assert servers[0].carriers == {"device": 0, "nccl": 4, "segment": 0, "frames": 0}
        assert received(decode) == nccl_blocks(decode) == 32
        assert len({u for u, _ in fake.joins}) == 1
        assert sorted(r for _, r in fake.joins) == [0, 1]  # one communicator for the link
        [staging] = decode._prefill.stagings(0)
        assert staging.kind == "nccl"
        await wait_until(lambda: staging._leased == 0, what="staging slots given back")
        assert all_free(decode)
        await wait_until(lambda: all_free(prefills[0]), what="prefill blocks freed")


async def test_a_communicator_that_cannot_be_made_falls_back_to_the_next_carrier(model, monkeypatch):
    """The prefill node's join fails: it acks the shared-memory segment instead, the decode node
    drops its end, and the link keeps the segment for later transfers (nccl not offered again)."""
    fake = FakeNccl(fail_join=True)
    monkeypatch.setattr(handoff, "NCCL", fake)
    expected = await expected_tokens(model)
    async with cluster(model, 1, gated_after=None) as (decode, prefills, servers, gate, j):
        async with asyncio.timeout(60):
            assert (await decode.complete(PROMPT, PARAMS)).token_ids == expected
            assert (await decode.complete(random_prompt(33, 256, seed=9), PARAMS)).token_ids
        assert servers[0].carriers == {"device": 0, "nccl": 0, "segment": 2, "frames": 0}
        assert decode._prefill._nccl[0] is None and nccl_blocks(decode) == 0
        assert len([r for _, r in fake.joins if r == 1]) == 1  # tried once
        [staging] = decode._prefill.stagings(0)
        assert staging.kind == "segment"
        await wait_until(lambda: staging._leased == 0, what="staging slots given back")
        assert all_free(decode)


async def test_cancel_mid_nccl_transfer_frees_everything_and_keeps_the_link(model, monkeypatch):
    fake = FakeNccl()
    monkeypatch.setattr(handoff, "NCCL", fake)
    async with cluster(model, 1, gated_after=1) as (decode, prefills, servers, gate, j):
        task = asyncio.create_task(decode.complete(PROMPT, PARAMS))
        async with asyncio.timeout(60):
            await gate.held.wait()
        await wait_until(lambda: nccl_blocks(decode) == 6, what="first batch")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: all_free(decode), what="decode blocks freed")
        await wait_until(lambda: all_free(prefills[0]), what="prefill blocks freed")
        [staging] = decode._prefill.stagings(0)
        await wait_until(lambda: staging._leased == 0, what="staging slots given back")
        # the same communicator and staging serve the next transfer: the 6 blocks that landed are
        # reused, the other 4 cross
        servers[0].engine = prefills[0]
        expected = await expected_tokens(model)
        async with asyncio.timeout(60):
            assert (await decode.complete(PROMPT, PARAMS)).token_ids == expected
        assert nccl_blocks(decode) == 10 and len(fake.joins) == 2 and fake.aborts == 0
        assert staging.num_buffers == 1 and servers[0].carriers["nccl"] == 2


@pytest.mark.parametrize("num_prefill", [1, 2])
async def test_prefill_node_lost_while_a_recv_is_posted(model, monkeypatch, num_prefill):
    """The first prefill node's bytes stop after its first batch (its second kv_blocks message
    arrives, the decode node posts the receive, nothing comes), then the node is lost: the
    communicator is aborted at once (well before the 300 s timeout), the blocks still awaited
    come from the other prefill node (tokens as colocated), or with none a typed error; no
    block or slot leaks."""
    fake = FakeNccl(lose_after=1)
    monkeypatch.setattr(handoff, "NCCL", fake)
    expected = await expected_tokens(model)
    async with cluster(model, num_prefill, gated_after=None, timeout_s=300.0) as (decode, prefills, servers, _, j):
        task = asyncio.create_task(decode.complete(PROMPT, PARAMS))
        await wait_until(lambda: nccl_blocks(decode) == 6 and fake.recvs_posted == 2, what="second receive posted")
        assert not task.done()  # waiting on the posted receive
        await servers[j].aclose()
        async with asyncio.timeout(60):
            if num_prefill == 1:
                with pytest.raises(PrefillUnavailableError, match="prefill node 0"):
                    await task
            else:
                assert (await task).token_ids == expected
                assert nccl_blocks(decode) == 10 and decode._prefill.num_retries == 1
        assert fake.aborts >= 1 and decode._prefill._nccl[j] is None and decode._prefill.stagings(j) == []
        assert all_free(decode)
        for e in prefills:
            await wait_until(lambda e=e: all_free(e), what="prefill blocks freed")


async def test_silent_sender_while_a_recv_is_posted_fails_typed_within_the_timeout(model, monkeypatch):
    """The prefill node's bytes stop after its first batch while it stays connected: the posted
    receive gives up after prefill_timeout_s, the communicator is aborted and the request fails
    typed; the link then makes a new communicator for the next transfer."""
    fake = FakeNccl(lose_after=1)
    monkeypatch.setattr(handoff, "NCCL", fake)
    async with cluster(model, 1, gated_after=None, timeout_s=2.0) as (decode, prefills, servers, _, j):
        with pytest.raises(PrefillUnavailableError, match="NCCL hand-off failed"):
            async with asyncio.timeout(30):  # bound: 2 s without bytes, then the abort
                await decode.complete(PROMPT, PARAMS)
        assert decode._prefill._nccl[0] is None and fake.aborts >= 1
        assert all_free(decode)
        await wait_until(lambda: all_free(prefills[0]), what="prefill blocks freed")
        [staging] = decode._prefill.stagings(0)
        await wait_until(lambda: staging._leased == 0, what="staging slots given back")
        # the next transfer negotiates again: a new communicator (this one sends), the same staging
        expected = await expected_tokens(model)
        async with asyncio.timeout(60):
            assert (await decode.complete(PROMPT, PARAMS)).token_ids == expected
        assert len({u for u, _ in fake.joins}) == 2 and len(fake.joins) == 4
        assert servers[0].carriers["nccl"] == 2 and decode._prefill.stagings(0) == [staging]


async def test_a_failed_send_fails_the_transfer_and_the_link_makes_a_new_communicator(model, monkeypatch):
    """The prefill node's second send fails (its communicator breaks): it aborts its end and
    says prefill_failed (PeerLostError); the decode node drops its end at once (not at the 300 s
    timeout), the request fails typed, and the next transfer negotiates again and takes nccl over
    a new communicator (not the frames)."""
    fake = FakeNccl(lose_after=1, fail_send=True)
    monkeypatch.setattr(handoff, "NCCL", fake)
    expected = await expected_tokens(model)
    async with cluster(model, 1, gated_after=None, timeout_s=300.0) as (decode, prefills, servers, _, j):
        with pytest.raises(PrefillUnavailableError, match="NCCL hand-off failed"):
            async with asyncio.timeout(60):
                await decode.complete(PROMPT, PARAMS)
        assert all_free(decode) and decode._prefill._nccl[0] is None
        async with asyncio.timeout(60):
            assert (await decode.complete(PROMPT, PARAMS)).token_ids == expected
        assert servers[0].carriers == {"device": 0, "nccl": 2, "segment": 0, "frames": 0}
        assert len({u for u, _ in fake.joins}) == 2
        await wait_until(lambda: all_free(prefills[0]), what="prefill blocks freed")


def send_stagings(server) -> list:
    """The prefill node's NCCL send buffers (one Staging per link and row size)."""
    return [st for nccl in server._links.values() for st in nccl.stagings.values()]


async def test_the_prefill_node_sends_from_one_buffer_per_link_freed_with_the_link(model, monkeypatch):
    """Transfers one after another on one link export into one send buffer of the prefill
    node (allocated once, its slots back after each transfer's sends); a send that fails aborts
    the link, and its buffer is freed (none live until the next link makes its own)."""
    fake = FakeNccl()
    monkeypatch.setattr(handoff, "NCCL", fake)
    prompts = [random_prompt(n, 256, seed=800 + n) for n in (41, 33, 21, 37)]  # 10, 8, 5, 9 blocks
    async with Engine(model, dataclasses.replace(config(0, 1), deployment=None), progress=False) as e:
        expected = [(await e.complete(p, PARAMS)).token_ids for p in prompts]
    async with cluster(model, 1, gated_after=None, timeout_s=300.0) as (decode, prefills, servers, _, j):
        async with asyncio.timeout(60):
            got = [(await decode.complete(p, PARAMS)).token_ids for p in prompts[:3]]
        assert got == expected[:3] and servers[0].carriers["nccl"] == 3
        [send] = servers[0]._links.values()
        [staging] = send_stagings(servers[0])
        await wait_until(lambda: staging._leased == 0, what="send slots given back")
        assert staging.num_buffers == 1 and staging.buffer.num_rows == 10
        counters = prefills[0].kv_metrics().counters
        assert counters["handoff_staging_buffers"] == counters["handoff_staging_live_buffers"] == 1
        channel = send.link.joined.result(0)  # the prefill node's end: its next send fails
        channel.lose_after, channel.fail = channel.sends, True
        with pytest.raises(PrefillUnavailableError, match="NCCL hand-off failed"):
            async with asyncio.timeout(60):
                await decode.complete(prompts[3], PARAMS)
        await wait_until(lambda: staging.num_live == 0, what="the aborted link's send buffer freed")
        assert send.link.aborted and send not in servers[0]._links.values()
        assert prefills[0].kv_metrics().counters["handoff_staging_live_buffers"] == 0
        async with asyncio.timeout(60):  # a new communicator, a new send buffer
            assert (await decode.complete(prompts[3], PARAMS)).token_ids == expected[3]
        counters = prefills[0].kv_metrics().counters
        assert counters["handoff_staging_buffers"] == 2 and counters["handoff_staging_live_buffers"] == 1
        await wait_until(lambda: all_free(prefills[0]), what="prefill blocks freed")


async def test_a_join_stuck_after_its_prefill_node_failed_holds_nothing(model, monkeypatch):
    """The prefill node announces its join and fails before the communicator is made: both
    joins stay blocked (nothing interrupts ncclCommInitRank). The transfer goes on from the
    other prefill node over a new communicator, and the stuck join holds nothing of the
    failed link: not the link (freed), its slots, a pool worker, or the next transfer."""
    release = threading.Event()
    fake = FakeNccl(hang_first=release)
    monkeypatch.setattr(handoff, "NCCL", fake)
    expected = await expected_tokens(model)
    try:
        async with cluster(model, 2, gated_after=None, timeout_s=300.0) as (decode, prefills, servers, _, j):
            task = asyncio.create_task(decode.complete(PROMPT, PARAMS))
            await wait_until(lambda: len(fake.hung) == 2, what="both ranks in their join")
            link = weakref.ref(decode._prefill._nccl[j])
            await servers[j].aclose()  # the prefill node fails
            async with asyncio.timeout(60):
                assert (await task).token_ids == expected
            assert servers[1 - j].carriers["nccl"] == 1 and nccl_blocks(decode) == 10
            assert decode._prefill._nccl[j] is None and decode._prefill.stagings(j) == []
            gc.collect()
            assert link() is None  # the stuck thread keeps no link alive
            assert all(t.is_alive() and t.name.startswith("afkv-nccl-join") for t in fake.hung)
            [staging] = decode._prefill.stagings(1 - j)
            await wait_until(lambda: staging._leased == 0, what="staging slots given back")
            assert decode.kv_metrics().counters["handoff_staging_live_buffers"] == 1  # only the live link's
            assert all_free(decode)
    finally:
        release.set()  # the joins return: each aborts the channel it made (its link was aborted)
        for t in fake.hung:
            t.join(30)
    assert not any(t.is_alive() for t in fake.hung)
    assert fake.aborts >= 2
