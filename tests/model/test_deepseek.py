"""DeepSeek-V2 / V3 (MLA, grouped routing, shared experts, YaRN) against transformers on tiny
random checkpoints with odd shapes (fp32): logits, routing, greedy tokens; FP8 checkpoints;
the Triton MLA kernels through the whole model (Triton's interpreter on the CPU)."""

import asyncio
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from afkv import Engine, EngineConfig, SamplingParams
from afkv.errors import CheckpointError, UnsupportedModelError
from afkv.kv.layout import LatentLayout, layout_for
from afkv.model.model import load_colocated
from afkv.model.random import REAL_SHAPES, random_spec
from afkv.model.sides import SeqChunk, StepInputs
from afkv.model.spec import load_spec, spec_from_hf_config
from afkv.ops import fp8
from afkv.ops.kernels import torch_kernels
from tests.conftest import DEEPSEEK
from tests.helpers import hf_greedy, hf_model, random_prompt, rel_err

CPU = torch.device("cpu")


def _paged_logits(model, ids: list[int], chunk_sizes: list[int], block_size: int = 4) -> torch.Tensor:
    """A prompt through afkv in chunks over a scrambled block table of the latent cache (NaN
    outside what is written); logits of every position."""
    layout = layout_for(model.spec, block_size, torch.float32)
    num_blocks = -(-len(ids) // block_size) + 3
    kv = torch.full((num_blocks, *layout.block_shape), float("nan"))
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor(ids)
    outs, start = [], 0
    for n in chunk_sizes:
        pos = torch.arange(start, start + n)
        ctx = start + n
        inputs = StepInputs(tokens[start:ctx], pos, table[pos // block_size], pos % block_size,
                            [SeqChunk(0, n, ctx, table[: -(-ctx // block_size)])])
        with torch.no_grad():
            outs.append(model.attn.logits(model.forward(inputs, kv)))
        start = ctx
    assert start == len(ids)
    return torch.cat(outs)


def test_real_configs_parse():
    """DeepSeek-V2-Lite's and V3's own config.json values (random.py holds them verbatim)."""
    lite, v3 = random_spec("random:deepseek-v2-lite"), random_spec("random:deepseek-v3-8l")
    for spec in (lite, v3):
        assert spec.is_mla and spec.mla.latent_dim == 576 and spec.mla.rope_interleave
        assert spec.kv_bytes_per_token(2) == spec.num_layers * 576 * 2  # one latent per token and layer, no heads
        assert spec.yarn is not None and spec.yarn.factor == 40 and spec.yarn.original_max_position == 4096
        assert spec.yarn.cos_sin_factor == 1.0  # mscale == mscale_all_dim in both
        assert not spec.shared_expert_gated
    # softmax scale: qk_head_dim^-0.5 times mscale(40, mscale_all_dim)^2 (DeepSeek's reference code)
    assert lite.mla.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)
    assert v3.mla.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert lite.mla.q_lora_rank == 0 and v3.mla.q_lora_rank == 1536
    assert (lite.num_experts, lite.top_k, lite.shared_expert_intermediate_size) == (64, 6, 2 * 1408)
    assert lite.router.method == "greedy" and not lite.router.renormalize and lite.num_expert_groups == 1
    assert (v3.num_experts, v3.top_k, v3.shared_expert_intermediate_size) == (256, 8, 2048)
    assert (v3.router.scoring, v3.router.method, v3.router.scaling_factor, v3.router.renormalize) == \
        ("sigmoid", "noaux_tc", 2.5, True)
    assert v3.num_expert_groups == 8 and v3.router.topk_groups == 4
    assert v3.sparse_layers == (False,) * 3 + (True,) * 5 and lite.sparse_layers == (False,) + (True,) * 26
    layout = layout_for(v3, 64, torch.bfloat16)
    assert isinstance(layout, LatentLayout) and layout.block_nbytes == 8 * 64 * 576 * 2


@pytest.mark.parametrize("change,error,match", [
    ({"norm_topk_prob": True}, UnsupportedModelError, "norm_topk_prob"),
    ({"topk_method": "noaux_tc"}, UnsupportedModelError, "routing"),
    ({"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}, CheckpointError, "n_group"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, UnsupportedModelError, "rope type"),
    ({"rope_scaling": {"type": "yarn", "factor": 40}}, CheckpointError, "original_max_position"),
    ({"attention_bias": True}, UnsupportedModelError, "attention_bias"),
    ({"kv_lora_rank": None}, CheckpointError, "kv_lora_rank"),
])
def test_unsupported_or_broken_configs_are_refused(change, error, match):
    cfg = dict(REAL_SHAPES["deepseek-v2-lite"]) | change
    with pytest.raises(error, match=match):
        spec_from_hf_config(cfg, source="config.json")


def test_v3_routing_must_be_sigmoid_noaux():
    cfg = dict(REAL_SHAPES["deepseek-v3-8l"]) | {"scoring_func": "softmax"}
    with pytest.raises(UnsupportedModelError, match="routing"):
        spec_from_hf_config(cfg)
    cfg = dict(REAL_SHAPES["deepseek-v3-8l"]) | {"n_group": 128}  # 2 experts per group: top-2 still defined
    assert spec_from_hf_config(cfg).num_expert_groups == 128
    with pytest.raises(CheckpointError, match="top-2"):
        spec_from_hf_config(dict(REAL_SHAPES["deepseek-v3-8l"]) | {"n_group": 256, "topk_group": 8})


@pytest.mark.parametrize("family", DEEPSEEK)
def test_logits_match_transformers(deepseek_dir, family):
    model = load_colocated(deepseek_dir[family], CPU, torch.float32)
    spec = model.spec
    assert spec.yarn is not None and spec.mla.kv_lora_rank == 40  # the tiny configs state YaRN, odd shapes
    ids = random_prompt(45, spec.vocab_size, seed=1)
    with torch.no_grad():
        ref = hf_model(deepseek_dir[family])(torch.tensor([ids])).logits[0]  # [T, V]
    # one chunk (K/V expanded per head), and chunked prefill: chunks below the expansion
    # threshold attend with absorbed queries, the 20-token one expands, the last is a decode row
    assert 1 < 13 < model.attn.expand_from <= 20
    for chunks in ([45], [13, 20, 11, 1]):
        got = _paged_logits(model, ids, chunks)
        assert not torch.isnan(got).any()
        assert rel_err(got, ref) <= 1e-4, (family, chunks, rel_err(got, ref))


@pytest.mark.parametrize("family", DEEPSEEK)
def test_routing_matches_transformers_router(deepseek_dir, family):
    """The attention side's routing against transformers' router module of a MoE layer: the
    same experts and weights (V3: sigmoid + correction bias, 2 of 4 groups, scaled by 2.5)."""
    model = load_colocated(deepseek_dir[family], CPU, torch.float32)
    gate = hf_model(deepseek_dir[family]).model.layers[2].mlp.gate
    x = torch.randn(64, model.spec.hidden_size, generator=torch.Generator().manual_seed(3))
    r = model.attn.route(2, x)  # the side applies post_attention_layernorm first: compare on its output
    with torch.no_grad():
        _, want_w, want_ids = gate(r.x)
    got_ids, order = r.topk_ids.sort(-1)
    want_sorted, want_order = want_ids.sort(-1)
    assert torch.equal(got_ids, want_sorted)
    torch.testing.assert_close(r.topk_weights.gather(1, order), want_w.gather(1, want_order), rtol=1e-6, atol=1e-7)
    assert r.topk_ids.unique().numel() >= model.spec.num_experts // 2  # not degenerate
    if family == "deepseek_v3":
        torch.testing.assert_close(r.topk_weights.sum(-1), torch.full((64,), 2.5))
        groups = r.topk_ids // (model.spec.num_experts // 4)
        assert all(len(set(g.tolist())) <= 2 for g in groups)  # at most topk_group groups per token


@pytest.mark.parametrize("family", DEEPSEEK)
async def test_greedy_tokens_match_transformers_generate(deepseek_dir, family):
    ref_model = hf_model(deepseek_dir[family])
    prompts = [random_prompt(n, 256, seed=n) for n in (7, 30)]
    refs = [hf_greedy(ref_model, p, 32) for p in prompts]
    cfg = EngineConfig.from_dict({"kv": {"block_size": 4, "num_blocks": 64}, "scheduler": {"max_num_batched_tokens": 16}})
    async with Engine(deepseek_dir[family], cfg, progress=False) as engine:
        got = await asyncio.gather(*(engine.complete(p, SamplingParams(max_tokens=32, ignore_eos=True)) for p in prompts))
    for r, g in zip(refs, got):
        assert g.token_ids == r, family


def _linear(name: str) -> bool:
    return name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")


def _write_fp8_checkpoint(src, dst, shards: int = 2):
    """`src` as DeepSeek-V3 ships it: every projection (kv_a_proj_with_mqa included) fp8 e4m3
    with 128 x 128 weight_scale_inv blocks, in `shards` files with an index; and the
    dequantized twin (one file)."""
    tensors = load_file(src / "model.safetensors")
    quant, plain = {}, {}
    for name, t in tensors.items():
        if _linear(name):
            q, s = fp8.quantize_blocks(t)
            quant[name], quant[name + "_scale_inv"] = q, s
            plain[name] = fp8.dequantize_blocks(q, s)
        else:
            quant[name] = plain[name] = t
    cfg = json.loads((src / "config.json").read_text())
    out, twin = dst / "fp8", dst / "plain"
    out.mkdir(parents=True)
    twin.mkdir(parents=True)
    names = sorted(quant)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: quant[n] for n in names[i::shards]}
        save_file(part, out / fname)
        weight_map |= dict.fromkeys(part, fname)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg | {"quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    save_file(plain, twin / "model.safetensors")
    (twin / "config.json").write_text(json.dumps(cfg))
    return out, twin, quant


def test_fp8_checkpoint_loads_dequantized(deepseek_dir, tmp_path):
    """A sharded DeepSeek-V3 checkpoint with fp8 projections (MLA's included, partial 128 x 128
    blocks at these shapes) loads dequantized: the same logits as its dequantized twin; with
    expert_dtype fp8 the routed experts are the stored fp8 tensors and scales."""
    fp8_dir, twin_dir, stored = _write_fp8_checkpoint(deepseek_dir["deepseek_v3"], tmp_path)
    assert load_spec(fp8_dir).fp8_block == (128, 128)
    ids = random_prompt(20, 256, seed=3)
    a = _paged_logits(load_colocated(fp8_dir, CPU, torch.float32), ids, [20])
    b = _paged_logits(load_colocated(twin_dir, CPU, torch.float32), ids, [20])
    assert torch.equal(a, b)
    q = load_colocated(fp8_dir, CPU, torch.float32, expert_dtype="fp8")
    p = "model.layers.2.mlp.experts.5."
    mlp = q.ffn.ffn.experts[2][5]
    want = torch.cat([stored[p + "gate_proj.weight"], stored[p + "up_proj.weight"]])
    assert torch.equal(mlp.gate_up.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(mlp.down_scale, stored[p + "down_proj.weight_scale_inv"])
    assert q.ffn.ffn.shared[2][1] is None and q.ffn.ffn.shared[2][0].gate_up.dtype == torch.float32  # shared: model dtype


def _triton_kernels():
    """The torch kernels with MLA's two attention calls replaced by the Triton kernels (run by
    Triton's interpreter on CPU tensors)."""
    from afkv.ops import triton_mla

    return dataclasses.replace(torch_kernels(), mla_decode=triton_mla.paged_mla_decode,
                               mla_prefill=triton_mla.paged_mla_prefill)


@pytest.mark.parametrize("family", DEEPSEEK)
def test_triton_mla_kernels_through_the_model(deepseek_dir, family):
    """Mixed steps (decode rows of three sequences beside a short prefill chunk) with the
    Triton MLA kernels give the torch reference's logits."""
    from afkv.model.model import LocalFFN, Model, attention_side, load_ffn_side, open_checkpoint

    path = deepseek_dir[family]
    spec, reader = open_checkpoint(path)
    ref = load_colocated(path, CPU, torch.float32)
    tri = Model(spec, attention_side(spec, reader, CPU, torch.float32, _triton_kernels()),
                LocalFFN(load_ffn_side(spec, path, CPU, torch.float32)))
    bs, lens = 4, [9, 14, 5]
    layout = layout_for(spec, bs, torch.float32)
    kv = torch.randn(16, *layout.block_shape, generator=torch.Generator().manual_seed(0))
    tables = torch.arange(15).view(3, 5)  # sequence i owns blocks 5i .. 5i + 4
    # one step: a decode row for sequences 0 and 1, a 3-token chunk for sequence 2 (absorbed)
    ids = torch.tensor(random_prompt(5, 256, seed=4))
    pos = torch.tensor([lens[0] - 1, lens[1] - 1, lens[2] - 3, lens[2] - 2, lens[2] - 1])
    seq = torch.tensor([0, 1, 2, 2, 2])
    chunks = [SeqChunk(0, 1, lens[0], tables[0]), SeqChunk(1, 1, lens[1], tables[1]), SeqChunk(2, 3, lens[2], tables[2])]
    out = []
    for model in (ref, tri):
        cache = kv.clone()
        inputs = StepInputs(ids, pos, tables[seq, pos // bs], pos % bs, chunks)
        assert inputs.decode is not None  # two decode rows: one batched call
        with torch.no_grad():
            out.append(model.attn.logits(model.forward(inputs, cache)))
    assert rel_err(out[1], out[0]) <= 1e-5
