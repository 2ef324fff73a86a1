"""The copier moves each block to and from the slot its op names (raw bytes, or through a
quantized host format).

Oracle: every block's content is a known function of a number (10 per slot or block id apart),
so a block that lands in the wrong place is off by >= 10 whatever the format does, while each
format's own error stays below TOL (16-bit scales per (token, kv head): measured <= 0.47 for
values below 80, and 3.5 for fp8 at values near 500).
"""

from __future__ import annotations

import pytest
import torch

from afkv.kv.formats import RawFormat, make_format
from afkv.kv.layout import KVLayout
from afkv.kv.tiers.copier import Copier, CopyOp, Direction

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
NUM_BLOCKS, NUM_SLOTS = 7, 5
TOL = 4.0  # < half the distance between two blocks' contents (10)


def _content(tag: int) -> torch.Tensor:
    """A block whose every value lies in [10 * tag, 10 * tag + 1)."""
    n = LAYOUT.block_nbytes // 4
    return (10.0 * tag + torch.arange(n, dtype=torch.float32) / n).view(LAYOUT.block_shape)


def _formats():
    return [pytest.param(lambda: RawFormat(LAYOUT), id="raw"),
            pytest.param(lambda: make_format("fp8", LAYOUT), id="fp8"),
            pytest.param(lambda: make_format("int8", LAYOUT), id="int8"),
            pytest.param(lambda: make_format("int4", LAYOUT), id="int4")]


@pytest.mark.parametrize("make", _formats())
def test_promotion_reads_the_slot_each_op_names(make):
    fmt = make()
    kv = torch.zeros(NUM_BLOCKS, *LAYOUT.block_shape)
    buf = torch.zeros(NUM_SLOTS, fmt.nbytes, dtype=torch.uint8)
    for slot in range(NUM_SLOTS):
        buf[slot] = fmt.encode(_content(slot + 1)[None])[0]
    slot_to_block = {3: 0, 0: 4, 4: 1, 1: 2, 2: 6}  # ops in neither slot nor block order
    Copier(kv, buf, fmt).run([CopyOp(Direction.TO_DEVICE, b, s) for s, b in slot_to_block.items()])
    for slot, block in slot_to_block.items():
        assert (kv[block] - _content(slot + 1)).abs().max() < TOL, (slot, block)
    for block in set(range(NUM_BLOCKS)) - set(slot_to_block.values()):
        assert (kv[block] == 0).all()  # untouched


@pytest.mark.parametrize("make", _formats())
def test_demotion_writes_the_slot_each_op_names_and_round_trips(make):
    fmt = make()
    kv = torch.stack([_content(b + 1) for b in range(NUM_BLOCKS)])  # [blocks, *block_shape]
    buf = torch.zeros(NUM_SLOTS, fmt.nbytes, dtype=torch.uint8)
    copier = Copier(kv, buf, fmt)
    block_to_slot = {5: 0, 1: 3, 6: 4, 2: 1}
    copier.run([CopyOp(Direction.TO_HOST, b, s) for b, s in block_to_slot.items()])
    assert (buf[2] == 0).all()
    out = torch.empty(NUM_SLOTS, *LAYOUT.block_shape)
    fmt.decode(buf, out)
    for block, slot in block_to_slot.items():
        assert (out[slot] - _content(block + 1)).abs().max() < TOL, (block, slot)
    # promote them back into other blocks, in one batch with a demotion that reuses a slot first
    kv[0] = _content(50)
    copier.run([CopyOp(Direction.TO_DEVICE, 3, 0), CopyOp(Direction.TO_DEVICE, 4, 3),
                CopyOp(Direction.TO_HOST, 0, 4), CopyOp(Direction.TO_DEVICE, 5, 4)])
    assert (kv[3] - _content(6)).abs().max() < TOL  # slot 0 held block 5
    assert (kv[4] - _content(2)).abs().max() < TOL  # slot 3 held block 1
    assert (kv[5] - _content(50)).abs().max() < TOL  # slot 4, rewritten in the batch by block 0


@pytest.mark.parametrize("width", [48, 12, 6, 5])  # int64, int32, int16 words, bytes
@pytest.mark.parametrize("pairs", ["one_run", "few_runs", "scattered", "gather", "scatter"])
def test_move_rows_equals_one_copy_per_row(width, pairs):
    """move_rows puts src row s_k in dst row d_k for every k, whether it takes slice copies (runs)
    or one indexed kernel (many runs: gather into a range of dst rows, scatter from a range of
    src rows, or both scattered), for every row width, and touches no other row."""
    from afkv.kv.tiers.copier import MAX_RUNS, move_rows

    g = torch.Generator().manual_seed(width)
    src = torch.randint(0, 256, (40, width), dtype=torch.uint8, generator=g)
    strided_a, strided_b = [(7 * k) % 40 for k in range(20)], [(13 * k + 5) % 40 for k in range(20)]  # 20 runs
    dst_rows, src_rows = {
        "one_run": (list(range(3, 13)), list(range(20, 30))),
        "few_runs": ([0, 1, 2, 9, 10, 30], [5, 6, 7, 1, 2, 39]),
        "scattered": (strided_a, strided_b),
        "gather": (list(range(4, 24)), strided_b),
        "scatter": (strided_a, list(range(11, 31))),
    }[pairs]
    assert 20 > MAX_RUNS
    storage = torch.randint(0, 256, (41, width), dtype=torch.uint8, generator=g)
    want = storage[1:].clone()
    dst = storage[1:]  # [40, width], a view one row into its storage (the odd widths' words differ)
    move_rows(dst, dst_rows, src, src_rows)
    for d, s in zip(dst_rows, src_rows):
        want[d] = src[s]
    assert torch.equal(dst, want)
    assert torch.equal(storage[1:], want)  # written in place, through the view
