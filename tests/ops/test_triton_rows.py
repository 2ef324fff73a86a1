"""copy_rows (afkv.ops.triton_rows): the Triton row copy a KV hand-off's indexed copies can take
on the GPU (move_rows' "triton" kernel). Here under Triton's interpreter on CPU tensors (on a
GPU machine, on CUDA ones): every row lands where a per-row copy puts it, other rows untouched,
for word and byte rows, strided views, and rows longer than one program's block."""

import pytest
import torch

from afkv.errors import ConfigError
from afkv.ops import triton_rows

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype,width", [(torch.int64, 3 * triton_rows.BLOCK + 5), (torch.int64, 24),
                                         (torch.uint8, 6), (torch.int32, 1000)])
def test_rows_land_where_a_per_row_copy_puts_them(dtype, width):
    g = torch.Generator().manual_seed(width)
    src = torch.randint(0, 100, (12, width), generator=g).to(dtype)
    dst = torch.randint(0, 100, (9, width), generator=g).to(dtype)
    dst_rows, src_rows = [7, 0, 3, 8, 2], [11, 4, 4, 0, 6]  # a source row may go twice
    want = dst.clone()
    for d, s in zip(dst_rows, src_rows):
        want[d] = src[s]
    src, dst = src.to(DEVICE), dst.to(DEVICE)
    triton_rows.copy_rows(dst, torch.tensor(dst_rows, device=DEVICE), src, torch.tensor(src_rows, device=DEVICE))
    assert torch.equal(dst.cpu(), want)


def test_strided_views_and_an_empty_copy():
    """Rows of views with row strides wider than their width (a slice of columns), no rows."""
    base_src = torch.arange(6 * 40, dtype=torch.int64).view(6, 40)
    base_dst = torch.zeros(5, 48, dtype=torch.int64)
    src, dst = base_src.to(DEVICE)[:, 8:32], base_dst.to(DEVICE)[:, 16:40]  # [6, 24] of stride 40, [5, 24] of 48
    triton_rows.copy_rows(dst, torch.tensor([4, 1], device=DEVICE), src, torch.tensor([0, 5], device=DEVICE))
    got = dst.cpu()
    assert torch.equal(got[4], base_src[0, 8:32]) and torch.equal(got[1], base_src[5, 8:32])
    assert not got[[0, 2, 3]].any()
    full = torch.zeros(5, 48, dtype=torch.int64)
    full[:, 16:40] = got
    assert torch.equal(dst.cpu(), full[:, 16:40])
    none = torch.empty(0, dtype=torch.int64, device=DEVICE)
    triton_rows.copy_rows(dst, none, src, none)
    assert torch.equal(dst.cpu(), got)


def test_mismatched_rows_are_a_config_error():
    a, b = torch.zeros(4, 8, dtype=torch.int64), torch.zeros(4, 9, dtype=torch.int64)
    idx = torch.tensor([0, 1])
    for dst, src in ((a, b), (a, a.to(torch.int32)), (a.t(), a)):
        with pytest.raises(ConfigError):
            triton_rows.copy_rows(dst, idx, src, idx)
