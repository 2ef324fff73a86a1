"""afkv vs transformers' `generate` on the same model, prompts and batch sizes.

For each batch size B: B distinct random prompts of `prompt_len` tokens (no shared
prefix, so the prefix cache cannot help), `gen_len` new tokens each, EOS ignored.
TTFT: time to the first token of the batch (transformers: generate with one new token).
Decode tokens/s: tokens after the first / time after the first token. With --repeats the two
alternate and the medians are reported; --busy-processes runs spinning processes meanwhile
(a machine shared with another job).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from statistics import median

import torch

from afkv.config import EngineConfig
from afkv.engine.engine import Engine, resolve_device, resolve_dtype
from afkv.engine.params import SamplingParams
from afkv.errors import DeviceError


@dataclass
class Row:
    batch: int
    afkv_ttft_s: float
    hf_ttft_s: float
    afkv_decode_tok_s: float
    hf_decode_tok_s: float

    @property
    def decode_ratio(self) -> float:
        return self.afkv_decode_tok_s / self.hf_decode_tok_s

    @property
    def ttft_ratio(self) -> float:
        return self.hf_ttft_s / self.afkv_ttft_s


def _prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, prompt_len), generator=g).tolist()


async def _afkv_run(engine: Engine, prompts: list[list[int]], gen_len: int) -> tuple[float, float]:
    params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
    start = time.monotonic()
    results = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
    first = max(r.metrics.first_token_s for r in results)
    last = max(r.metrics.finished_s for r in results)
    ttft = first - start
    decode = len(prompts) * (gen_len - 1) / max(last - first, 1e-9)
    return ttft, decode


def _hf_run(model, prompts: list[list[int]], gen_len: int) -> tuple[float, float]:
    from transformers import GenerationConfig

    ids = torch.tensor(prompts, device=model.device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        if ids.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    t1 = gen(1)
    tn = gen(gen_len)
    return t1, len(prompts) * (gen_len - 1) / max(tn - t1, 1e-9)


async def run_decode_bench(
    model: str | None,
    config: EngineConfig | None,
    batch_sizes: list[int],
    prompt_len: int,
    gen_len: int,
    with_hf: bool = True,
    progress=print,
    threads: int = 0,
    busy_processes: int = 0,
    repeats: int = 1,
) -> dict:
    """threads: torch's intra-op threads for both (0: transformers as torch has them, afkv its
    [model] cpu_threads); busy_processes: that many
    spinning processes run meanwhile (a machine shared with another job); repeats: runs of
    each, alternated, the median counts."""
    if with_hf:  # before loading anything
        try:
            import transformers  # noqa: F401
        except ImportError as exc:
            raise DeviceError("afkv bench decode compares with transformers, which is not installed: "
                              "pip install 'transformers>=4.57' (or the test extra: pip install -e '.[test]'), "
                              "or pass --no-hf to time afkv alone") from exc
    cfg = config or EngineConfig()
    if threads:
        torch.set_num_threads(threads)  # transformers (this thread) and afkv's model thread alike
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cpu_threads=threads))
    with _busy(busy_processes):
        rows = await _run(model, cfg, batch_sizes, prompt_len, gen_len, with_hf, repeats, progress)
    return {
        "bench": "decode",
        "model": str(model or "default"),
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "busy_processes": busy_processes,
        "repeats": repeats,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "rows": [asdict(r) | {"decode_ratio": r.decode_ratio, "ttft_ratio": r.ttft_ratio} for r in rows],
    }


@contextlib.contextmanager
def _busy(n: int):
    """n processes that spin on a core each (another user's job) while the benchmark runs."""
    spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(10**5): pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]  # they end with this process
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


async def _run(model, cfg: EngineConfig, batch_sizes: list[int], prompt_len: int, gen_len: int, with_hf: bool,
               repeats: int, progress) -> list[Row]:
    rows: list[Row] = []
    async with Engine(model, cfg) as engine:
        progress(f"model: {engine.model_dir} ({engine.spec.family.value}, {engine.spec.num_layers} layers)")
        hf = None
        if with_hf:
            import transformers

            device = resolve_device(cfg.model.device)
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                engine.model_dir, dtype=resolve_dtype(cfg.model.dtype, device)
            ).to(device).eval()
        await _afkv_run(engine, _prompts(1, prompt_len, engine.spec.vocab_size, 999), 4)  # warm-up
        for b in batch_sizes:
            runs = []  # afkv and transformers alternate: both see the same machine
            for r in range(repeats):
                prompts = _prompts(b, prompt_len, engine.spec.vocab_size, seed=b + 1000 * r)
                a_ttft, a_dec = await _afkv_run(engine, prompts, gen_len)
                h_ttft, h_dec = (await asyncio.to_thread(_hf_run, hf, prompts, gen_len)) if hf is not None \
                    else (float("nan"),) * 2
                runs.append((a_ttft, h_ttft, a_dec, h_dec))
            rows.append(Row(b, *(median(x) for x in zip(*runs))))
            progress(f"  batch {b}: afkv {a_dec:.1f} tok/s, transformers {h_dec:.1f} tok/s")
    return rows


def format_table(result: dict) -> str:
    head = f"{'batch':>5} | {'afkv tok/s':>10} | {'HF tok/s':>9} | {'ratio':>6} | {'afkv TTFT ms':>12} | {'HF TTFT ms':>10} | {'HF/afkv':>7}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['batch']:>5} | {r['afkv_decode_tok_s']:>10.1f} | {r['hf_decode_tok_s']:>9.1f} | {r['decode_ratio']:>6.2f} | "
            f"{r['afkv_ttft_s'] * 1e3:>12.1f} | {r['hf_ttft_s'] * 1e3:>10.1f} | {r['ttft_ratio']:>7.2f}"
        )
    return "\n".join(lines)

