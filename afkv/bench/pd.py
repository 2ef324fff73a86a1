"""`afkv bench pd`: the prefill-decode interference that PD disaggregation removes (CPU processes).

`streams` requests decode all the time (each asks for `gen_len` tokens, then the next one
starts) while a long prompt (`prompt_len` tokens, `long_tokens` new ones) arrives every
`interval_s` for `duration_s`. Three runs (`afkv launch`'s Deployment), one after the other:

    alone      the colocated node with no long prompts: the decode streams' own ITL (reference)
    colocated  one attention node running the whole model (expert_nodes = 0): decode steps
               carry the long prompts' prefill chunks
    pd         the same node as a decode node + one prefill node: the long prompts' KV is
               computed there and handed over (afkv.nodes.handoff)

`afkv bench pd-handoff` (CPU or one GPU; every node a process on the same device; or, with
`--devices cuda:0,cuda:1`, the decode nodes on the first GPU and the prefill node on the second,
the rows over NCCL, the limit one peer copy between the two GPUs): the KV
hand-off itself, per prompt length. A colocated node gives the baseline TTFT; then a deployment
of two decode nodes and one prefill node: the prompt goes to decode node 0 ("cold": its blocks
leave the prefill node as its chunks fill them, overlapping the prefill) and then to decode
node 1 ("warm": the prefill node holds the prompt's blocks already, so the hand-off is the
transfer alone). Reported from the decode nodes' own clocks (RequestMetrics): hand-off time,
bytes, GB/s of the warm hand-off against the copy limit of the path it took, measured in the same
run (one GPU, CUDA IPC: one device -> device copy of the same bytes; a host carrier on a GPU:
device -> pinned host -> device; CPU: one memcpy), the warm hand-off split at the prefill node's
ack into its set-up (arrival -> ack: hashes, slots of the link's staging buffer, the request; a
buffer is allocated and opened by the prefill node only when a link's first transfer, or one
larger than any before, needs it: the warm-ups of each length do, so the measured pair allocates
none, `new_staging_buffers` says so) and its transfer (ack -> last block: the copies and their
messages), and the time from the last block landing to the first token against the colocated TTFT.

Every node first serves, per prompt length, a prompt of that length that shares no block with the
measured one (its TTFT is `colocated_first_ttft_s`): a length's first prompt in a process pays the
one-time JIT compilation of the kernel specializations its shapes need (Triton specializes integer
arguments on divisibility by 16: an 8000-token prompt's last 512-token chunk ends at a 500-block
table, unlike 1024 or 4096 tokens), which is not what the bench measures.

`afkv bench pd-rows` (CPU or one GPU, one process): the hand-off's indexed row copies alone, at
a real KV block's row (Qwen3-30B-A3B: 1.5 MiB per 16-token block) and a hand-off's block counts:
"export" (scattered cache blocks -> a run of staging slots, the prefill node's copy) and "import"
(a run of slots -> scattered blocks, the decode node's), each through every indexed kernel of
move_rows (torch's index_select / index_copy_; on CUDA also the Triton copy_rows), against one
slice copy of the same bytes (the limit), in the same run; every result checked against a
per-row copy.

In `afkv bench pd`, each node process is pinned to its own core (os.sched_setaffinity: the decode / colocated node
on the first core, the prefill node on the second) with one torch thread; the client (this
process) is left unpinned. Measured where the client sees the chunks: inter-token latency
(ITL) of the decode streams within the window (p50, p99), their tokens/s, and the long
prompts' TTFT; ratios pd / colocated from the same run. Per node process, the CPU seconds it
got within the window and the seconds it was runnable but waited for its core
(/proc/PID/task/*/schedstat): colocated uses one core and leaves the other to the client and
the machine's other jobs, PD keeps both busy, so on a shared machine PD's nodes wait for their
cores more (that, not the hand-off, made PD's long-prompt TTFT worse in RESULTS.md's runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import afkv
from afkv.engine.params import SamplingParams
from afkv.kv.tiers.copier import INDEXED_KERNELS, move_rows
from afkv.serve.launch import Deployment

MODES = ("alone", "colocated", "pd")


def _config(path: Path, mode: str, device_memory_mib: int, max_num_batched_tokens: int) -> Path:
    path.write_text(f"""
[kv]
device_memory_mib = {device_memory_mib}
[scheduler]
max_num_batched_tokens = {max_num_batched_tokens}
[deployment]
attention_nodes = 1
expert_nodes = 0
prefill_nodes = {1 if mode == "pd" else 0}
port = 0
prefill_timeout_s = 600
client_timeout_s = 600
""")
    return path


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _sched_s(pid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of every thread of process
    `pid` so far (Linux /proc/PID/task/*/schedstat); None where there is no such file."""
    run = wait = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                r, w, _ = f.read().split()
            run, wait = run + int(r), wait + int(w)
    except (OSError, ValueError):
        return None
    return run / 1e9, wait / 1e9


def _pin(dep: Deployment, cores: list[int]) -> dict[int, list[int]]:
    """rank -> the core its process runs on (decode/attention node first, prefill second)."""
    pinned = {}
    for rank, proc in sorted(dep.procs.items()):
        core = cores[rank % len(cores)]
        os.sched_setaffinity(proc.pid, {core})
        pinned[rank] = [core]
    return pinned


async def _run_mode(mode: str, model: str | None, workdir: Path, args: dict, progress) -> dict:
    cfg = _config(workdir / f"{mode}.toml", mode, args["device_memory_mib"], args["max_num_batched_tokens"])
    with Deployment(cfg, model, log_dir=workdir / f"logs-{mode}") as dep:
        pinned = _pin(dep, args["cores"]) if len(args["cores"]) >= 2 else {}
        async with await afkv.attach(dep.address, token=dep.token, peer_timeout_s=600) as engine:
            vocab_hi = 40000 if model is None else 200
            g = torch.Generator().manual_seed(0)

            def prompt(n: int) -> list[int]:
                return torch.randint(10, vocab_hi, (n,), generator=g).tolist()

            # warm-up: a short request and one long prompt (both paths, every kernel size)
            await engine.complete(prompt(16), SamplingParams(max_tokens=4, ignore_eos=True))
            await engine.complete(prompt(args["prompt_len"]), SamplingParams(max_tokens=1, ignore_eos=True))
            gaps: list[float] = []
            tokens = [0]
            window: list[float] = []
            stop = asyncio.Event()

            async def stream() -> None:
                params = SamplingParams(max_tokens=args["gen_len"], ignore_eos=True)
                while not stop.is_set():
                    last = None
                    async for chunk in engine.generate(prompt(16), params):
                        now = time.perf_counter()
                        if window and window[0] <= now and (len(window) == 1 or now <= window[1]):
                            tokens[0] += len(chunk.token_ids)
                            if last is not None:
                                gaps.append(now - last)
                        last = now
                        if stop.is_set():
                            break

            ttfts: list[float] = []

            async def long_prompt(p: list[int]) -> None:
                sent = time.perf_counter()
                async for _ in engine.generate(p, SamplingParams(max_tokens=args["long_tokens"], ignore_eos=True)):
                    ttfts.append(time.perf_counter() - sent)
                    break

            streams = [asyncio.create_task(stream()) for _ in range(args["streams"])]
            await asyncio.sleep(args["settle_s"])  # every stream decoding
            window.append(time.perf_counter())
            sched0 = {rank: _sched_s(proc.pid) for rank, proc in dep.procs.items()}
            longs = []
            for _ in range(max(1, round(args["duration_s"] / args["interval_s"]))):
                if mode != "alone":
                    longs.append(asyncio.create_task(long_prompt(prompt(args["prompt_len"]))))
                await asyncio.sleep(args["interval_s"])
            window.append(time.perf_counter())
            sched1 = {rank: _sched_s(proc.pid) for rank, proc in dep.procs.items()}
            stop.set()
            for t in longs:
                t.cancel()  # those still prefilling are aborted (and their hand-offs cancelled)
            for t in streams + longs:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            [metrics] = await engine.node_metrics()
    span = window[1] - window[0]
    res = {
        "itl_p50_ms": 1e3 * _percentile(gaps, 0.5), "itl_p99_ms": 1e3 * _percentile(gaps, 0.99),
        "itl_max_ms": 1e3 * max(gaps, default=float("nan")), "decode_tok_s": tokens[0] / span,
        "long_prompts": len(longs), "long_done": len(ttfts),
        "long_ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else float("nan"), "window_s": span,
        "num_gaps": len(gaps), "pinned": pinned, "load_average_1m": os.getloadavg()[0],
        # per node process (rank) within the window: CPU seconds, and seconds it was runnable
        # but another process held its core (the machine's other jobs, the client)
        "cpu_s": {r: sched1[r][0] - sched0[r][0] for r in sched0 if sched0[r] and sched1.get(r)},
        "runq_wait_s": {r: sched1[r][1] - sched0[r][1] for r in sched0 if sched0[r] and sched1.get(r)},
        "handoff_received_blocks": metrics.kv.counters.get("handoff_received_blocks", 0),
    }
    share = {r: res["cpu_s"][r] / (res["cpu_s"][r] + res["runq_wait_s"][r]) for r in res["cpu_s"]
             if res["cpu_s"][r] + res["runq_wait_s"][r] > 0}
    progress(f"  {mode:>9}: ITL p50 {res['itl_p50_ms']:.1f} ms, p99 {res['itl_p99_ms']:.1f} ms, decode "
             f"{res['decode_tok_s']:.1f} tok/s, long prompts {res['long_done']}/{res['long_prompts']} "
             f"(TTFT {res['long_ttft_mean_s']:.2f} s); node CPU s (share of runnable time) "
             + ", ".join(f"rank {r}: {res['cpu_s'][r]:.1f} ({100 * share[r]:.0f}%)" for r in sorted(share)))
    return res


async def run_pd_bench(model: str | None = None, streams: int = 8, prompt_len: int = 2048, interval_s: float = 1.0,
                       duration_s: float = 30.0, gen_len: int = 64, long_tokens: int = 4, settle_s: float = 2.0,
                       device_memory_mib: int = 2048, max_num_batched_tokens: int = 512, progress=print) -> dict:
    cores = sorted(os.sched_getaffinity(0))[:2]
    args = {"streams": streams, "prompt_len": prompt_len, "interval_s": interval_s, "duration_s": duration_s,
            "gen_len": gen_len, "long_tokens": long_tokens, "settle_s": settle_s,
            "device_memory_mib": device_memory_mib, "max_num_batched_tokens": max_num_batched_tokens, "cores": cores}
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # one torch thread per node process: one core each
    try:
        with tempfile.TemporaryDirectory(prefix="afkv-bench-pd-") as tmp:
            runs = {mode: await _run_mode(mode, model, Path(tmp), args, progress) for mode in MODES}
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    a, c, p = runs["alone"], runs["colocated"], runs["pd"]
    return {
        "bench": "pd", "model": str(model or "default"), "args": args,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "runs": runs,
        "ratios": {"itl_p50": p["itl_p50_ms"] / c["itl_p50_ms"], "itl_p99": p["itl_p99_ms"] / c["itl_p99_ms"],
                   "decode_tok_s": p["decode_tok_s"] / c["decode_tok_s"],
                   "pd_itl_p99_vs_alone": p["itl_p99_ms"] / a["itl_p99_ms"]},
    }


def format_table(result: dict) -> str:
    a = result["args"]
    head = (f"{'mode':>9} | {'ITL p50 ms':>10} | {'ITL p99 ms':>10} | {'decode tok/s':>12} | {'long TTFT s':>11} | "
            "long done")
    lines = [f"{a['streams']} decode streams; a {a['prompt_len']}-token prompt every {a['interval_s']} s for "
             f"{a['duration_s']} s; one core per node ({result['model']})", head, "-" * len(head)]
    for mode in MODES:
        r = result["runs"][mode]
        lines.append(f"{mode:>9} | {r['itl_p50_ms']:>10.1f} | {r['itl_p99_ms']:>10.1f} | {r['decode_tok_s']:>12.1f} | "
                     f"{r['long_ttft_mean_s']:>11.2f} | {r['long_done']}/{r['long_prompts']}")
    q = result["ratios"]
    lines.append(f"pd / colocated: ITL p50 x{q['itl_p50']:.3f}, ITL p99 x{q['itl_p99']:.3f}, "
                 f"decode tok/s x{q['decode_tok_s']:.3f}; pd / alone: ITL p99 x{q['pd_itl_p99_vs_alone']:.3f}")
    return "\n".join(lines)


def _copy_limit_gbs(nbytes: int, path: str, devices: tuple[str, str] | None = None) -> float:
    """GB/s of the path the hand-off took, at best (best of 5 copies of max(nbytes, 64 MiB), so
    that a small hand-off does not time call overheads): "device" one device -> device copy
    (CUDA IPC: the rows never leave the GPU), "pinned" device -> pinned host -> device (the
    host carriers on a GPU, at best), "host" one memcpy (CPU nodes), "peer" one copy from the
    prefill GPU to the decode GPU (`devices`: (decode, prefill); NVLink or PCIe peer access,
    what NCCL rides on)."""
    nbytes = max(nbytes, 64 * 2**20)
    if path == "peer":
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=devices[1])
        dst = torch.empty(nbytes, dtype=torch.uint8, device=devices[0])
        copies = [(dst, src)]
    elif path == "host":
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        copies = [(dst, src)]
    else:
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        copies = [(dst, src)] if path == "device" else [(host, src), (dst, host)]
    best = float("inf")
    for _ in range(5):
        if src.is_cuda:
            torch.cuda.synchronize(src.device)
            torch.cuda.synchronize(dst.device)
        t = time.perf_counter()
        for a, b in copies:
            a.copy_(b, non_blocking=True)
        if src.is_cuda:
            torch.cuda.synchronize(src.device)
            torch.cuda.synchronize(dst.device)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


LIMIT_PATHS = {"device": "device -> device copy (CUDA IPC)", "pinned": "device -> pinned host -> device",
               "host": "host memcpy", "peer": "GPU -> GPU copy (peer)"}
CARRIERS = {"device": "CUDA IPC", "pinned": "host memory", "host": "host memory", "peer": "NCCL"}


def _handoff_config(path: Path, prefill: bool, device_memory_mib: int,
                    devices: tuple[str, str] | None = None) -> Path:
    # No CUDA graphs: what is timed is prefill and the first token (a prefill step), never a
    # replayed decode step, and three processes capturing graphs on one GPU cost start-up time.
    # devices (decode, prefill): the decode nodes (and the colocated one) on the first, the
    # prefill node on the second.
    placed = "" if devices is None else (f'attention_devices = {[devices[0]] * (2 if prefill else 1)}\n' +
                                         (f'prefill_devices = ["{devices[1]}"]\n' if prefill else "")).replace("'", '"')
    path.write_text(f"""
[model]
cuda_graphs = false
[kv]
device_memory_mib = {device_memory_mib}
[deployment]
attention_nodes = {2 if prefill else 1}
expert_nodes = 0
prefill_nodes = {1 if prefill else 0}
port = 0
prefill_timeout_s = 600
client_timeout_s = 600
{placed}""")
    return path


async def run_handoff_bench(model: str | None = None, prompt_lens: tuple[int, ...] = (1024, 4096),
                            device_memory_mib: int = 2048, devices: tuple[str, str] | None = None,
                            progress=print) -> dict:
    """devices: (decode GPU, prefill GPU), two of them: the rows cross over NCCL; None: every
    node on the default device."""
    vocab_hi = 40000 if model is None else 200
    g = torch.Generator().manual_seed(1)
    prompts = {n: torch.randint(10, vocab_hi, (n,), generator=g).tolist() for n in prompt_lens}
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    rows: dict[int, dict] = {n: {"prompt_len": n} for n in prompt_lens}
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="afkv-bench-pd-handoff-") as tmp:
        with Deployment(_handoff_config(Path(tmp) / "colocated.toml", False, device_memory_mib, devices), model) as dep:
            async with await afkv.attach(dep.address, token=dep.token, peer_timeout_s=600) as engine:
                for n in prompt_lens:  # each length after a warm-up of its own: its kernels' first compilation
                    rows[n]["colocated_first_ttft_s"] = (await engine.complete(prompts[n][::-1], params)).metrics.ttft_s
                    m = (await engine.complete(prompts[n], params)).metrics
                    rows[n]["colocated_ttft_s"] = m.ttft_s
        with Deployment(_handoff_config(Path(tmp) / "pd.toml", True, device_memory_mib, devices), model) as dep:
            async with await afkv.attach(dep.address, token=dep.token, peer_timeout_s=600) as engine:
                for n in prompt_lens:
                    # Warm-up of this length just before it (as the measured pair: decode node 0, then
                    # 1; equal free KV: in turn), so the two nodes' last reports are of equal prompts.
                    for _ in range(2):
                        await engine.complete(prompts[n][::-1], params)
                    before = [k.counters for k in await engine.kv_metrics()]
                    cold = (await engine.complete(prompts[n], params)).metrics  # decode node 0
                    warm = (await engine.complete(prompts[n], params)).metrics  # decode node 1
                    after = [k.counters for k in await engine.kv_metrics()]

                    def delta(node: int, key: str) -> int:
                        return after[node].get(key, 0) - before[node].get(key, 0)

                    nbytes = delta(1, "bytes_handoff_received")
                    if not (delta(0, "bytes_handoff_received") == nbytes > 0):
                        raise RuntimeError(f"{n} tokens: the cold and warm requests did not go to decode nodes 0 "
                                           f"and 1 ({delta(0, 'bytes_handoff_received')} and {nbytes} bytes received)")
                    in_device = delta(1, "handoff_received_device_blocks")
                    blocks = delta(1, "handoff_received_blocks")
                    path = "host" if not cuda else "peer" if delta(1, "handoff_received_nccl_blocks") == blocks \
                        else "device" if in_device == blocks else "pinned"
                    r = rows[n]
                    r |= {"handoff_bytes": nbytes, "handoff_tokens": warm.num_handoff_tokens,
                          "carrier": CARRIERS[path],
                          "cold_ttft_s": cold.ttft_s, "cold_handoff_s": cold.handoff_end_s - cold.arrival_s,
                          "cold_last_block_to_first_token_s": cold.first_token_s - cold.handoff_end_s,
                          "warm_handoff_s": warm.handoff_end_s - warm.arrival_s,
                          "warm_setup_s": warm.handoff_ack_s - warm.arrival_s,
                          "warm_transfer_s": warm.handoff_end_s - warm.handoff_ack_s,
                          "warm_last_block_to_first_token_s": warm.first_token_s - warm.handoff_end_s,
                          # staging buffers the measured pair allocated (0: the links' cached ones, sized by
                          # the warm-ups, took them: no allocation, no handle opened)
                          "new_staging_buffers": delta(0, "handoff_staging_buffers") + delta(1, "handoff_staging_buffers")}
                    r["warm_handoff_gbs"] = nbytes / r["warm_handoff_s"] / 1e9
                    r["warm_transfer_gbs"] = nbytes / r["warm_transfer_s"] / 1e9
                    r["limit_gbs"], r["limit_path"] = _copy_limit_gbs(nbytes, path, devices), LIMIT_PATHS[path]
                    r["share_of_limit"] = r["warm_handoff_gbs"] / r["limit_gbs"]
                    r["last_block_to_first_token_vs_colocated_ttft"] = (r["cold_last_block_to_first_token_s"]
                                                                        / r["colocated_ttft_s"])
                    progress(f"  {n} tokens: {nbytes / 1e6:.1f} MB handed over ({r['carrier']}); warm "
                             f"{r['warm_handoff_gbs']:.3f} GB/s ({100 * r['share_of_limit']:.1f}% of "
                             f"{r['limit_gbs']:.1f} GB/s, {r['limit_path']}): set-up {1e3 * r['warm_setup_s']:.2f} ms, "
                             f"transfer {1e3 * r['warm_transfer_s']:.2f} ms ({r['warm_transfer_gbs']:.1f} GB/s), "
                             f"{r['new_staging_buffers']} new staging buffers; "
                             f"last block -> first token "
                             f"{1e3 * r['cold_last_block_to_first_token_s']:.1f} ms vs colocated TTFT "
                             f"{1e3 * r['colocated_ttft_s']:.1f} ms (first run {1e3 * r['colocated_first_ttft_s']:.1f} ms)")
    return {"bench": "pd-handoff", "model": str(model or "default"),
            "machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "load_average_1m": os.getloadavg()[0],
                        "device": torch.cuda.get_device_name() if cuda else "cpu"},
            "rows": [rows[n] for n in prompt_lens]}


def format_handoff_table(result: dict) -> str:
    head = (f"{'tokens':>6} | {'carrier':>11} | {'MB':>7} | {'warm GB/s':>9} | {'limit GB/s':>10} | {'share':>6} | "
            f"{'set-up ms':>9} | {'transfer ms':>11} | {'transfer GB/s':>13} | {'new bufs':>8} | {'cold hand-off s':>15} | "
            f"{'last block->1st tok ms':>22} | {'colocated TTFT ms':>17} | {'(first run) ms':>14}")
    limits = sorted({r["limit_path"] for r in result["rows"]})
    lines = [f"KV hand-off, {result['model']} on {result['machine']['device']}; limit: {', '.join(limits)} of the "
             "same bytes, same run", head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['prompt_len']:>6} | {r['carrier']:>11} | {r['handoff_bytes'] / 1e6:>7.1f} | {r['warm_handoff_gbs']:>9.3f} | "
                     f"{r['limit_gbs']:>10.1f} | {100 * r['share_of_limit']:>5.1f}% | {1e3 * r['warm_setup_s']:>9.2f} | "
                     f"{1e3 * r['warm_transfer_s']:>11.2f} | {r['warm_transfer_gbs']:>13.1f} | "
                     f"{r['new_staging_buffers']:>8} | {r['cold_handoff_s']:>15.3f} | "
                     f"{1e3 * r['cold_last_block_to_first_token_s']:>22.1f} | {1e3 * r['colocated_ttft_s']:>17.1f} | "
                     f"{1e3 * r['colocated_first_ttft_s']:>14.1f}")
    return "\n".join(lines)


def _row_copy_s(fn, device: torch.device, reps: int) -> float:
    """Seconds per call of fn (one warm-up call; CUDA: between events, the calls back to back)."""
    fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def run_rows_bench(counts: tuple[int, ...] = (64, 256, 500), row_nbytes: int = 1536 * 2**10, reps: int = 10,
                   progress=print) -> dict:
    """On the CPU with one torch thread (as a node process runs in `afkv bench pd`: on a shared
    machine a second thread's barrier waits on a busy core)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    kernels = [k for k in INDEXED_KERNELS if k == "torch" or device.type == "cuda"]
    g = torch.Generator().manual_seed(2)
    rows = []
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for n in counts:
            rows += _rows_point(n, row_nbytes, reps, kernels, device, g, progress)
    finally:
        torch.set_num_threads(threads)
    return {"bench": "pd-rows", "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                            "load_average_1m": os.getloadavg()[0],
                                            "torch_threads": threads if device.type == "cuda" else 1},
            "reps": reps, "rows": rows}


def _rows_point(n: int, row_nbytes: int, reps: int, kernels: list[str], device: torch.device, g: torch.Generator,
                progress) -> list[dict]:
    rows = []
    pool = torch.randint(0, 256, (2 * n + 8, row_nbytes), dtype=torch.uint8, device=device)  # [blocks, nbytes]
    slots = torch.empty((n, row_nbytes), dtype=torch.uint8, device=device)  # [n, nbytes]
    blocks = torch.randperm(pool.shape[0], generator=g)[:n].tolist()  # scattered: n runs
    run = list(range(n))
    limit_s = _row_copy_s(lambda: slots.copy_(pool[:n]), device, reps)
    for kernel in kernels:
        export_s = _row_copy_s(functools.partial(move_rows, slots, run, pool, blocks, indexed=kernel), device, reps)
        ok = torch.equal(slots, pool[torch.tensor(blocks, device=device)])
        target = pool.clone()  # [blocks, nbytes]
        import_s = _row_copy_s(functools.partial(move_rows, target, blocks, slots, run, indexed=kernel), device,
                               reps)
        ok = ok and torch.equal(target[torch.tensor(blocks, device=device)], slots)
        nbytes = n * row_nbytes
        r = {"blocks": n, "row_nbytes": row_nbytes, "mb": nbytes / 1e6, "kernel": kernel, "correct": ok,
             "limit_gbs": nbytes / limit_s / 1e9, "export_gbs": nbytes / export_s / 1e9,
             "import_gbs": nbytes / import_s / 1e9, "export_ms": 1e3 * export_s, "import_ms": 1e3 * import_s}
        r["export_share"], r["import_share"] = r["export_gbs"] / r["limit_gbs"], r["import_gbs"] / r["limit_gbs"]
        rows.append(r)
        progress(f"  {n} blocks of {row_nbytes / 2**20:.2f} MiB, {kernel}: export {r['export_gbs']:.1f} GB/s "
                 f"({100 * r['export_share']:.0f}%), import {r['import_gbs']:.1f} GB/s "
                 f"({100 * r['import_share']:.0f}%) of one copy's {r['limit_gbs']:.1f} GB/s; "
                 f"{'correct' if ok else 'WRONG'}")
    return rows


def format_rows_table(result: dict) -> str:
    head = (f"{'blocks':>6} | {'MB':>7} | {'kernel':>6} | {'export GB/s':>11} | {'share':>6} | {'import GB/s':>11} | "
            f"{'share':>6} | {'one copy GB/s':>13} | correct")
    lines = [f"Hand-off row copies (scattered blocks <-> a run of slots) on {result['machine']['device']}; limit: one "
             "slice copy of the same bytes, same run", head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['blocks']:>6} | {r['mb']:>7.1f} | {r['kernel']:>6} | {r['export_gbs']:>11.1f} | "
                     f"{100 * r['export_share']:>5.1f}% | {r['import_gbs']:>11.1f} | {100 * r['import_share']:>5.1f}% | "
                     f"{r['limit_gbs']:>13.1f} | {'yes' if r['correct'] else 'NO'}")
    return "\n".join(lines)
