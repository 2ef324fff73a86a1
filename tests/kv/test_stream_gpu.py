"""Streaming attention on a GPU (afkv.kv.stream): spills into pinned memory on the compute
stream, the staging ring's copy stream ordered by events (no host synchronisation), and the
engine end to end against its all-device run. Skipped without CUDA (on the GPU machine:
pytest -q -m gpu tests/kv/test_stream_gpu.py, or afkv/bench/long_context_gpu.sh)."""

import asyncio

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from afkv.config import EngineConfig  # noqa: E402
from afkv.engine.engine import Engine  # noqa: E402
from afkv.engine.params import SamplingParams  # noqa: E402
from afkv.kv.formats import make_format  # noqa: E402
from afkv.kv.layout import KVLayout  # noqa: E402
from afkv.kv.manager import KVManager  # noqa: E402
from afkv.kv.stream import StreamConfig  # noqa: E402
from tests.helpers import random_prompt  # noqa: E402

LAYOUT = KVLayout(num_layers=6, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)


@pytest.mark.parametrize("name, ahead, disk", [("none", 1, False), ("none", 2, False), ("int8", 2, False),
                                              ("int4", 2, False), ("none", 2, True), ("int4", 1, True)])
def test_spill_then_stream_every_layer_on_the_gpu(tmp_path, name, ahead, disk):
    """Blocks spilled to the pinned store (disk: 20 of them, the other 28 to block files read
    back through pinned bounce slots) and streamed back, layer by layer, while the compute
    stream is kept busy: each layer's sections are the bytes the format encodes on the CPU."""
    fmt = make_format(name, LAYOUT)
    cfg = StreamConfig(fmt, num_blocks=20 if disk else 64, num_sink_tokens=16, window=16, ahead=ahead,
                       disk_blocks=64 if disk else 0, disk_path=tmp_path if disk else None)
    kv = KVManager(LAYOUT, 80, torch.device("cuda"), stream=cfg)
    assert kv.stream.buf.is_pinned()
    kv.match_prefix(1, [])
    assert kv.allocate(1, 50 * 16)
    table = kv.block_table(1)
    blocks = (torch.randn(len(table), *LAYOUT.block_shape) * 2).to(torch.bfloat16)  # [50, *block_shape] on the CPU
    kv.kv[table] = blocks.cuda()
    assert kv.place(1, 50 * 16) == 48 * 16  # block 0 (sink) and block 49 (window) stay
    kv.flush()  # spills on the compute stream, into pinned memory
    ids = kv.streamed_blocks(1)
    kv.kv[table[1:49]] = 0  # the device blocks are reused: the store must hold its own bytes
    rows = fmt.encode(blocks[1:49]).view(48, LAYOUT.num_layers, fmt.layer_nbytes)  # the CPU reference
    step = kv.stream_ring.begin(ids)
    sections = []
    busy = torch.randn(2048, 2048, device="cuda")
    for layer in range(LAYOUT.num_layers):
        busy = busy @ busy.T / 2048  # compute-stream work between layers
        sections.append(step.layer(layer).clone())  # ordered after the layer's copy by its event
    torch.cuda.synchronize()
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(sections[layer].cpu(), rows[:, layer])
    assert step.corrupt == {}
    kv.free(1)
    kv.check_invariants()
    kv.close()


def _config(chunk: int = 16, **kv) -> EngineConfig:
    return EngineConfig.from_dict({"model": {"device": "cuda", "dtype": "float32"},
                                   "kv": {"block_size": 4, **kv},
                                   "scheduler": {"max_num_seqs": 2, "max_num_batched_tokens": chunk}})


async def _generate(model_dir, cfg, prompts):
    async with Engine(model_dir, cfg, progress=False) as engine:
        out = await asyncio.gather(*(engine.complete(p, SamplingParams(max_tokens=8, logprobs=1, ignore_eos=True))
                                     for p in prompts))
        kv = engine.kv_manager
        kv.check_invariants()
        assert kv.pool.num_free_blocks == kv.pool.num_blocks - len(kv.device.scratch_blocks)  # graphs hold a scratch block
        return out, dict(kv.metrics.counters)


@pytest.mark.parametrize("family, disk, chunk", [("qwen3_moe", False, 16), ("qwen3_moe", True, 16),
                                                 ("qwen3_moe", False, 48)])
def test_engine_streamed_equals_all_device_on_the_gpu(tiny_dir, tmp_path, family, disk, chunk):
    """Prompts of 400+ tokens on an 80-token device tier (20 blocks of 4): each prefill chunk
    past it attends its device blocks and its streamed ones with the Triton prefill partials,
    each decode row with the decode partials; greedy tokens equal the all-device run's."""
    prompts = [random_prompt(400, 200, 1), random_prompt(420, 200, 2)]
    ref, _ = asyncio.run(_generate(tiny_dir[family], _config(chunk, num_blocks=512), prompts))
    store = (dict(stream_num_blocks=16, stream_disk_num_blocks=256, stream_disk_path=str(tmp_path)) if disk
             else dict(stream_num_blocks=256))
    got, counters = asyncio.run(_generate(tiny_dir[family], _config(chunk, num_blocks=20 if chunk == 16 else 40,
                                                                    **store, stream_sink_tokens=4,
                                                                    stream_window=8), prompts))
    assert counters["streamed_steps"] > 0 and counters["stream_spills"] > 0
    assert (counters["stream_disk_spills"] > 0) == disk
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    for r, g in zip(ref, got):
        assert max(abs(a - b) for a, b in zip(r.logprobs, g.logprobs)) < 1e-3


BOUNDS = {"int8": (0.04, 0.25), "int4": (0.3, 0.6)}  # tests/engine/test_stream.py's (95th percentile, max)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_host_blocks_decode_through_the_kernels_within_the_formats_bounds(tiny_dir, fmt):
    """Decode rows of streaming sequences read the quantized ring slot with the Triton decode
    kernel (codes in registers) and merge it with the device part by log-sum-exp: logprobs stay
    within the format's bounds of the streamed run in the model dtype ('none'), as on the CPU."""
    prompts = [random_prompt(400, 200, 1), random_prompt(420, 200, 2)]
    stream = dict(num_blocks=20, stream_num_blocks=256, stream_sink_tokens=4, stream_window=8)
    ref, _ = asyncio.run(_generate(tiny_dir["qwen3_moe"], _config(**stream), prompts))
    got, counters = asyncio.run(_generate(tiny_dir["qwen3_moe"], _config(**stream, spill_format=fmt), prompts))
    assert counters["streamed_steps"] > 0
    errors = []
    for r, g in zip(ref, got):
        for i, (a, b) in enumerate(zip(r.logprobs, g.logprobs)):
            if r.token_ids[: i + 1] != g.token_ids[: i + 1]:
                break
            errors.append(abs(a - b))
    p95 = sorted(errors)[int(0.95 * (len(errors) - 1))]
    assert len(errors) >= 8 and max(errors) > 0  # the quantized middle was read
    assert p95 <= BOUNDS[fmt][0] and max(errors) <= BOUNDS[fmt][1]


@pytest.mark.parametrize("fmt", ["none", "fp8", "int8", "int4"])
def test_prefill_partials_at_qwen3_30b_shapes_match_the_reference(fmt):
    """A streaming sequence's prefill chunk at Qwen3-30B-A3B's shapes (32 / 4 heads of 128, bf16,
    block 16) on the GPU: 1000 queries (not a multiple of the tile) over a ring slot of 96 blocks
    in host format `fmt`, no mask (codes read in place), and over 80 device blocks, causal; each
    part's output and log-sum-exp against the float32 torch reference, and the merge against
    causal attention over both."""
    from afkv.ops import attention as A
    from afkv.ops import triton_attention as ta

    torch.manual_seed(0)
    layout = KVLayout(num_layers=1, num_kv_heads=4, head_dim=128, block_size=16, dtype=torch.bfloat16)
    f = make_format(fmt, layout)
    streamed = torch.randn(96, *layout.block_shape, device="cuda").to(torch.bfloat16)  # [96, 1, 2, 16, 4, 128]
    ring = f.layer_cache(f.encode(streamed))  # as StreamStep.cache hands it out
    q = torch.randn(1000, 32, 128, device="cuda").to(torch.bfloat16)
    ids = torch.randperm(96, device="cuda")
    partial = ta.paged_prefill_partial if fmt == "none" else ta.paged_prefill_partial_quantized
    reference = A.paged_attention_partial if fmt == "none" else A.paged_attention_partial_quantized
    got = partial(q, ring, 0, ids, 96 * 16, causal=False)
    want = reference(q.float(), ring, 0, ids, 96 * 16, causal=False)
    torch.testing.assert_close(got.out, want.out, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got.lse, want.lse, atol=2e-2, rtol=0)
    kv = torch.randn(88, 1, 2, 16, 4, 128, device="cuda").to(torch.bfloat16)  # the device tier
    table = torch.randperm(88, device="cuda")[:80]
    own = ta.paged_prefill_partial(q, kv, 0, table, 80 * 16 - 7)  # the chunk: the last 1000 of 1273 slots
    own_ref = A.paged_attention_partial(q.float(), kv.float(), 0, table, 80 * 16 - 7)
    torch.testing.assert_close(own.out, own_ref.out, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(own.lse, own_ref.lse, atol=2e-2, rtol=0)
    merged = A.merge_partials([own, got]).out
    torch.testing.assert_close(merged, A.merge_partials([own_ref, want]).out, atol=3e-2, rtol=2e-2)
