"""Decode-step timing on GPUs, shared by the benchmarks (`afkv bench af`, `afkv bench gpu`).

A synthetic decode step: B sequences at `context` cached tokens each (random KV in place),
one new token each; timed with CUDA events around embedding, every layer, the lm_head and an
argmax on the device, replayed as a CUDA graph (afkv.model.graphs) or run eagerly.
"""

from __future__ import annotations

import gc
import time

import torch

from afkv.kv.layout import layout_for
from afkv.model.graphs import DecodeGraphs
from afkv.model.model import Model, load_colocated
from afkv.model.sides import SeqChunk, StepInputs

TPOT_LIMIT_S = 0.050


class ZeroFFN:
    """An FFN backend that returns zeros at once: the attention side's time alone (T_attn)."""

    graph_safe = True

    def begin_step(self, mb_sizes, announce=True):
        pass

    def end_step(self):
        pass

    def submit(self, layer, x, ids, w):
        z = torch.zeros_like(x)
        return type("Done", (), {"result": lambda self: z})()


def fits(spec, batch, context, block_size, free_bytes: int, dtype) -> bool:
    per_seq = -(-(context + 1) // block_size)
    need = batch * per_seq * block_size * spec.kv_bytes_per_token(dtype.itemsize)
    return need < free_bytes * 0.85


def random_kv(spec, num_blocks: int, block_size: int, dtype, device) -> torch.Tensor:
    """The device cache [num_blocks, *block_shape] of the model's layout (K/V or MLA latents)."""
    shape = (num_blocks, *layout_for(spec, block_size, dtype).block_shape)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.5)  # in place: KV may be ~100 GB


def copy_bandwidth(device: torch.device, nbytes: int = 4 << 30, reps: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write (median)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for i in range(reps + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / sorted(times)[len(times) // 2]


def _attention_layer_params(spec) -> int:
    """Weights of one attention layer (projections and norms): GQA, or MLA's (q_a / q_b or q,
    kv_a, kv_a_layernorm, kv_b, o)."""
    h, mla = spec.hidden_size, spec.mla
    if mla is None:
        d = spec.head_dim
        return h * (spec.num_heads + 2 * spec.num_kv_heads) * d + spec.num_heads * d * h + 2 * h
    heads, ql = spec.num_heads, mla.q_lora_rank
    q = h * ql + ql + ql * heads * mla.qk_head_dim if ql else h * heads * mla.qk_head_dim
    kv = h * mla.latent_dim + mla.kv_lora_rank + mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
    return q + kv + heads * mla.v_head_dim * h + 2 * h


def step_bytes(spec, batch: int, context: int, itemsize: int = 2) -> dict[str, float]:
    """Bytes one decode step must move at least, per side: every attention-side weight once
    (embedding rows aside), the batch's KV, and the experts the batch touches (uniform routing:
    E * (1 - (1 - k/E)^B) distinct experts per MoE layer; one byte per weight when the routed
    experts are held in fp8, their block scales aside)."""
    h = spec.hidden_size
    routed_itemsize = 1 if spec.expert_dtype == "fp8" else itemsize
    attn = spec.num_layers * _attention_layer_params(spec) + spec.vocab_size * h  # + lm_head
    ffn = 0.0
    for i in range(spec.num_layers):
        if spec.sparse_layers[i]:
            e, k = spec.num_experts, spec.layer_top_k(i)
            attn += spec.num_experts * h  # router
            touched = e * (1 - (1 - k / e) ** batch)
            ffn += touched * 3 * h * spec.moe_intermediate_size * routed_itemsize / itemsize
            if spec.shared_expert_intermediate_size:
                ffn += 3 * h * spec.shared_expert_intermediate_size
        else:
            ffn += 3 * h * spec.intermediate_size
    kv = batch * (context + 1) * spec.kv_bytes_per_token(itemsize)
    return {"attention": attn * itemsize + kv, "ffn": ffn * itemsize, "kv": kv}


def synthetic_step(spec, batch: int, context: int, block_size: int):
    """Token ids, positions, slots, context lengths and block tables of `batch` sequences
    at `context` cached tokens, each in its own blocks."""
    per_seq = -(-(context + 1) // block_size)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, spec.vocab_size, (batch,), generator=g).tolist()
    tables = [tuple(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch)]
    pos = [context] * batch
    slot_b = [t[context // block_size] for t in tables]
    slot_o = [context % block_size] * batch
    return ids, pos, slot_b, slot_o, [context + 1] * batch, tables, batch * per_seq


def eager_inputs(step, device) -> StepInputs:
    ids, pos, slot_b, slot_o, lens, tables, _ = step
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    table = t([list(x) for x in tables])  # [B, nb]
    chunks = [SeqChunk(i, 1, c, table[i]) for i, c in enumerate(lens)]
    return StepInputs(t(ids), t(pos), t(slot_b), t(slot_o), chunks)


def median_s(fn, steps: int, warmup: int = 2) -> float:
    times = []
    for i in range(steps + warmup):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        if i >= warmup:
            times.append(s.elapsed_time(e) / 1e3)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def colocated_phase(name: str, batches: list[int], context: int, block_size: int, steps: int, copy_bw: float,
                    log, eager_batches: set[int], expert_dtype: str = "auto") -> dict:
    dev = torch.device("cuda:0")
    t0 = time.perf_counter()
    model = load_colocated(f"random:{name}", dev, torch.bfloat16, expert_dtype=expert_dtype)
    log(f"  afkv: loaded random:{name} (routed experts {expert_dtype}) on {dev} in {time.perf_counter() - t0:.0f} s")
    spec = model.spec
    zero = Model(spec, model.attn, ZeroFFN())
    rows: dict[int, dict] = {}
    for b in batches:
        if not fits(spec, b, context, block_size, torch.cuda.mem_get_info(dev)[0], torch.bfloat16):
            rows[b] = {"note": "KV does not fit next to the full model"}
            log(f"  afkv batch {b}: KV does not fit")
            continue
        step = synthetic_step(spec, b, context, block_size)
        nblocks = step[-1]
        kv = random_kv(spec, nblocks + 1, block_size, torch.bfloat16, dev)  # + the graphs' scratch block
        row: dict = {}
        for label, m in (("graph", model), ("graph_attn_only", zero)):
            graphs = DecodeGraphs(m, kv, b, len(step[5][0]), nblocks, buckets=[b])
            run = lambda: graphs.run(*step[:6], 1).argmax(-1)  # noqa: E731
            row[label + "_s"] = median_s(run, steps)
            del graphs
        if b in eager_batches:
            inputs = eager_inputs(step, dev)
            row["eager_s"] = median_s(lambda: model.attn.logits(model.forward(inputs, kv, 1)).argmax(-1), steps)
        tpot = row["graph_s"]
        need = step_bytes(spec, b, context)
        row |= {"tpot_s": tpot, "tok_s": b / tpot, "t_attn_s": row["graph_attn_only_s"],
                "roofline_share": (need["attention"] + need["ffn"]) / copy_bw / tpot,
                "attn_roofline_share": need["attention"] / copy_bw / row["graph_attn_only_s"],
                "bytes": need}
        rows[b] = row
        eager = f", eager {row['eager_s'] * 1e3:.1f} ms" if "eager_s" in row else ""
        log(f"  afkv batch {b}: TPOT {tpot * 1e3:.2f} ms ({b / tpot:.0f} tok/s){eager}, "
            f"T_attn {row['t_attn_s'] * 1e3:.2f} ms, roofline {row['roofline_share']:.0%}")
        del kv
        torch.cuda.empty_cache()
    del model, zero
    gc.collect()
    torch.cuda.empty_cache()
    return rows


