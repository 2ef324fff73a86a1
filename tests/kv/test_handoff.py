"""The KV manager's hand-off API (prefill/decode disaggregation): a table started from blocks
the pool holds plus awaited ones, rows received into them, exported rows, and the accounting
when a hand-off ends early."""

import pytest
import torch

from afkv.errors import BlockOwnershipError
from afkv.kv.device import DeviceQuant
from afkv.kv.formats import RawFormat, make_format
from afkv.kv.layout import KVLayout
from afkv.kv.manager import KVManager
from afkv.kv.pruning import KVPruning

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
CPU = torch.device("cpu")
RAW = RawFormat(LAYOUT)
PROMPT = list(range(10, 27))  # 17 tokens: 4 full blocks to hand off (the last token is computed here)


def _prefilled(tokens=PROMPT) -> KVManager:
    """A 'prefill node': the prompt's blocks computed (random values) and committed."""
    kv = KVManager(LAYOUT, 32, CPU)
    kv.match_prefix(0, tokens)
    assert kv.allocate(0, len(tokens))
    kv.kv.copy_(torch.randn(kv.kv.shape, generator=torch.Generator().manual_seed(0)))
    kv.commit(0, tokens, len(tokens))
    return kv


def test_rows_cross_and_the_sequence_is_admitted_with_them():
    src = _prefilled()
    dst = KVManager(LAYOUT, 32, CPU)
    want = dst.begin_handoff(7, PROMPT)
    assert sorted(want) == [0, 1, 2, 3] and list(want.values()) == src.block_hashes(0)[:4]
    dst.check_invariants()  # awaited blocks are not registered
    rows = src.export_rows(0, [2, 0], RAW).result()  # uint8 [2, nbytes]
    assert rows.shape == (2, RAW.nbytes)
    dst.receive(7, [2, 0], rows, RAW)
    assert sorted(dst.awaited(7)) == [1, 3]
    dst.receive(7, [1, 3], src.export_rows(0, [1, 3], RAW).result(), RAW)
    assert dst.end_handoff(7) == 16
    src_table, dst_table = src.block_table(0), dst.block_table(7)
    for i in range(4):
        assert torch.equal(dst.kv[dst_table[i]], src.kv[src_table[i]])
        assert dst.pool.lookup(src.block_hashes(0)[i]) == dst_table[i]  # shared with later prompts
    assert dst.settle(7) == 16  # the scheduler's admission sees a matched prefix
    assert dst.allocate(7, 18)
    dst.check_invariants()
    counters = dst.metrics_snapshot().counters
    assert counters["handoff_received_blocks"] == counters["handoff_awaited_blocks"] == 4


def test_only_missing_blocks_are_awaited():
    dst = KVManager(LAYOUT, 32, CPU)
    dst.match_prefix(1, PROMPT[:9])  # a local sequence computed the first 2 blocks
    assert dst.allocate(1, 9)
    dst.commit(1, PROMPT[:9], 9)
    want = dst.begin_handoff(2, PROMPT)
    assert sorted(want) == [2, 3]
    table = dst.block_table(2)
    assert table[:2] == dst.block_table(1)[:2] and all(dst.pool.ref_count(b) == 2 for b in table[:2])
    dst.free(1)
    dst.free(2)  # mid-hand-off: the awaited blocks go back unregistered, the shared ones stay cached
    dst.check_invariants()
    assert dst.pool.num_free_blocks == 32 and dst.pool.num_held_blocks == 2
    assert dst.metrics_snapshot().counters["handoff_shared_blocks"] == 2


def test_misuse_is_refused():
    src, dst = _prefilled(), KVManager(LAYOUT, 32, CPU)
    dst.begin_handoff(3, PROMPT)
    rows = src.export_rows(0, [0], RAW).result()
    dst.receive(3, [0], rows, RAW)
    with pytest.raises(BlockOwnershipError, match="not awaited"):
        dst.receive(3, [0], rows, RAW)  # sent twice
    with pytest.raises(BlockOwnershipError, match="not received"):
        dst.end_handoff(3)
    with pytest.raises(BlockOwnershipError, match="admitted twice"):
        dst.begin_handoff(3, PROMPT)
    with pytest.raises(BlockOwnershipError, match="not full"):
        src.export_rows(0, [4], RAW)  # the partial last block never leaves


def test_no_room_or_h2o_leaves_nothing_behind():
    dst = KVManager(LAYOUT, 3, CPU)
    assert dst.begin_handoff(1, PROMPT) is None  # 4 blocks needed, 3 in the pool
    assert dst.begin_handoff(2, PROMPT, KVPruning(policy="h2o", budget=8)) is None
    assert dst.num_sequences == 0 and dst.pool.num_free_blocks == 3
    dst.check_invariants()


def test_rows_land_in_a_quantized_device_tier():
    """Raw rows on the wire, int8 rows on the device: quantized on arrival (read in place)."""
    src = _prefilled()
    fmt = make_format("int8", LAYOUT)
    dst = KVManager(LAYOUT, 32, CPU, quant=DeviceQuant(fmt, 0, 16))
    want = dst.begin_handoff(1, PROMPT)
    dst.receive(1, sorted(want), src.export_rows(0, sorted(want), RAW).result(), RAW)
    dst.end_handoff(1)
    out = torch.empty((4, *LAYOUT.block_shape))
    fmt.decode(dst.blocks[torch.tensor(dst.block_table(1))], out)
    ref = src.kv[torch.tensor(src.block_table(0)[:4])]
    assert torch.allclose(out, ref, atol=0.05 * float(ref.abs().max()))
    dst.check_invariants()


@pytest.mark.parametrize("name", ["fp8", "int8", "int4"])
def test_quantized_rows_on_the_wire(name):
    """`[deployment] handoff_format`: a quarter to a half of the bytes cross, decoded on arrival."""
    src, dst = _prefilled(), KVManager(LAYOUT, 32, CPU)
    fmt = make_format(name, LAYOUT)
    assert fmt.nbytes <= RAW.nbytes // 2 + RAW.nbytes // 16
    want = sorted(dst.begin_handoff(1, PROMPT))
    dst.receive(1, want, src.export_rows(0, want, fmt).result(), fmt)
    dst.end_handoff(1)
    got = dst.kv[torch.tensor(dst.block_table(1))]
    ref = src.kv[torch.tensor(src.block_table(0)[:4])]
    assert torch.allclose(got, ref, atol=0.2 * float(ref.abs().max()))
    assert not torch.equal(got, ref)  # quantized: close, not exact


def test_hold_cached_shares_only_a_whole_cached_prompt():
    src = _prefilled()  # blocks 0-3 registered (4 whole blocks of PROMPT[:16]); block 4 is partial
    assert not src.hold_cached(1, PROMPT[:17] + [99, 98, 97])  # block 4 is not cached
    assert not src.has(1)
    assert src.hold_cached(2, PROMPT[:16])
    assert src.block_table(2) == src.block_table(0)[:4]
    rows = src.export_rows(2, [1, 3], RAW).result()
    assert torch.equal(rows[1].view(LAYOUT.dtype).view(LAYOUT.block_shape), src.kv[src.block_table(0)[3]])
    src.free(2)
    src.check_invariants()


def test_exported_rows_land_in_the_given_slots():
    """export_rows with `into` (a decode node's segment: slot k for the k-th block asked for)
    writes the rows there on the worker and returns those slots: the same bytes as a plain export."""
    src = _prefilled()
    plain = src.export_rows(0, [1, 2], RAW).result()  # [2, nbytes]
    into = torch.zeros((4, RAW.nbytes), dtype=torch.uint8)  # [4 slots, nbytes]
    got = src.export_rows(0, [1, 2], RAW, into, [2, 3]).result()
    assert torch.equal(got, plain) and torch.equal(into[2:], plain)
    assert not into[:2].any()  # other slots untouched
    got = src.export_rows(0, [0, 3], RAW, into, [3, 0]).result()  # slots in any order
    assert torch.equal(into[3], src.export_rows(0, [0], RAW).result()[0])
    assert torch.equal(into[0], src.export_rows(0, [3], RAW).result()[0]) and torch.equal(got[1], into[0])


def test_rows_said_to_be_in_a_segment_never_offered_are_refused():
    """A kv_blocks message naming a carrier the decode node did not offer (a device segment on a
    CPU node, a shared-memory segment it has not made) is a CorruptBlockError, not a read of
    memory that is not there."""
    from afkv.errors import CorruptBlockError
    from afkv.nodes.handoff import blocks_from_wire

    want = {0: bytes(16)}
    for flag in ("in_device", "in_segment"):
        msg = {"type": "kv_blocks", "hid": 0, "indices": [0], "hashes": [bytes(16)],
               "crcs": [] if flag == "in_device" else [0], flag: True}
        with pytest.raises(CorruptBlockError, match="was offered"):
            blocks_from_wire(msg, want, RAW, None)


def test_malformed_device_segment_offer_is_a_frame_error():
    """A prefill node reads a device-segment offer only when it is well formed and its rows are
    of the format's width (FrameError otherwise); a CPU node never opens one (None: host carriers)."""
    from afkv.errors import FrameError
    from afkv.nodes.handoff import open_device_segment

    wire = {"id": 0, "uuid": "GPU-0", "rows": 2, "nbytes": RAW.nbytes, "handle": b"h", "size": 2 * RAW.nbytes,
            "offset": 0, "ref_handle": b"r", "ref_offset": 0, "event": b"e", "event_sync": True}
    assert open_device_segment(wire, RAW.nbytes, CPU) is None
    if not torch.cuda.is_available():
        return
    cuda = torch.device("cuda", torch.cuda.current_device())
    for bad in ({**wire, "handle": "h"}, {k: v for k, v in wire.items() if k != "size"}, {**wire, "rows": 0},
                {**wire, "nbytes": RAW.nbytes + 1}):
        with pytest.raises(FrameError):
            open_device_segment(bad, RAW.nbytes, cuda)
    assert open_device_segment(wire, RAW.nbytes, cuda) is None  # another GPU's UUID


def test_exported_rows_complete_once_their_copies_have():
    """when_copied (export_rows on CUDA): the worker hands back rows and the event after which
    they are complete; the future completes only once a waiter thread has seen the event complete
    (never blocking the worker), and hands on every failure instead of hanging."""
    import threading
    from concurrent.futures import Future, ThreadPoolExecutor

    from afkv.kv.manager import when_copied

    class Event:  # a CUDA event whose copies end when the test says
        def __init__(self, fail=False):
            self.gate, self.fail, self.thread = threading.Event(), fail, None

        def synchronize(self):
            self.thread = threading.current_thread().name
            assert self.gate.wait(30)
            if self.fail:
                raise RuntimeError("CUDA error")

    def finished(value, event):
        job = Future()
        job.set_result((value, event))
        return job

    with ThreadPoolExecutor(1, thread_name_prefix="waiter") as waiter:
        assert when_copied(finished("rows", None), waiter).result(30) == "rows"  # CPU: complete on return
        event = Event()
        done = when_copied(finished("rows", event), waiter)
        assert not done.done()  # copies still running
        event.gate.set()
        assert done.result(30) == "rows" and event.thread.startswith("waiter")
        failing = Event(fail=True)
        failing.gate.set()
        with pytest.raises(RuntimeError, match="CUDA error"):
            when_copied(finished("rows", failing), waiter).result(30)
        job = Future()
        job.set_exception(KeyError("worker"))
        with pytest.raises(KeyError):
            when_copied(job, waiter).result(30)
    with pytest.raises(RuntimeError):  # the manager closed: an error, not a future that never ends
        when_copied(finished("rows", Event()), waiter).result(30)
