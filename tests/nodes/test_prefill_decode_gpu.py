"""One GPU, PD: a prefill node and the decode node as two processes on the same GPU (and an
expert node there too). The rows cross through CUDA IPC (afkv.nodes.handoff.DeviceSegment:
the decode node's device buffer of row slots, which the prefill node's worker fills device ->
device), land in the decode node's GPU cache on its worker (KVManager.receive), greedy tokens
equal the colocated engine's on the same GPU, only the blocks the decode node lacks cross, and
the link's staging buffer is allocated once and reused (grown when transfers at once need more).
Two GPUs (test_1p1d_over_nccl_between_two_gpus): the prefill node on cuda:1, the rows over NCCL."""

import asyncio
import dataclasses
import time

import pytest
import torch

from afkv import Engine, EngineConfig
from afkv.nodes.handoff import DeviceSegment
from afkv.serve.launch import Deployment
from tests.helpers import random_prompt
from tests.nodes.test_prefill_decode import PARAMS, expected_transfers, prompts_with_shared_prefixes

pytestmark = pytest.mark.gpu


def _needs_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")


def _write_config(path, experts: int, prefill_device: str):
    """A PD deployment's config at `path`: the decode node (and `experts` expert nodes) on
    cuda:0, one prefill node on `prefill_device`."""
    path.write_text(f"""
[model]
dtype = "float32"
device = "cuda:0"
[kv]
block_size = 4
num_blocks = 256
[scheduler]
max_num_batched_tokens = 24
[deployment]
attention_nodes = 1
expert_nodes = {experts}
prefill_nodes = 1
port = 0
attention_devices = ["cuda:0"]
expert_devices = {["cuda:0"] * experts}
prefill_devices = ["{prefill_device}"]
expert_timeout_s = 30.0
prefill_timeout_s = 30.0
""".replace("'", '"'))
    return path


async def _settled(baseline: int, timeout_s: float = 20.0) -> int:
    """torch.cuda.memory_allocated() once it is back to `baseline` (device segments are freed
    when the prefill node has let them go, which it does after its last message), or after
    timeout_s: the value then."""
    deadline = time.monotonic() + timeout_s
    while True:
        torch.cuda.ipc_collect()
        now = torch.cuda.memory_allocated()
        if now <= baseline or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("experts", [0, 1], ids=["1P1D", "1P1D1E"])
def test_pd_on_one_gpu_matches_colocated(tiny_dir, tmp_path, experts):
    _needs_gpu()
    model = str(tiny_dir["qwen3_moe"])
    path = _write_config(tmp_path / "pd-gpu.toml", experts, "cuda:0")
    prompts = prompts_with_shared_prefixes()
    more = [random_prompt(n, 256, seed=300 + n) for n in (17, 33, 50)]  # new prompts: 4, 8, 12 blocks cross
    cfg = EngineConfig.from_toml(path)

    async def run():
        async with Engine(model, dataclasses.replace(cfg, deployment=None), progress=False) as e:
            expected = [(await e.complete(p, PARAMS)).token_ids for p in prompts + more]
        with Deployment(path, model, start_attention=False) as dep:
            pd = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
            async with Engine(model, pd, progress=False) as e:
                got = [(await e.complete(p, PARAMS)).token_ids for p in prompts]
                counters = e.kv_metrics().counters
                assert counters["handoff_received_blocks"] == sum(expected_transfers(prompts))
                assert counters.get("handoff_received_device_blocks", 0) == counters["handoff_received_blocks"]
                # three hand-offs at once: each leases its own slots of the link's device staging
                # buffer (grown to hold them; this round also brings every buffer the engine keeps
                # for such a batch)
                warm = [random_prompt(n, 256, seed=400 + n) for n in (17, 33, 50)]
                before = e.kv_metrics().counters["handoff_received_device_blocks"]
                await asyncio.gather(*(e.complete(p, PARAMS) for p in warm))
                assert e.kv_metrics().counters["handoff_received_device_blocks"] - before == 4 + 8 + 12
                [staging] = e._prefill.stagings(0)
                assert staging.kind == "device" and staging.buffer is not None
                torch.cuda.ipc_collect()
                buffers, held = staging.num_buffers, torch.cuda.memory_allocated()
                got += [(await e.complete(p, PARAMS)).token_ids for p in more]
                assert got == expected
                assert e.kv_metrics().counters["handoff_received_device_blocks"] - before == 2 * (4 + 8 + 12)
                # the cached buffer took them: no allocation, no handle opened, nothing more held
                assert staging.num_buffers == buffers and await _settled(held) <= held
                e.kv_manager.check_invariants()

    asyncio.run(run())


def test_a_killed_prefill_node_frees_the_decode_nodes_staging_buffer(tiny_dir, tmp_path):
    """The prefill process holding the decode node's device staging buffer open (CUDA IPC) is
    killed: the decode node sees its connection end and the process exited, releases the
    offer's IPC count on its behalf (once), and the buffer is freed on the decode GPU."""
    _needs_gpu()
    model = str(tiny_dir["qwen3_moe"])
    path = _write_config(tmp_path / "pd-gpu-kill.toml", 0, "cuda:0")
    cfg = EngineConfig.from_toml(path)

    async def run():
        with Deployment(path, model, start_attention=False) as dep:
            pd = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
            async with Engine(model, pd, progress=False) as e:
                await e.complete(random_prompt(33, 256, seed=500), PARAMS)
                [staging] = e._prefill.stagings(0)
                assert staging.kind == "device"
                nbytes = staging.buffer.rows.numel()
                torch.cuda.ipc_collect()
                held = torch.cuda.memory_allocated()
                await asyncio.to_thread(dep.kill_node, dep.prefill_rank(0))
                async with asyncio.timeout(30):
                    while e.kv_metrics().counters.get("handoff_released_for_exited_prefill", 0) == 0:
                        await asyncio.sleep(0.05)
                assert await _settled(held - nbytes) <= held - nbytes  # the buffer freed
                assert e.kv_metrics().counters["handoff_released_for_exited_prefill"] == 1

    asyncio.run(run())


def test_declined_device_segment_is_freed():
    """A device segment the prefill node did not open (another GPU, no CUDA IPC) stays
    allocated while the offer counts (torch's IPC reference count) until the decode node
    declines it for the prefill node; then it is freed."""
    _needs_gpu()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.ipc_collect()
    baseline = torch.cuda.memory_allocated(device)
    seg = DeviceSegment(8, 2**20, device)
    wire = dict(seg.offer)
    assert torch.cuda.memory_allocated(device) >= baseline + 8 * 2**20
    del seg
    torch.cuda.ipc_collect()
    assert torch.cuda.memory_allocated(device) >= baseline + 8 * 2**20  # the offer still counts: kept
    torch.UntypedStorage._release_ipc_counter_cuda(wire["ref_handle"], wire["ref_offset"])  # what decline() does
    torch.cuda.ipc_collect()
    assert torch.cuda.memory_allocated(device) == baseline
    seg = DeviceSegment(8, 2**20, device)
    seg.decline()
    del seg
    torch.cuda.ipc_collect()
    assert torch.cuda.memory_allocated(device) == baseline


def test_1p1d_over_nccl_between_two_gpus(tiny_dir, tmp_path):
    """Two GPUs, PD: the prefill node on cuda:1, the decode node on cuda:0. The rows cross over
    the link's NCCL communicator (afkv.nodes.handoff, carrier nccl: joined once, received into
    the decode node's device staging slots), greedy tokens equal the colocated engine's on
    cuda:0, every block received came over NCCL, and the staging slots are given back."""
    pytest.importorskip("cupy")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = str(tiny_dir["qwen3_moe"])
    path = _write_config(tmp_path / "pd-nccl.toml", 0, "cuda:1")
    prompts = prompts_with_shared_prefixes()
    more = [random_prompt(n, 256, seed=300 + n) for n in (17, 33, 50)]
    cfg = EngineConfig.from_toml(path)

    async def run():
        async with Engine(model, dataclasses.replace(cfg, deployment=None), progress=False) as e:
            expected = [(await e.complete(p, PARAMS)).token_ids for p in prompts + more]
        with Deployment(path, model, start_attention=False) as dep:
            pd = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
            async with Engine(model, pd, progress=False) as e:
                got = [(await e.complete(p, PARAMS)).token_ids for p in prompts]
                got += [c.token_ids for c in await asyncio.gather(*(e.complete(p, PARAMS) for p in more))]
                assert got == expected
                counters = e.kv_metrics().counters
                assert counters["handoff_received_blocks"] == sum(expected_transfers(prompts)) + 4 + 8 + 12
                assert counters.get("handoff_received_nccl_blocks", 0) == counters["handoff_received_blocks"]
                [staging] = e._prefill.stagings(0)
                assert staging.kind == "nccl"
                deadline = time.monotonic() + 20
                while staging._leased and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert staging._leased == 0
                e.kv_manager.check_invariants()

    asyncio.run(run())


def test_nccl_link_moves_runs_of_rows_and_aborts_a_posted_receive():
    """The nccl carrier's primitives alone (afkv.nodes.handoff.CudaNccl through NcclLink), two
    ranks in this process on cuda:1 (sender) and cuda:0 (receiver): rows cut into runs of
    slots arrive intact, in submission order; then a receive posted with nothing sent ends with
    PeerLostError once its link is aborted, well before its timeout."""
    pytest.importorskip("cupy")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from concurrent.futures import wait

    from afkv.errors import PeerLostError
    from afkv.nodes.handoff import NCCL, NcclLink, runs

    d0, d1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert NCCL.gpu(d0) != NCCL.gpu(d1) and NCCL.gpu(d0) is not None
    uid = NCCL.new_id()
    recv_link, send_link = NcclLink(NCCL, uid, 0, d0, 60.0), NcclLink(NCCL, uid, 1, d1, 60.0)
    recv_link.start()
    send_link.start()
    wait([recv_link.joined, send_link.joined], timeout=60)
    assert recv_link.joined.result(0) and send_link.joined.result(0)
    g = torch.Generator(device=d1).manual_seed(0)
    rows = torch.randint(0, 255, (6, 4096), dtype=torch.uint8, device=d1, generator=g)  # [6, nbytes]
    slots = [[3, 4, 5], [0, 7, 8]]  # two messages: one run, then two
    staging = torch.zeros((9, 4096), dtype=torch.uint8, device=d0)
    moves = []
    for m, dest in enumerate(slots):
        part = rows[3 * m:3 * m + 3]
        moves.append(send_link.move(True, [part[k:k + n] for k, _, n in runs(dest)]))
        moves.append(recv_link.move(False, [staging[s:s + n] for _, s, n in runs(dest)]))
    for f in moves:
        f.result(60)
    assert torch.equal(staging[[3, 4, 5, 0, 7, 8]].cpu(), rows.cpu())
    posted = recv_link.move(False, [staging[0:1]])  # nothing will come
    t = time.monotonic()
    recv_link.abort()
    with pytest.raises(PeerLostError):
        posted.result(30)
    assert time.monotonic() - t < 30
    send_link.abort()
