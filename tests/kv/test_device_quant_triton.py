"""The CUDA decode path of a quantized device tier (rows through the Triton kernel, the staging
tail as a fixed buffer) against the torch path, under Triton's interpreter on CPU (compiled on
a GPU). Skipped without triton."""

from __future__ import annotations

import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are defined (at import)
pytest.importorskip("triton")

from afkv.kv.formats import make_format  # noqa: E402
from afkv.kv.layout import KVLayout  # noqa: E402
from afkv.ops import attention  # noqa: E402
from afkv.ops import triton_attention as ta  # noqa: E402

if not _CUDA and not type(ta._decode_kernel).__name__.startswith("Interpreted"):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_triton_rows_plus_tail_equal_the_torch_path(name):
    device = torch.device("cuda" if _CUDA else "cpu")
    layout = KVLayout(2, 2, 16, 4, torch.float32)
    g = torch.Generator().manual_seed(0)
    fmt = make_format(name, 4, layout)
    full = torch.randn(12, *layout.block_shape, generator=g)  # ids 0..7 rows, 8..11 staging 0..3
    cache = attention.QuantizedKVCache(fmt.encode(full[:8]).to(device), full[8:].to(device), fmt.spec,
                                       max_tail_blocks=2)
    # rows first, then at most 2 staging blocks; padded with block 0 past each context
    tables = torch.tensor([[3, 1, 9, 0, 0], [2, 5, 6, 8, 10], [11, 0, 0, 0, 0]], device=device)
    lens = torch.tensor([10, 19, 2], device=device)
    q = torch.randn(3, 4, 16, generator=g).to(device)
    for layer in range(2):
        got = attention._decode_quantized_triton(ta, q, cache, layer, tables, lens)
        scratch = attention.gather_layer(cache, layer, tables).flatten(0, 1)[:, None]
        ids = torch.arange(15, device=device).view(3, 5)
        want = attention.paged_decode_attention(q, scratch, 0, ids, lens)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
