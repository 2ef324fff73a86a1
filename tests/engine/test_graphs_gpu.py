"""Decode steps replayed as CUDA graphs give the tokens of eager steps, also with KV tier copies
and pruning in the same steps, and the GPU engine gives transformers' greedy tokens (GPU machine).

Tolerances. float32: tokens equal, except at a near-tie of transformers' float32 logits
(top-2 gap <= FP32_TIE). bfloat16: two bfloat16 computations of the same step (graph and
eager, fused and plain kernels) are compared with the cost of bfloat16 itself on this model and
input, measured in the test against the same step in float32: e = max |eager bf16 - float32|.
A path as accurate as the eager one is within e of float32, so within 2e of eager; argmax must
agree on every row whose float32 top-2 gap exceeds 4e (closer rows are ties at this dtype).
"""

import asyncio

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.engine.params import KVPruning
from afkv.kv.tiers.copier import Copier
from afkv.model.graphs import DecodeGraphs
from afkv.model.model import load_colocated, load_ffn_side
from afkv.model.sides import SeqChunk, StepInputs
from tests.helpers import hf_greedy, hf_model, random_prompt

pytestmark = pytest.mark.gpu

# float32 logits of afkv and transformers agree to ~1e-5 on the CPU (tests/model); GPU kernels
# sum in other orders: a token may differ only where transformers' top-2 gap is below 100x that.
FP32_TIE = 1e-3
# bfloat16 logits of these tiny models stay below 4 in magnitude, where one bfloat16 ulp is 2^-6;
# two bfloat16 runs of the same step measured ~2 ulps apart (0.03): a flip is a tie within 8 ulps.
BF16_TIE = 8 * 2.0**-6


def _assert_close_to_eager(got: torch.Tensor, want: torch.Tensor, ref32: torch.Tensor, what: str) -> float:
    """got, want: two bfloat16 computations of the same values; ref32: float32. -> e."""
    e = float((want.float() - ref32).abs().max())
    diff = float((got.float() - want.float()).abs().max())
    assert diff <= 2 * e, f"{what}: max |got - eager| = {diff:.4g} > 2 x {e:.4g} (eager bf16 against float32)"
    return e


def _assert_logits_close_to_eager(got: torch.Tensor, want: torch.Tensor, ref32: torch.Tensor, what: str) -> None:
    """Logits [R, V]: within 2e of eager, and the same argmax wherever float32's top-2 gap > 4e.
    A tiny random MoE may have no such row (bfloat16 flips a routing choice, which makes e large
    against its near-uniform logits): then the bound on every logit is the check."""
    e = _assert_close_to_eager(got, want, ref32, what)
    top2 = ref32.topk(2, -1).values  # [R, 2]
    decided = (top2[:, 0] - top2[:, 1]) > 4 * e  # [R]
    assert torch.equal(got.argmax(-1)[decided], ref32.argmax(-1)[decided]), what
    assert torch.equal(want.argmax(-1)[decided], ref32.argmax(-1)[decided]), what


def _assert_agree_until_a_tie(got, want, tie: float) -> None:
    """Two runs' completions (logprobs=2): tokens equal until the first difference of each
    request, where each run must have ranked the other's token second within `tie`."""
    for g, w in zip(got, want):
        for i, (a, b) in enumerate(zip(g.token_ids, w.token_ids)):
            if a != b:
                assert b in g.top_logprobs[i] and g.top_logprobs[i][a] - g.top_logprobs[i][b] <= tie, (i, a, b)
                assert a in w.top_logprobs[i] and w.top_logprobs[i][b] - w.top_logprobs[i][a] <= tie, (i, a, b)
                break


def _config(graphs: bool, dtype: str) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": {"dtype": dtype, "device": "cuda:0", "cuda_graphs": graphs},
        "kv": {"block_size": 4, "num_blocks": 512},
        "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 64},
    })


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen3_moe", "bfloat16"), ("mixtral", "bfloat16")])
def test_graph_decode_tokens_equal_eager(tiny_dir, family, dtype):
    """float32 (a dense model: grouped GEMM is bf16-only): identical tokens. bf16 MoE: the padded
    batch changes GEMM shapes and the decode kernel's split count, so a request may take the
    other token of a bfloat16 tie (BF16_TIE), and only there."""
    pytest.importorskip("triton")
    model = str(tiny_dir[family])
    # 13 sequences: buckets pad them to 16, and finished ones shrink the batch through smaller buckets
    prompts = [random_prompt(3 + 4 * i, 256, seed=i) for i in range(13)]
    params = [SamplingParams(max_tokens=8 + 2 * i, ignore_eos=True, logprobs=2) for i in range(13)]

    async def run(graphs: bool):
        async with Engine(model, _config(graphs, dtype), progress=False) as e:
            out = await asyncio.gather(*(e.complete(p, s) for p, s in zip(prompts, params)))
            return out, e._runner.graph_steps

    eager, n0 = asyncio.run(run(False))
    graphed, n1 = asyncio.run(run(True))
    assert n0 == 0 and n1 > 0
    if dtype == "float32":
        assert [r.token_ids for r in graphed] == [r.token_ids for r in eager]
        return
    _assert_agree_until_a_tie(graphed, eager, BF16_TIE)


def test_padding_rows_do_not_change_logits(tiny_dir):
    """A batch of 5 replayed in the bucket of 8 gives the eager logits and K/V of those 5 rows
    (within 2x what bfloat16 costs against the same step in float32), and the padding rows
    write only the scratch block."""
    pytest.importorskip("triton")
    dev = torch.device("cuda:0")
    model = load_colocated(tiny_dir["qwen3_moe"], dev, torch.bfloat16)
    model32 = load_colocated(tiny_dir["qwen3_moe"], dev, torch.float32)
    spec = model.spec
    bs, nb = 4, 8
    kv = torch.randn(64, spec.num_layers, 2, bs, spec.num_kv_heads, spec.head_dim, device=dev).to(torch.bfloat16)
    scratch = 63
    graphs = DecodeGraphs(model, kv, max_batch=8, max_blocks=nb, scratch_block=scratch)
    ctx = [5, 9, 13, 2, 17]
    tables = [tuple(range(i * nb, i * nb + -(-c // bs))) for i, c in enumerate(ctx)]
    ids = [11, 22, 33, 44, 55]
    pos = [c - 1 for c in ctx]
    slot_b = [t[p // bs] for t, p in zip(tables, pos)]
    slot_o = [p % bs for p in pos]
    before = kv.clone()
    kv32 = before.float()
    with torch.inference_mode():
        got = graphs.run(ids, pos, slot_b, slot_o, ctx, tables, 1).clone()
        after_graph = kv.clone()
        kv.copy_(before)
        t = lambda x: torch.tensor(x, device=dev)
        chunks = [SeqChunk(i, 1, c, t(list(tb))) for i, (c, tb) in enumerate(zip(ctx, tables))]
        inputs = StepInputs(t(ids), t(pos), t(slot_b), t(slot_o), chunks)
        want = model.attn.logits(model.forward(inputs, kv, 1))
        inputs32 = StepInputs(t(ids), t(pos), t(slot_b), t(slot_o), chunks)  # inputs cache rope in their dtype
        ref32 = model32.attn.logits(model32.forward(inputs32, kv32, 1))  # the same step in float32
    changed = (after_graph != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert set(changed) <= set(slot_b) | {scratch}
    _assert_close_to_eager(after_graph[slot_b], kv[slot_b], kv32[slot_b], "K/V written")  # GEMMs of 8 vs 5 rows
    _assert_logits_close_to_eager(got, want, ref32, "logits")


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_layer_kernels_match_torch_ops(tiny_dir, family):
    """The fused Triton kernels of a layer (norms, q/k norm + rotary + K/V write, routing,
    SiLU-and-multiply) give the logits and K/V of the torch compositions (bf16), within 2x what
    bfloat16 costs against the torch compositions in float32."""
    pytest.importorskip("triton")
    dev = torch.device("cuda:0")
    fused = load_colocated(tiny_dir[family], dev, torch.bfloat16)
    plain = load_colocated(tiny_dir[family], dev, torch.bfloat16)
    plain32 = load_colocated(tiny_dir[family], dev, torch.float32)
    assert fused.attn._tf is not None
    for m in (plain, plain32):
        m.attn._tf = None
        m.ffn.ffn._tf = None
    spec = fused.spec
    kv = [torch.zeros(16, spec.num_layers, 2, 4, spec.num_kv_heads, spec.head_dim, dtype=dt, device=dev)
          for dt in (torch.bfloat16, torch.bfloat16, torch.float32)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (11,), generator=g).to(dev)
    pos = torch.arange(11, device=dev)
    table = torch.arange(3, device=dev)
    with torch.inference_mode():
        out = []
        for model, cache in zip((fused, plain, plain32), kv):
            inputs = StepInputs(ids, pos, table[pos // 4], pos % 4, [SeqChunk(0, 11, 11, table)])
            out.append(model.attn.logits(model.forward(inputs, cache, 1)))
    _assert_logits_close_to_eager(out[0], out[1], out[2], "logits")
    _assert_close_to_eager(kv[0][:3], kv[1][:3], kv[2][:3], "K/V written")


def test_triton_moe_matches_grouped_gemm_path(tiny_dir):
    """The FFN side's Triton fused-MoE path gives the torch grouped-GEMM path's output (bf16),
    within 2x what bfloat16 costs against the experts in float32."""
    pytest.importorskip("triton")
    from afkv.model.spec import load_spec

    dev = torch.device("cuda:0")
    spec = load_spec(tiny_dir["qwen3_moe"])
    ffn = load_ffn_side(spec, tiny_dir["qwen3_moe"], dev, torch.bfloat16)
    ffn32 = load_ffn_side(spec, tiny_dir["qwen3_moe"], dev, torch.float32)
    ffn32._moe = None  # float32 reference: torch's per-expert GEMMs
    assert ffn._moe is not None
    layer = next(i for i in range(spec.num_layers) if ffn.stacked[i] is not None)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(37, spec.hidden_size, generator=g, device=dev).to(torch.bfloat16)
    logits = torch.randn(37, spec.num_experts, generator=g, device=dev)
    w, ids = torch.softmax(logits, -1).topk(spec.top_k, -1)
    fast = ffn.forward(layer, x, ids, w)
    moe, ffn._moe = ffn._moe, None
    ref = ffn.forward(layer, x, ids, w)
    ffn._moe = moe
    ref32 = ffn32.forward(layer, x.float(), ids, w)
    _assert_close_to_eager(fast, ref, ref32, "experts")


# ---- graphs with KV tier copies and pruning in the same steps ---------------------------------
def _llama_config(graphs: bool, kv: dict) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": {"dtype": "float32", "device": "cuda:0", "cuda_graphs": graphs},
        "kv": {"block_size": 4, **kv},
        "scheduler": {"max_num_seqs": 4, "max_num_batched_tokens": 32},
    })


def test_graph_steps_with_tier_copies_in_flight(tiny_dir, tmp_path, monkeypatch):
    """A 16-block device tier under a workload ~10x its size: blocks are demoted to host memory
    and disk and promoted back between replayed decode steps (copy batches on their own stream,
    ordered by events). Tokens equal the eager run's and the all-in-memory run's."""
    pytest.importorskip("triton")
    prompts = [random_prompt(24, 256, seed=100) + random_prompt(6 + i, 256, seed=i) for i in range(10)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    events: list[str] = []  # on the model worker: "copy" per copy batch, "graph" per replayed step
    run_copies = Copier.run

    def copies(self, ops):
        events.append("copy")
        return run_copies(self, ops)

    monkeypatch.setattr(Copier, "run", copies)

    async def run(graphs: bool, kv: dict):
        async with Engine(str(tiny_dir["llama"]), _llama_config(graphs, kv), progress=False) as e:
            replay = e._runner._graph_logits

            def graph_logits(plan):
                logits = replay(plan)
                if logits is not None:
                    events.append("graph")
                return logits

            e._runner._graph_logits = graph_logits
            out = [[r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
                   for _ in range(2)]
            await e.kv_manager.aclose()
            return out, e.kv_metrics(), e._runner.graph_steps

    tiers = {"num_blocks": 16, "host_num_blocks": 12, "disk_path": str(tmp_path / "spill"), "disk_num_blocks": 400}
    memory, _, _ = asyncio.run(run(False, {"num_blocks": 1024}))
    eager, _, _ = asyncio.run(run(False, tiers | {"disk_path": str(tmp_path / "spill-eager")}))
    events.clear()
    graphed, m, graph_steps = asyncio.run(run(True, tiers))
    assert graphed == eager == memory
    assert graph_steps > 0 and m.counters["demotions"] > 0 and m.counters["promotions"] > 0
    assert any(a == "copy" and b == "graph" for a, b in zip(events, events[1:])), "no replay right after a copy batch"


def test_graph_steps_with_pruned_requests(tiny_dir):
    """StreamingLLM pruning on some requests of the batch (table edits between steps): steps
    with a pruned request run eagerly, the others replay; tokens equal the eager run's."""
    pytest.importorskip("triton")
    prompts = [random_prompt(10 + 3 * i, 256, seed=200 + i) for i in range(6)]
    streaming = KVPruning("streaming", num_sink_tokens=4, window=12)
    params = [SamplingParams(max_tokens=48, ignore_eos=True, pruning=streaming if i % 2 else None) for i in range(6)]

    async def run(graphs: bool):
        async with Engine(str(tiny_dir["llama"]), _llama_config(graphs, {"num_blocks": 256}), progress=False) as e:
            out = [r.token_ids for r in await asyncio.gather(*(e.complete(p, s) for p, s in zip(prompts, params)))]
            return out, e.kv_metrics().counters["pruned_tokens"], e._runner.graph_steps

    eager, pruned0, n0 = asyncio.run(run(False))
    graphed, pruned1, n1 = asyncio.run(run(True))
    assert n0 == 0 and n1 > 0 and pruned0 > 0
    assert graphed == eager and pruned1 == pruned0


# ---- the GPU engine against transformers ------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "mixtral"])
def test_gpu_engine_greedy_tokens_match_transformers(tiny_dir, family):
    """float32 on the GPU with CUDA graphs (Triton attention, fused kernels, Triton MoE) against
    transformers' float32 generate on the CPU: equal tokens, or a difference first at a
    near-tie of transformers' logits (FP32_TIE)."""
    pytest.importorskip("triton")
    prompts = [random_prompt(4 + 5 * i, 256, seed=300 + i) for i in range(6)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)

    async def run():
        async with Engine(str(tiny_dir[family]), _config(True, "float32"), progress=False) as e:
            out = await asyncio.gather(*(e.complete(p, params) for p in prompts))
            return [r.token_ids for r in out], e._runner.graph_steps

    ours, graph_steps = asyncio.run(run())
    assert graph_steps > 0
    ref = hf_model(tiny_dir[family])
    for prompt, got in zip(prompts, ours):
        want = hf_greedy(ref, prompt, len(got))
        if got == want:
            continue
        i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + want[:i]])).logits[0, -1]  # [V]
        assert float(logits[want[i]] - logits[got[i]]) <= FP32_TIE, (prompt, i)
