"""KV tiers on a GPU: copies on the copy stream into pinned memory, ordered with the model's
steps by events; quantized formats through the CUDA kernels; kvikio file I/O; the engine
end to end. Skipped without CUDA (run on the GPU machine: pytest -q -m gpu tests/kv)."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from afkv.kv.formats import make_format  # noqa: E402
from afkv.kv.layout import KVLayout  # noqa: E402
from afkv.kv.manager import KVManager  # noqa: E402
from afkv.kv.tiers.config import TierConfig  # noqa: E402
from afkv.kv.tiers.copier import Copier, CopyOp, Direction  # noqa: E402

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["none", "fp8", "int8", "int4"])
def test_cuda_copier_matches_the_cpu_reference(name):
    fmt = make_format(name, LAYOUT)
    blocks = (torch.randn(6, *LAYOUT.block_shape) * 2).to(torch.bfloat16)  # [6, *block_shape] on the CPU
    kv = blocks.cuda()
    host = torch.empty((6, fmt.nbytes), dtype=torch.uint8, pin_memory=True)
    assert host.is_pinned()
    copier = Copier(kv, host, fmt)
    assert copier.stream is not None
    result = copier.run([CopyOp(Direction.TO_HOST, i, 5 - i) for i in range(6)])
    result.event.synchronize()
    expected = fmt.encode(blocks)  # [6, nbytes] by the torch reference
    assert torch.equal(host, expected.flip(0))  # the same bytes quantized on the GPU as on the CPU
    kv.zero_()
    result = copier.run([CopyOp(Direction.TO_DEVICE, i, 5 - i) for i in range(6)])
    torch.cuda.current_stream().synchronize()
    decoded = torch.empty_like(blocks)
    fmt.decode(expected, decoded)
    assert torch.equal(kv.cpu(), decoded)


def manager_round_trip(device: torch.device, tmp_path) -> None:
    """Six prompts of 12 full blocks through a 16-block device tier and a 32-block host tier:
    the first one's blocks go to host memory, then disk; matching it again brings every block back intact. Model
    steps are stood in for by writes on the worker thread, as the engine's runner does."""
    worker = ThreadPoolExecutor(1)
    tiers = TierConfig(make_format("none", LAYOUT), 32, 128, tmp_path / "spill", io_threads=2,
                       disk_capacity_key="disk_num_blocks")
    kv = KVManager(LAYOUT, 16, device, tiers=tiers, worker=worker)
    assert kv.tiers.host.buf.is_pinned() == (device.type == "cuda")
    prompts = [[100 * s + i for i in range(193)] for s in range(6)]  # 12 full blocks + 1 token

    def fill(table: list[int], value: float) -> None:
        kv.kv[table] = value

    for s, toks in enumerate(prompts):
        assert kv.match_prefix(s, toks) == 0
        assert kv.allocate(s, len(toks))
        kv.flush()
        worker.submit(fill, list(kv.block_table(s)), float(s + 1)).result()
        kv.commit(s, toks, len(toks))
        kv.free(s)
        kv.drain()  # writes to disk done: host slots free to evict
    assert kv.metrics.counters["spills"] > 12 and kv.metrics.counters["host_evictions"] > 0
    assert kv.match_prefix(99, prompts[0]) == 192
    kv.flush()
    while kv.settle(99) is None:
        kv.drain()
    assert kv.settle(99) == 192 and kv.metrics.hit_blocks["disk"] > 0
    table = list(kv.block_table(99))
    got = worker.submit(lambda: kv.kv[table].float().cpu()).result()
    assert got.eq(1.0).all()
    kv.free(99)
    kv.close()
    worker.shutdown()


def test_manager_orders_copies_with_steps_on_a_worker(tmp_path):
    manager_round_trip(torch.device("cuda"), tmp_path)


def test_kvikio_file_io_round_trip(tmp_path):
    pytest.importorskip("kvikio")
    from afkv.kv.tiers.disk import read_block, write_block
    from afkv.kv.tiers.fileio import KvikioFileIO, default_fileio

    assert isinstance(default_fileio(), KvikioFileIO)
    io = KvikioFileIO()
    payload = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8)
    crc = write_block(tmp_path, b"f" * 16, b"h" * 16, payload, io)
    out = np.zeros_like(payload)
    read_block(tmp_path, b"f" * 16, b"h" * 16, crc, out, io)
    assert np.array_equal(out, payload)
    assert (tmp_path / (b"h".hex() * 16 + ".kvb")).stat().st_mode & 0o777 == 0o600


def test_engine_greedy_equal_with_tiers_on_gpu(tiny_dir, tmp_path):
    from afkv import Engine, EngineConfig, SamplingParams
    from tests.helpers import random_prompt

    prompts = [random_prompt(24, 256, seed=100) + random_prompt(6 + i, 256, seed=i) for i in range(10)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    sched = {"max_num_batched_tokens": 32, "max_num_seqs": 4}
    base = {"block_size": 4}
    model = {"device": "cuda", "dtype": "float32"}

    async def run(kv):
        async with Engine(tiny_dir["llama"], EngineConfig.from_dict({"model": model, "kv": kv, "scheduler": sched})) as e:
            out = [[r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
                   for _ in range(2)]
            await e.kv_manager.aclose()
            return out, e.kv_metrics()

    ref, _ = asyncio.run(run(base | {"num_blocks": 1024}))
    got, m = asyncio.run(run(base | {"num_blocks": 16, "host_num_blocks": 12, "disk_path": str(tmp_path / "s"),
                                     "disk_num_blocks": 400}))
    assert got == ref
    assert m.hit_blocks["host"] > 0 and m.counters["spills"] > 0
