"""Staging (afkv.nodes.handoff): the row slots a decode node's link to a prefill node keeps for
the connection's life. Fake buffers stand for the CUDA IPC / shared-memory ones: what is tested
is the slot accounting and its ordering rule (a slot goes back only once the prefill node has
ended the transfer and the decode node's copies out of it are done), growth and retirement (a
retired buffer is closed once, when its last lease ends), and the live-buffer gauge."""

import asyncio
from collections import Counter
from concurrent.futures import Future

import pytest
import torch

from afkv.nodes.handoff import Staging


class FakeBuffer:
    def __init__(self, num_rows: int):
        self.num_rows = num_rows
        self.rows = torch.zeros((num_rows, 8), dtype=torch.uint8)
        self.num_closes = 0

    @property
    def closed(self) -> bool:
        return self.num_closes > 0

    def close(self) -> None:
        self.num_closes += 1


def staging(counters: Counter | None = None) -> tuple[Staging, list[FakeBuffer]]:
    made: list[FakeBuffer] = []

    def make(n: int) -> FakeBuffer:
        made.append(FakeBuffer(n))
        return made[-1]

    return Staging("segment", make, counters), made


async def test_slots_come_back_only_when_writer_and_reader_are_done():
    s, made = staging()
    a = await s.lease(4)
    assert a.slots == [0, 1, 2, 3] and s.num_buffers == 1
    copy = Future()  # the decode node's copy out of the slots (a KVManager.receive job)
    a.imported(copy)
    a.imported(None)  # a receive that copied at once
    a.writer_done()  # the prefill node's last message: the copy still runs
    await asyncio.sleep(0)
    b = await s.lease(4)  # a's slots are busy: the buffer grows (4 in use + 4), a's buffer retired
    assert s.num_buffers == 2 and b.buffer is made[1] and made[1].num_rows == 8
    assert not made[0].closed and s.num_live == 2  # retired, but a's copy still reads it
    copy.set_result(None)
    for _ in range(3):
        await asyncio.sleep(0)  # the callback runs on the loop
    assert s._free == [4, 5, 6, 7] and s._leased == 4  # a's slots were of the retired buffer: not handed out again
    assert made[0].num_closes == 1 and s.num_live == 1  # its last lease ended: closed
    b.writer_done()
    await asyncio.sleep(0)
    c = await s.lease(8)  # idle buffer: one run of slots, no allocation
    assert c.slots == list(range(8)) and s.num_buffers == 2


async def test_copies_done_before_the_writer_ends_release_at_its_end():
    s, _ = staging()
    a = await s.lease(3)
    copy = Future()
    copy.set_result(None)
    a.imported(copy)
    assert s._free == []  # the prefill node may still write
    a.writer_done()
    a.writer_done()  # a second end message (prefill_done, then prefill_cancelled): no double give-back
    assert s._free == [0, 1, 2]
    await s.lease(2)
    assert s.num_buffers == 1


async def test_concurrent_leases_are_disjoint_and_grow_to_what_is_in_flight():
    s, made = staging()
    leases = [await s.lease(n) for n in (4, 8, 12)]
    assert [b.num_rows for b in made] == [4, 12, 24]  # each growth: every slot in flight + needed
    live = [lease for lease in leases if lease.buffer is s.buffer]
    slots = [k for lease in live for k in lease.slots]
    assert len(slots) == len(set(slots))
    for lease in leases:
        lease.writer_done()
    await asyncio.sleep(0)
    again = await asyncio.gather(*(s.lease(n) for n in (4, 8, 12)))  # fits the grown buffer
    assert s.num_buffers == 3 and all(lease.buffer is made[-1] for lease in again)
    assert sorted(k for lease in again for k in lease.slots) == list(range(24))


async def test_abandoned_slots_retire_their_buffer():
    """A transfer whose end the prefill node cannot be asked for (the connection failed while
    cancelling): its buffer is never leased from again, and later transfers get a new one."""
    s, made = staging()
    a = await s.lease(2)
    a.abandon()
    assert made[0].num_closes == 1 and s.buffer is None and s._leased == 0
    a.writer_done()  # a late end message changes nothing
    a.abandon()
    b = await s.lease(2)
    assert b.buffer is made[1] and s.num_buffers == 2 and s._leased == 2 and made[0].num_closes == 1


async def test_every_retired_buffer_is_closed_once_its_last_lease_ends_and_the_gauge_follows():
    """Growth retires buffers that leases still hold; closing the staging (the link ended)
    retires the current one. Each is closed exactly once, when its last lease ends (a buffer
    without leases at once), and handoff_staging_live_buffers counts the ones not yet closed."""
    counters = Counter()
    s, made = staging(counters)
    a = await s.lease(3)
    b = await s.lease(3)  # grows: a's buffer retired, a still holds it
    c = await s.lease(7)  # grows again: b's buffer retired
    assert [m.num_rows for m in made] == [3, 6, 13] and not any(m.closed for m in made)
    assert s.num_live == counters["handoff_staging_live_buffers"] == 3 and counters["handoff_staging_buffers"] == 3
    b.writer_done()
    assert made[1].num_closes == 1 and s.num_live == counters["handoff_staging_live_buffers"] == 2
    s.close()  # the link ended while a and c are in flight
    assert not made[0].closed and not made[2].closed
    c.abandon()
    a.writer_done()
    assert [m.num_closes for m in made] == [1, 1, 1]
    assert s.num_live == counters["handoff_staging_live_buffers"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        await s.lease(1)  # a closed staging leases nothing (the transfer takes the next carrier)
    assert s.num_buffers == 3


async def test_a_lease_takes_a_run_of_consecutive_slots_where_one_is_free():
    s, _ = staging()
    (await s.lease(7)).writer_done()  # a buffer of 7 slots, all free
    a, b, c = await s.lease(1), await s.lease(1), await s.lease(5)
    assert (a.slots, b.slots, c.slots) == ([0], [1], [2, 3, 4, 5, 6])
    a.writer_done()
    c.writer_done()  # free: 0, 2-6
    assert (await s.lease(3)).slots == [2, 3, 4]  # a run, not the lowest three (0, 2, 3)
    assert (await s.lease(2)).slots == [5, 6]
    assert (await s.lease(1)).slots == [0] and s.num_buffers == 1


async def test_a_runs_only_staging_grows_rather_than_scatter_a_lease():
    """The prefill node's NCCL send buffer: a lease is always one run of slots (its rows one
    view of the buffer); with enough free slots but no run, the buffer grows."""
    made: list[FakeBuffer] = []
    s = Staging("nccl", lambda n: made.append(FakeBuffer(n)) or made[-1], runs_only=True)
    (await s.lease(6)).writer_done()
    a, b, c = await s.lease(2), await s.lease(2), await s.lease(2)
    a.writer_done()
    c.writer_done()  # free: 0, 1, 4, 5: four slots, no run of three
    d = await s.lease(3)
    assert s.num_buffers == 2 and d.buffer is made[1] and d.slots == [0, 1, 2]
    e = await s.lease(2)
    assert e.slots == [3, 4] and s.num_buffers == 2
    b.writer_done()
    assert made[0].num_closes == 1
