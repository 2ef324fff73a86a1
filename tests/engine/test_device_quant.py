"""The engine with a quantized device tier ([kv] device_format fp8 / int8 / int4): greedy tokens
and logprobs against the unquantized run on the tiny models, prefix reuse, preemption and
cancellation without leaks, demotion to host memory and disk and promotion back with every
format, and (GPU) CUDA-graph replay against eager steps. The real-model accuracy (perplexity,
greedy agreement on SmolLM2) is in tests/kv/test_kv_quant_perplexity.py.

Bounds, on the logprob error: per step, the largest |logprob difference| over the tokens in both
top-5 sets, at every step whose context still equals the reference's. Measured on the tiny random
models (block 4, fp_window 0, 16 new tokens; the test prints the figures), 95th percentile / max
over the four families: fp8 0.15 / 0.20 (3 bits of mantissa: relative errors, where int8's 255
levels span each rotated vector), int8 0.009 / 0.012, int4 0.27 / 0.32. The larger maxima are
single steps where a router's top-k flips (an MoE family's discontinuity, not the KV error growing).
"""

import asyncio
import math

import pytest
import torch

from afkv.config import EngineConfig
from afkv.engine.engine import Engine
from afkv.engine.params import SamplingParams
from afkv.kv.device import DeviceQuant, staging_blocks_needed
from afkv.kv.formats import make_format
from afkv.kv.layout import KVLayout
from afkv.kv.manager import KVManager
from afkv.model.model import load_colocated
from afkv.model.sides import DecodeRows, SeqChunk, StepInputs

PROMPTS = [[1, 5, 9, 33, 17], [2, 5, 9, 33, 17, 2, 8], [7, 100, 3, 44, 12, 60, 61, 62, 63, 9, 8]]
FORMATS = ["fp8", "int8", "int4"]
BOUNDS = {"fp8": (0.2, 0.3), "int8": (0.01, 0.25), "int4": (0.3, 0.6)}  # (95th percentile, max) of the logprob error


def _config(fmt: str, **kv) -> EngineConfig:
    return EngineConfig.from_dict({"kv": {"block_size": 4, "device_format": fmt, **kv},
                                   "scheduler": {"max_num_seqs": 4, "max_num_batched_tokens": 8}})


async def _generate(model_dir, cfg: EngineConfig, prompts, max_tokens=16):
    async with Engine(model_dir, cfg, progress=False) as engine:
        params = SamplingParams(max_tokens=max_tokens, logprobs=5, ignore_eos=True)
        out = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
        kv = engine.kv_manager
        kv.check_invariants()
        assert kv.pool.num_free_blocks == kv.pool.num_blocks  # everything released (cached blocks are free)
        if kv.quant is not None:
            assert kv.num_free_staging_blocks == kv.quant.num_staging_blocks
            assert kv.metrics.counters["quantized_blocks"] > 0
        return out


def _logprob_errors(ref, got) -> list[float]:
    """Per step of every generation, while its context equals the reference's: the largest
    |logprob difference| over the tokens in both top-5 sets."""
    errors = []
    for r, g in zip(ref, got):
        for i, (rt, gt) in enumerate(zip(r.top_logprobs, g.top_logprobs)):
            if r.token_ids[:i] != g.token_ids[:i]:
                break  # different contexts from here on
            errors.append(max(abs(rt[tok] - gt[tok]) for tok in rt.keys() & gt.keys()))
    return errors


def _p95(errors: list[float]) -> float:
    return sorted(errors)[math.ceil(0.95 * len(errors)) - 1]


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_quantized_device_blocks_against_the_unquantized_run(tiny_dir, family):
    ref = asyncio.run(_generate(tiny_dir[family], _config("auto"), PROMPTS))
    for fmt in FORMATS:
        got = asyncio.run(_generate(tiny_dir[family], _config(fmt), PROMPTS))
        errors = _logprob_errors(ref, got)
        same = sum(r.token_ids == g.token_ids for r, g in zip(ref, got))
        print(f"{family} {fmt}: |logprob error| p95 {_p95(errors):.4f}, max {max(errors):.4f} over {len(errors)} "
              f"steps; {same}/{len(PROMPTS)} generations identical")
        assert len(errors) >= 16 and max(errors) > 0  # compared, and the rows were read
        assert _p95(errors) <= BOUNDS[fmt][0] and max(errors) <= BOUNDS[fmt][1]
        if fmt == "int8":
            assert same == len(PROMPTS)


def test_a_full_precision_window_brings_logprobs_closer(tiny_dir):
    ref = asyncio.run(_generate(tiny_dir["llama"], _config("auto"), PROMPTS))
    none = max(_logprob_errors(ref, asyncio.run(_generate(tiny_dir["llama"], _config("int4"), PROMPTS))))
    windowed = max(_logprob_errors(ref, asyncio.run(_generate(tiny_dir["llama"], _config("int4", fp_window=64),
                                                              PROMPTS))))
    assert windowed < 1e-4 < none  # the window covers every token of these generations: nothing quantized is read


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefix_reuse_reads_quantized_rows(tiny_dir, fmt):
    prompt = list(range(3, 30))

    async def run():
        async with Engine(tiny_dir["llama"], _config(fmt), progress=False) as engine:
            params = SamplingParams(max_tokens=6, logprobs=5, ignore_eos=True)
            first = await engine.complete(prompt, params)
            second = await engine.complete(prompt, params)
            engine.kv_manager.check_invariants()
            return first, second

    first, second = asyncio.run(run())
    assert first.metrics.num_cached_tokens == 0 and second.metrics.num_cached_tokens == 24
    assert max(_logprob_errors([first], [second])) <= BOUNDS[fmt][0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_preemption_and_cancellation_leak_nothing(tiny_dir, fmt):
    cfg = EngineConfig.from_dict({"kv": {"block_size": 4, "num_blocks": 14, "device_format": fmt, "fp_window": 4},
                                  "scheduler": {"max_num_seqs": 4, "max_num_batched_tokens": 16}})

    async def run():
        async with Engine(tiny_dir["llama"], cfg, progress=False) as engine:
            params = SamplingParams(max_tokens=20, ignore_eos=True)

            async def cancelled():
                async for _ in engine.generate(list(range(40, 50)), params):
                    break  # closes the stream: the request is aborted

            done = await asyncio.gather(*(engine.complete(list(range(10 * i + 1, 10 * i + 9)), params)
                                          for i in range(3)), cancelled())
            await asyncio.sleep(0.05)  # the abort is applied at the next scheduling pass
            kv = engine.kv_manager
            kv.check_invariants()
            return done, engine.stats(), kv.num_free_staging_blocks, kv.quant.num_staging_blocks

    done, stats, free_staging, staging = asyncio.run(run())
    assert [len(c.token_ids) for c in done[:3]] == [20, 20, 20]
    assert stats.num_preemptions > 0
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_blocks
    assert free_staging == staging


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spill", ["same", "none"])
def test_demotion_to_host_and_disk_and_promotion(tiny_dir, tmp_path, fmt, spill):
    """A device tier of 12 blocks under prompts that need more: cached rows are demoted to host
    memory and disk (as their bytes when the spill format is the device format; dequantized to
    the model dtype when it is "none"), then promoted back (as the same rows, or quantized
    again) for a repeated prompt, which reuses them."""
    spill_format = fmt if spill == "same" else "none"
    cfg = EngineConfig.from_dict({
        "kv": {"block_size": 4, "num_blocks": 12, "device_format": fmt, "host_num_blocks": 6,
               "disk_path": str(tmp_path / "spill"), "disk_num_blocks": 64, "spill_format": spill_format,
               "io_threads": 2},
        "scheduler": {"max_num_seqs": 2, "max_num_batched_tokens": 16},
    })
    first_prompt = list(range(5, 30))  # 6 full blocks

    async def run():
        async with Engine(tiny_dir["llama"], cfg, progress=False) as engine:
            params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=5)
            first = await engine.complete(first_prompt, params)
            for i in range(4):  # evict the first prompt's blocks from the device, then from host memory
                await engine.complete([100 + 20 * i + t for t in range(25)], params)
            kv = engine.kv_manager
            # let the tier copies and disk writes of those passes land (on a loaded machine a
            # write still in flight hides its block: the repeated prompt would recompute it)
            for _ in range(100):  # each round finishes at least one copy batch or file job
                if not (futures := kv.lower.in_flight()):
                    break
                await asyncio.wait([asyncio.wrap_future(f) for f in futures], timeout=30)
                kv.poll()
            assert not kv.lower.in_flight()
            again = await engine.complete(first_prompt, params)
            kv.check_invariants()
            return first, again, engine.kv_metrics(), kv.num_free_staging_blocks, kv.quant.num_staging_blocks

    first, again, m, free_staging, staging = asyncio.run(run())
    assert again.metrics.num_cached_tokens >= 12  # (a device tier in the model dtype reuses 12 here too)
    assert m.counters["demotions"] > 0 and m.hit_blocks["host"] + m.hit_blocks["disk"] > 0
    assert m.counters["promotions"] > 0 and m.counters["quantized_blocks"] > 0
    assert m.tiers[0].format == fmt and m.tiers[1].format == spill_format
    row_nbytes = m.tiers[0].block_nbytes
    if spill == "same":  # rows move as their bytes
        assert m.tiers[1].block_nbytes == row_nbytes
        assert m.counters["bytes_device_to_host"] == m.counters["demotions"] * row_nbytes
    else:
        assert m.tiers[1].block_nbytes > row_nbytes
    # the repeated prompt computes its uncached tokens in other chunks than the first time, so
    # they read other blocks quantized: close, not equal
    assert max(_logprob_errors([first], [again])) < BOUNDS[fmt][1]
    assert free_staging == staging


@pytest.mark.parametrize("fmt", FORMATS)
def test_padding_rows_of_a_captured_step_touch_only_the_scratch_block(tiny_dir, fmt):
    """The inputs DecodeGraphs gives a captured step's padding rows on a quantized tier (token 0
    at position 0, written to the scratch staging block, attending over it alone), run eagerly
    here: the real rows' logits equal those of the step without padding, and no row or staging
    block but the scratch block changes."""
    model = load_colocated(tiny_dir["llama"], torch.device("cpu"), torch.float32)
    spec = model.spec
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 4, torch.float32)
    quant_cfg = DeviceQuant(make_format(fmt, layout), 0, staging_blocks_needed(4, 0, 2, 32))
    kv = KVManager(layout, 32, torch.device("cpu"), quant=quant_cfg)
    scratch = kv.reserve_scratch_block()
    cache = kv.attention_cache
    prompts = {0: list(range(3, 12)), 1: list(range(40, 54))}  # 9 and 14 tokens: rows and staging blocks
    with torch.inference_mode():
        for seq_id, toks in prompts.items():
            kv.match_prefix(seq_id, toks)
            assert kv.allocate(seq_id, len(toks) + 1)
            table = kv.block_table(seq_id)
            pos = torch.arange(len(toks))
            inputs = StepInputs(torch.tensor(toks), pos, torch.tensor([table[p // 4] for p in pos]), pos % 4,
                                [SeqChunk(0, len(toks), len(toks), torch.tensor(table[: -(-len(toks) // 4)]))])
            model.forward(inputs, cache)
            kv.commit(seq_id, toks, len(toks))
            kv.flush()

        def step(pad: int) -> torch.Tensor:
            tables = [kv.block_table(s) for s in prompts] + [[scratch]] * pad
            width = max(map(len, tables))
            table = torch.tensor([t + [scratch] * (width - len(t)) for t in tables])
            n = [len(prompts[s]) for s in prompts] + [0] * pad  # position of each row's token
            ids = torch.tensor([7, 8] + [0] * pad)
            pos = torch.tensor(n)
            slots = torch.tensor([t[p // 4] for t, p in zip(tables, n)])
            lens = pos + 1
            chunks = [SeqChunk(i, 1, int(lens[i]), table[i]) for i in range(len(n))]
            decode = DecodeRows(torch.arange(len(n)), table, lens, every_row=True)
            return model.attn.logits(model.forward(StepInputs(ids, pos, slots, pos % 4, chunks, decode), cache))

        before = (cache.blocks.clone(), cache.staging.clone())
        padded = step(pad=2)
        changed_staging = (cache.staging != before[1]).flatten(1).any(1).nonzero()[:, 0].tolist()
        assert torch.equal(cache.blocks, before[0])
        own = [kv.block_table(s)[-1] - kv.pool.num_blocks for s in prompts]  # the real rows' last (staging) blocks
        assert set(changed_staging) <= set(own) | {scratch - kv.pool.num_blocks}
        assert scratch - kv.pool.num_blocks in changed_staging
        torch.testing.assert_close(padded[:2], step(pad=0), rtol=1e-5, atol=1e-5)
    kv.check_invariants()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graph_replay_equals_eager_steps(tiny_dir, fmt, dtype):
    """CUDA graphs on a quantized device tier: decode steps replayed as graphs give the eager
    steps' tokens and logprobs (same kernels, same shapes: only padding rows differ)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    def config(graphs: bool) -> EngineConfig:
        return EngineConfig.from_dict({"model": {"dtype": dtype, "device": "cuda:0", "cuda_graphs": graphs},
                                       "kv": {"block_size": 16, "num_blocks": 256, "device_format": fmt},
                                       "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 64}})

    prompts = [[(7 * i + 3 * t) % 200 + 1 for t in range(20 + 9 * i)] for i in range(6)]

    async def run(graphs: bool):
        async with Engine(tiny_dir["llama"], config(graphs), progress=False) as e:
            params = SamplingParams(max_tokens=40, logprobs=5, ignore_eos=True)
            out = await asyncio.gather(*(e.complete(p, params) for p in prompts))
            e.kv_manager.check_invariants()
            return out, e._runner.graph_steps

    eager, n0 = asyncio.run(run(False))
    graphed, n1 = asyncio.run(run(True))
    assert n0 == 0 and n1 > 0
    assert [g.token_ids for g in graphed] == [e.token_ids for e in eager]
    assert max(_logprob_errors(eager, graphed)) < 0.02
