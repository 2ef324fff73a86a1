"""move_rows on CUDA: the indexed kernels between two device tensors (a KV hand-off through CUDA
IPC: cache blocks <-> a device segment's slots) and the run copies between pinned host memory and
the device, issued without a host synchronisation, put every row where a per-row copy would."""

import pytest
import torch

from afkv.kv.formats import RawFormat
from afkv.kv.layout import KVLayout
from afkv.kv.tiers.copier import INDEXED_KERNELS, MAX_RUNS, Copier, CopyOp, Direction, move_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STRIDED_A = [(7 * k) % 40 for k in range(20)]  # 20 runs: more than MAX_RUNS
STRIDED_B = [(13 * k + 5) % 40 for k in range(20)]
PAIRS = {"one_run": (list(range(3, 13)), list(range(20, 30))), "scattered": (STRIDED_A, STRIDED_B),
         "gather": (list(range(4, 24)), STRIDED_B), "scatter": (STRIDED_A, list(range(11, 31)))}


@pytest.mark.parametrize("indexed", INDEXED_KERNELS)
@pytest.mark.parametrize("width", [4096, 1000, 6])
@pytest.mark.parametrize("pairs", list(PAIRS))
@pytest.mark.parametrize("where", ["device", "to_host", "to_device"])
def test_move_rows_on_cuda(where, pairs, width, indexed):
    assert len(STRIDED_A) > MAX_RUNS
    g = torch.Generator().manual_seed(width)
    src = torch.randint(0, 256, (40, width), dtype=torch.uint8, generator=g)
    dst = torch.randint(0, 256, (40, width), dtype=torch.uint8, generator=g)
    want = dst.clone()
    dst_rows, src_rows = PAIRS[pairs]
    for d, s in zip(dst_rows, src_rows):
        want[d] = src[s]
    cuda = torch.device("cuda")
    src_t = src.pin_memory() if where == "to_device" else src.to(cuda)
    dst_t = dst.pin_memory() if where == "to_host" else dst.to(cuda)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        move_rows(dst_t, dst_rows, src_t, src_rows, non_blocking=True, indexed=indexed)
    stream.synchronize()
    assert torch.equal(dst_t.cpu(), want)


def test_raw_blocks_move_between_the_cache_and_device_slots():
    """Copier with a device buffer (a decode node's device segment): scattered cache blocks to
    consecutive slots and back into other scattered blocks, the bytes unchanged."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)
    fmt = RawFormat(layout)
    kv = torch.randn(64, *layout.block_shape, device="cuda").to(torch.bfloat16)  # [64, *block_shape]
    slots = torch.zeros((24, fmt.nbytes), dtype=torch.uint8, device="cuda")  # [24, nbytes]
    blocks = [(5 * k + 3) % 64 for k in range(24)]  # 24 runs
    Copier(kv, slots, fmt).run([CopyOp(Direction.TO_HOST, b, s) for s, b in enumerate(blocks)]).event.synchronize()
    dst = torch.zeros_like(kv)
    targets = [(11 * k + 1) % 64 for k in range(24)]
    Copier(dst, slots, fmt).run([CopyOp(Direction.TO_DEVICE, b, s) for s, b in enumerate(targets)]).event.synchronize()
    for b, t in zip(blocks, targets):
        assert torch.equal(dst[t], kv[b])
    untouched = sorted(set(range(64)) - set(targets))
    assert not dst[untouched].any()
