"""Staging buffers of the KV hand-off (afkv.nodes.handoff) that must be freed on every path: a
device staging buffer (CUDA IPC) whose offer the prefill node never answered, on the CPU.

CUDA IPC is faked in this process: FakeDeviceSegment is a DeviceSegment whose rows are host
memory and whose decline (the release of the offer's IPC count) is counted, and the prefill
server's open_device_segment hands it those very rows (or declines, as a prefill node on
another GPU). The protocol around it runs for real (PrefillServer, PrefillLinks): the offer,
the ack, the release request that settles an offer whose ack never came. The one rule under
test: every offer's count is released exactly once, here (declined) or by the prefill node
(it opened the buffer), and the decode node frees the buffer once no lease holds it. A prefill
process that exits holding a buffer it opened (a stand-in child process, named in the in-process
server's acks, killed by the test) has that count released by the decode node, once; one alive
when its connection ends, or one that said it let go (closing), has nothing released here. The
real CUDA path is tests/nodes/test_prefill_decode_gpu.py."""

import asyncio
import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch

from afkv import Engine
from afkv.errors import PrefillUnavailableError
from afkv.nodes import handoff
from afkv.nodes.handoff import PrefillProcess, process_identity
from afkv.serve import prefill as prefill_module
from tests.helpers import random_prompt
from tests.nodes.test_prefill_decode_faults import (
    PARAMS,
    PROMPT,
    all_free,
    cluster,
    config,
    expected_tokens,
)
from tests.serve.conftest import wait_until


class FakeIpc:
    """What the prefill node's "open" does (opens: returns the buffer's rows, else None) and
    a gate it waits at (while it is closed, the decode node sees no answer to its offer)."""

    def __init__(self):
        self.made: dict[int, FakeDeviceSegment] = {}
        self.opens = True
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def open(self, offer, nbytes, device):
        self.entered.set()
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        seg = self.made[offer["id"]]
        return (offer["id"], seg.rows) if self.opens else None


class FakeDeviceSegment(handoff.DeviceSegment):
    ipc: FakeIpc

    def __init__(self, num_rows, nbytes, device, settle=None):
        self.num_rows = num_rows
        self.rows = torch.zeros((num_rows, nbytes), dtype=torch.uint8)  # [num_rows, nbytes]
        self.offer = {"id": next(self._ids), "uuid": "fake-gpu", "rows": num_rows, "nbytes": nbytes}
        self.opened = None
        self.holder = None
        self.closed = self.abandoned = False
        self._settle = settle
        self.num_declines = 0
        self.ipc.made[self.offer["id"]] = self

    @staticmethod
    def available(device) -> bool:
        return True

    def decline(self) -> None:
        self.num_declines += 1


@pytest.fixture
def ipc(monkeypatch):
    fake = FakeIpc()
    monkeypatch.setattr(FakeDeviceSegment, "ipc", fake, raising=False)
    monkeypatch.setattr(handoff, "DeviceSegment", FakeDeviceSegment)
    monkeypatch.setattr(prefill_module, "open_device_segment", fake.open)
    yield fake
    fake.gate.set()  # no thread of the test stays waiting


@contextlib.asynccontextmanager
async def gate_opened(ipc: FakeIpc):
    """Open the gate when the block ends, before the cluster closes (its server waits for the
    handler that waits at the gate)."""
    try:
        yield
    finally:
        ipc.gate.set()


@pytest.fixture(scope="module")
def model(tiny_dir):
    return str(tiny_dir["mixtral"])


def counters(engine) -> dict:
    return engine.kv_metrics().counters


def device_stagings(engine) -> list:
    return [s for s in engine._prefill.stagings(0) if s.kind == "device"]


async def test_device_offers_answered_by_the_ack_are_released_once(model, ipc):
    """The usual path: the first transfer's buffer is opened (the prefill node releases its
    count); it serves every later transfer; nothing is declined here; one live buffer."""
    prompts = [PROMPT, random_prompt(33, 256, seed=11)]
    async with Engine(model, dataclasses.replace(config(0, 1), deployment=None), progress=False) as e:
        expected = [(await e.complete(p, PARAMS)).token_ids for p in prompts]
    async with cluster(model, 1, gated_after=None) as (decode, prefills, servers, _, j):
        async with asyncio.timeout(60):
            assert [(await decode.complete(p, PARAMS)).token_ids for p in prompts] == expected
        [seg] = ipc.made.values()
        assert seg.opened is True and seg.num_declines == 0
        assert servers[0].carriers["device"] == 2 and servers[0].num_opened == 1
        assert counters(decode)["handoff_staging_live_buffers"] == 1  # the segment staging was closed
        assert all_free(decode)


async def test_a_declined_device_offer_is_released_here(model, ipc):
    """A prefill node that cannot open the buffer (another GPU) acks the segment: the count is
    released here, once, and the device staging is closed (never offered again)."""
    ipc.opens = False
    expected = await expected_tokens(model)
    async with cluster(model, 1, gated_after=None) as (decode, prefills, servers, _, j):
        async with asyncio.timeout(60):
            assert (await decode.complete(PROMPT, PARAMS)).token_ids == expected
        [seg] = ipc.made.values()
        assert seg.opened is False and seg.num_declines == 1 and device_stagings(decode) == []
        assert servers[0].carriers["segment"] == 1
        assert counters(decode)["handoff_staging_live_buffers"] == 1  # the segment's


@pytest.mark.parametrize("opens", [True, False], ids=["opened", "not-opened"])
async def test_an_unanswered_device_offer_is_settled_and_its_buffer_freed(model, ipc, opens):
    """The request is cancelled while the prefill node opens the offered buffer: its ack never
    arrives. The buffer is retired at once (never offered again); once the cancelled transfer's
    slots are back, a release request asks the prefill node, which lets go of the buffer and
    says whether it opened it: the count is released here exactly when it did not. The next
    transfer offers a new buffer and gets the colocated tokens."""
    ipc.opens = opens
    ipc.gate.clear()
    expected = await expected_tokens(model)
    async with cluster(model, 1, gated_after=None) as (decode, prefills, servers, _, j), gate_opened(ipc):
        task = asyncio.create_task(decode.complete(PROMPT, PARAMS))
        async with asyncio.timeout(60):
            await asyncio.to_thread(ipc.entered.wait, 60)  # the prefill node opens the offer
        [staging] = device_stagings(decode)
        [seg] = ipc.made.values()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: staging.buffer is None, what="the buffer retired")  # (the hand-off task ends)
        assert seg.opened is None  # unanswered
        ipc.gate.set()
        await wait_until(lambda: seg.opened is not None, what="the offer settled")
        assert seg.opened is opens and seg.num_declines == (0 if opens else 1)
        assert staging.num_live == 0 and counters(decode)["handoff_unsettled_offers"] == 0
        assert all("device" not in held for held in servers[0]._opened.values())  # the prefill node let go
        assert not servers[0]._streams  # the stream cancelled before its first step is gone too
        await wait_until(lambda: all_free(prefills[0]), what="prefill blocks freed")
        async with asyncio.timeout(60):
            assert (await decode.complete(PROMPT, PARAMS)).token_ids == expected
        new = [s for s in ipc.made.values() if s is not seg]
        assert len(new) == 1 and (new[0].opened, new[0].num_declines) == (opens, 0 if opens else 1)
        assert seg.num_declines == (0 if opens else 1)  # still once
        assert all_free(decode)


async def test_an_offer_unanswered_when_the_connection_ends_is_released_here(model, ipc):
    """The prefill node is lost while it opens the offered buffer (no ack, no release request
    possible): once prefill_timeout_s has passed, the count is released here on its behalf, and
    the link's stagings are gone."""
    ipc.opens = False
    ipc.gate.clear()
    async with cluster(model, 1, gated_after=None, timeout_s=2.0) as (decode, prefills, servers, _, j), \
            gate_opened(ipc):
        task = asyncio.create_task(decode.complete(PROMPT, PARAMS))
        async with asyncio.timeout(60):
            await asyncio.to_thread(ipc.entered.wait, 60)
        [seg] = ipc.made.values()
        await servers[0].aclose()
        with pytest.raises(PrefillUnavailableError, match="prefill node 0"):
            async with asyncio.timeout(60):
                await task
        await wait_until(lambda: seg.num_declines == 1, timeout_s=30, what="the count released on its behalf")
        assert seg.opened is False and decode._prefill.stagings(0) == []
        assert counters(decode)["handoff_staging_live_buffers"] == 0
        assert counters(decode)["handoff_unsettled_offers"] == 0
        assert all_free(decode)


async def test_slots_awaiting_a_cancel_answer_are_freed_when_the_connection_ends(model):
    """A frozen prefill node ignores the cancel of a transfer (its slots wait for
    prefill_cancelled), then its connection ends (closed here): the waiting slots are
    abandoned and the link's buffer is closed (none live), and nothing of the transfer is left
    here."""
    async with cluster(model, 1, gated_after=1) as (decode, prefills, servers, gate, j):
        servers[0]._cancel = lambda conn, hid: None  # frozen: never answers the cancel
        task = asyncio.create_task(decode.complete(PROMPT, PARAMS))
        async with asyncio.timeout(60):
            await gate.held.wait()
        [staging] = decode._prefill.stagings(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: decode._prefill._draining, what="the cancel sent, its answer awaited")
        assert staging._leased == 10 and staging.num_live == 1
        await decode._prefill._clients[0].aclose()  # (as when heartbeats find the node frozen)
        await wait_until(lambda: staging.num_live == 0, what="the link's buffer closed")
        assert not decode._prefill._draining and staging._leased == 0 and decode._prefill.stagings(0) == []
        assert counters(decode)["handoff_staging_live_buffers"] == 0
        await wait_until(lambda: all_free(decode), what="decode blocks freed")


@contextlib.contextmanager
def stand_in():
    """A short-lived process that stands in for a prefill node's: the in-process PrefillServer
    names it in its device acks (`process`), so that the test can kill "the prefill process"
    while the server (this process) goes on."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield child
    finally:
        child.kill()
        child.wait(30)


def reaping(engine) -> bool:
    return any(t.get_name().startswith("afkv-reap") for t in engine._prefill._watchers)


async def killed(child: subprocess.Popen) -> None:
    child.kill()
    await asyncio.to_thread(child.wait, 30)


OTHER = random_prompt(33, 256, seed=11)


async def colocated_tokens(model, prompts) -> list[list[int]]:
    async with Engine(model, dataclasses.replace(config(0, 1), deployment=None), progress=False) as e:
        return [(await e.complete(p, PARAMS)).token_ids for p in prompts]


async def test_a_prefill_process_that_exits_holding_a_device_buffer_has_its_count_released_here(model, ipc, caplog):
    """The prefill process that opened the buffer dies; its connection ends: the decode node
    releases the offer's count on its behalf, once (a warning says so), and the next transfer
    (a new connection, a new buffer) gets the colocated tokens."""
    expected = await colocated_tokens(model, [PROMPT, OTHER])
    with stand_in() as child:
        async with cluster(model, 1, gated_after=None) as (decode, _, servers, _, _):
            servers[0].process = process_identity(child.pid)
            async with asyncio.timeout(60):
                assert (await decode.complete(PROMPT, PARAMS)).token_ids == expected[0]
            [seg] = ipc.made.values()
            process = decode._prefill._processes[0]
            assert seg.opened is True and process.pid == child.pid and process.held == {seg}
            await killed(child)
            with caplog.at_level(logging.WARNING, logger="afkv.handoff"):
                await decode._prefill._clients[0].aclose()  # its connection ends (as when the process died)
                await wait_until(lambda: seg.num_declines == 1, what="the count released on its behalf")
                await wait_until(lambda: not reaping(decode), what="the reap done")
            assert f"(pid {child.pid}) exited holding device staging buffer {seg.offer['id']}" in caplog.text
            assert counters(decode)["handoff_released_for_exited_prefill"] == 1
            assert process._pidfd is None and decode._prefill._processes[0] is None
            servers[0].process = process_identity()  # the next connection's process: this one
            async with asyncio.timeout(60):
                assert (await decode.complete(OTHER, PARAMS)).token_ids == expected[1]
            [new] = [s for s in ipc.made.values() if s is not seg]
            assert new.opened is True and new.num_declines == 0 and seg.num_declines == 1
            assert decode._prefill._processes[0].held == {new}
            assert counters(decode)["handoff_released_for_exited_prefill"] == 1
            assert all_free(decode)


async def test_a_prefill_process_alive_when_its_connection_ends_releases_the_buffer_itself(model, ipc, monkeypatch):
    """The connection ends while the prefill process lives on: it lets go of the buffer on its
    side; the decode node releases nothing (one release in all: the prefill node's)."""
    monkeypatch.setattr(handoff, "EXIT_GRACE_S", 0.2)  # (alive either way: only how long the reap waits)
    async with cluster(model, 1, gated_after=None) as (decode, _, servers, _, _):
        async with asyncio.timeout(60):
            await decode.complete(PROMPT, PARAMS)
        [seg] = ipc.made.values()
        process = decode._prefill._processes[0]
        assert process.pid == os.getpid() and process.held == {seg}
        await decode._prefill._clients[0].aclose()
        await wait_until(lambda: all("device" not in held for held in servers[0]._opened.values()),
                         what="the prefill node let go")
        await wait_until(lambda: not reaping(decode) and decode._prefill._processes[0] is None,
                         what="the reap done")
        assert seg.num_declines == 0 and process._pidfd is None
        assert counters(decode).get("handoff_released_for_exited_prefill", 0) == 0


async def test_a_prefill_node_that_closes_says_which_buffers_it_let_go(model, ipc):
    """A prefill node closing (aclose) lets go of its buffers and tells the decode node before
    its connection ends: its process exiting afterwards releases nothing here."""
    with stand_in() as child:
        async with cluster(model, 1, gated_after=None) as (decode, _, servers, _, _):
            servers[0].process = process_identity(child.pid)
            async with asyncio.timeout(60):
                await decode.complete(PROMPT, PARAMS)
            [seg] = ipc.made.values()
            process = decode._prefill._processes[0]
            await killed(child)
            await servers[0].aclose()
            assert process.held == set()  # the let_go request was answered before the connection closed
            await wait_until(lambda: decode._prefill._processes[0] is None and not reaping(decode),
                             what="the link dropped")
            assert seg.num_declines == 0 and process._pidfd is None


async def test_without_pidfd_a_prefill_process_that_exits_leaves_its_buffer_allocated(model, ipc, monkeypatch,
                                                                                      caplog):
    """No pidfd (Linux < 5.3): the prefill process cannot be told, as before pidfds: its death
    releases nothing here (a warning says the buffer stays allocated until this process ends)."""
    monkeypatch.delattr(handoff.os, "pidfd_open")
    with stand_in() as child:
        async with cluster(model, 1, gated_after=None) as (decode, _, servers, _, _):
            servers[0].process = process_identity(child.pid)
            with caplog.at_level(logging.WARNING, logger="afkv.handoff"):
                async with asyncio.timeout(60):
                    await decode.complete(PROMPT, PARAMS)
            assert "cannot tell prefill node 0's process apart" in caplog.text
            [seg] = ipc.made.values()
            assert seg.opened is True and decode._prefill._processes[0] is None
            await killed(child)
            await decode._prefill._clients[0].aclose()
            await wait_until(lambda: decode._prefill.stagings(0) == [], what="the link dropped")
            assert not reaping(decode) and seg.num_declines == 0


async def test_a_prefill_process_is_learned_only_when_its_pid_names_it_here():
    """PrefillProcess.learn: the pid and its start time must name one live process of this
    host (not a reused pid, not another pid namespace's); its pidfd tells its exit."""
    with stand_in() as child:
        me = process_identity(child.pid)
        assert PrefillProcess.learn({**me, "start": me["start"] + 1}) is None  # another process with that pid
        assert PrefillProcess.learn({"pid": "x", "start": 0}) is None and PrefillProcess.learn(None) is None
        process = PrefillProcess.learn(me)
        try:
            assert process.pid == child.pid and not process.exited()
            assert not await process.wait_exited(0.05)
            await killed(child)
            async with asyncio.timeout(30):
                assert await process.wait_exited(30)
        finally:
            process.close()
    assert PrefillProcess.learn(me) is None  # exited and reaped: its pid names nothing, or another


class Offered:
    """What PrefillProcess reads of a DeviceSegment."""

    def __init__(self, seg_id: int):
        self.offer, self.closed, self.abandoned, self.holder = {"id": seg_id}, False, False, None


def test_a_buffer_superseded_and_closed_is_no_longer_held():
    """Opening a newer buffer of the link, the prefill process let go of the older ones: one
    closed here with its transfers ended leaves `held` at the newer one's ack, one still
    leased then leaves at its close; one whose transfers were abandoned stays (the process
    may still write into it)."""
    process = PrefillProcess(os.getpid(), os.pidfd_open(os.getpid()))
    try:
        old, leased, lost, new = (Offered(i) for i in range(4))
        for seg in (old, leased, lost):
            process.acked(seg)
        old.closed = lost.closed = lost.abandoned = True
        process.acked(new)
        assert process.held == {leased, lost, new} and process.newest == 3 and new.holder is process
        leased.closed = True
        process.closed_here(leased)
        process.closed_here(lost)
        assert process.held == {lost, new}
    finally:
        process.close()
