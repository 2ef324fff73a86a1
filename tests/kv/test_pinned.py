"""PinnedRegion (afkv.kv.pinned): host memory of exactly the size asked for (torch's pinned
allocator would round 3 MiB + 5 up to 4 MiB), zeroed; a stream store laid in a caller's region
uses that memory. CUDA registration is checked on the GPU (tests/kv/test_stream_gpu.py: the
store's buffer is pinned)."""

import pytest
import torch

from afkv.errors import KVError
from afkv.kv.formats import make_format
from afkv.kv.layout import KVLayout
from afkv.kv.metrics import KVMetrics
from afkv.kv.pinned import PinnedRegion
from afkv.kv.stream import StreamConfig, StreamStore


def test_a_region_is_exactly_its_size_and_zeroed():
    region = PinnedRegion((3 << 20) + 5, cuda=False)
    assert region.tensor.numel() == region.nbytes == (3 << 20) + 5 and region.tensor.dtype == torch.uint8
    assert int(region.tensor.count_nonzero()) == 0
    region.close()
    region.close()


def test_a_store_laid_in_a_callers_region_uses_it():
    fmt = make_format("int4", KVLayout(num_layers=3, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32))
    cfg = StreamConfig(fmt, num_blocks=5, num_sink_tokens=8, window=8, ahead=1)
    region = PinnedRegion(3 * 5 * fmt.layer_nbytes + 100, cuda=False)
    store = StreamStore(cfg, torch.device("cpu"), KVMetrics(), host=region.tensor)
    assert store.buf.shape == (3, 5, fmt.layer_nbytes) and store.buf.data_ptr() == region.tensor.data_ptr()
    store.buf[2, 4].fill_(7)
    assert int(region.tensor[3 * 5 * fmt.layer_nbytes - 1]) == 7
    with pytest.raises(KVError, match="laid in a region"):
        StreamStore(cfg, torch.device("cpu"), KVMetrics(), host=region.tensor[:100])
