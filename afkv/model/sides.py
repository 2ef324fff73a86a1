"""The model split at the AF seam.

    AttentionSide   embedding, attention (RoPE, GQA, q/k norm, paged KV), norms,
                    router/top-k, final norm, lm_head            -> lives on attention nodes
                    (afkv.model.deepseek.MLAAttentionSide: the same with MLA over latents)
    FFNSide         routed experts, shared expert(s) (+ a gate), dense MLPs
                                                                  -> lives on expert nodes
The seam is one call per layer:

    y = ffn.forward(layer, x, topk_ids, topk_weights)   # x [T, H], ids/weights [T, k] -> y [T, H]

An FFNSide may hold a subset of the experts (and optionally the shared/dense part):
its output is then the partial sum over what it holds, and partial sums add up.
Each side reads only its own tensors from the checkpoint.

Routed experts are held in the model dtype, or with ModelSpec.expert_dtype "fp8" as e4m3 with
128 x 128 block scales (afkv.ops.fp8): taken as stored from FP8 checkpoints with such blocks,
quantized at load otherwise; run by the Triton fused-MoE kernel on CUDA (fp8 tensor cores)
and by its torch reference on the CPU. Shared experts and dense MLPs keep the model dtype.

Which kernels a side runs is chosen once, when it is built (afkv.ops.kernels.Kernels).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from afkv.errors import DeviceError
from afkv.model.spec import Family, ModelSpec
from afkv.model.weights import CheckpointReader
from afkv.ops import fp8 as fp8_ops
from afkv.ops.attention import (
    QuantizedKVCache,
    merge_partials,
    paged_attention,
    write_kv,
)
from afkv.ops.kernels import Kernels, select_kernels
from afkv.ops.layers import Rotary, gated_mlp, rms_norm, route_grouped_topk, route_topk


@dataclass
class SeqChunk:
    """One sequence's share of a step: rows [start, start + length) of the flattened batch."""

    start: int
    length: int
    context_len: int  # tokens in KV after this step (cached + this chunk)
    block_ids: torch.Tensor  # [num_blocks] int64, the sequence's block table prefix covering context_len
    score_keys: bool = False  # H2O: attended alone, adding to StepInputs.key_mass
    stream: tuple[int, int] | None = None  # (first, count) of its blocks in StepInputs.stream: attended alone


class LayerStream(Protocol):
    """A step's blocks streamed from host memory (afkv.kv.stream.StreamStep), layer by layer."""

    block_size: int

    def cache(self, layer: int) -> torch.Tensor | QuantizedKVCache:
        """The streamed blocks of `layer` as a one-layer cache the attention kernels read in
        place (block i = streamed block i), ready on the compute stream. Layers are asked in order."""
        ...


@dataclass
class StreamRows:
    """The single-token chunks of a step with streamed blocks (decode rows of streaming
    sequences), attended in one call per part: their device blocks and their streamed ones."""

    rows: torch.Tensor  # [S] int64 row of each in the flattened batch
    block_tables: torch.Tensor  # [S, nb] int64 device tables, padded with block 0 (never read)
    context_lens: torch.Tensor  # [S] int64 device slots
    stream_tables: torch.Tensor  # [S, ns] int64 ring indexes of their streamed blocks, padded (never read)
    stream_lens: torch.Tensor  # [S] int64 streamed tokens


def stream_rows(chunks: list[SeqChunk], block_size: int, device: torch.device) -> StreamRows:
    """The StreamRows of `chunks` (S = 0 when none): one pinned host -> device copy, no host
    synchronisation; the device tables are gathered on the device."""
    singles = [c for c in chunks if c.length == 1 and c.stream is not None]
    nb = max((c.block_ids.numel() for c in singles), default=0)
    ns = max((c.stream[1] for c in singles), default=0)
    tables = torch.zeros(len(singles), nb, dtype=torch.int64, device=device)  # [S, nb]
    for j, c in enumerate(singles):
        tables[j, : c.block_ids.numel()] = c.block_ids
    meta = torch.tensor([[c.start for c in singles], [c.context_len for c in singles],
                         [c.stream[0] for c in singles], [c.stream[1] for c in singles]],
                        dtype=torch.int64).view(4, len(singles))  # rows, device slots, first, count; each [S]
    if device.type == "cuda":
        meta = meta.pin_memory()
    rows, lens, first, count = meta.to(device, non_blocking=True)  # contiguous rows: the kernels take them
    last = (count - 1).clamp(min=0)[:, None]  # [S, 1] padding repeats a row's last streamed block
    stream_tables = first[:, None] + torch.minimum(torch.arange(ns, device=device)[None, :], last)  # [S, ns]
    return StreamRows(rows, tables, lens, stream_tables, count * block_size)


@dataclass
class DecodeRows:
    """The single-token chunks of a step, attended in one batched call."""

    rows: torch.Tensor  # [B] int64 row of each in the flattened batch
    block_tables: torch.Tensor  # [B, nb] int64, padded
    context_lens: torch.Tensor  # [B] int64
    every_row: bool = False  # rows are 0 .. B-1: the step is these rows only (decode-only)


@dataclass
class StepInputs:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_blocks: torch.Tensor  # [T] int64 block id where each token's K/V goes
    slot_offsets: torch.Tensor  # [T] int64 offset inside that block
    chunks: list[SeqChunk]
    decode: DecodeRows | None = None  # when set, these rows' chunks are not attended one by one
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [T, D]: computed by the first layer
    staging_slots: torch.Tensor | None = None  # quantized device tier: slot_blocks - num_blocks (first layer)
    key_mass: torch.Tensor | None = None  # [num_blocks, block_size] float32, for chunks with score_keys
    stream: LayerStream | None = None  # the blocks of chunks with `stream`, streamed from host memory
    stream_rows: StreamRows | None = None  # the decode rows among those chunks (the first layer builds it)

    def __post_init__(self) -> None:
        if self.decode is None:
            self.decode = decode_rows(self.chunks, self.token_ids.device)


def decode_rows(chunks: list[SeqChunk], device: torch.device) -> DecodeRows | None:
    singles = [c for c in chunks if c.length == 1 and not c.score_keys and c.stream is None]
    if not singles:
        return None
    nb = max(c.block_ids.numel() for c in singles)
    tables = torch.zeros(len(singles), nb, dtype=torch.int64, device=device)  # pad with block 0: masked out
    for i, c in enumerate(singles):
        tables[i, : c.block_ids.numel()] = c.block_ids
    rows = torch.tensor([c.start for c in singles], dtype=torch.int64, device=device)
    lens = torch.tensor([c.context_len for c in singles], dtype=torch.int64, device=device)
    return DecodeRows(rows, tables, lens)


@dataclass
class Routed:
    x: torch.Tensor  # [T, H] normalised hidden states, the FFN input
    topk_ids: torch.Tensor  # [T, k] int64 logical expert ids
    topk_weights: torch.Tensor  # [T, k] float32


def _layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def _moe_prefix(spec: ModelSpec, reader: CheckpointReader, i: int) -> str:
    if spec.family is Family.MIXTRAL and f"{_layer_prefix(i)}block_sparse_moe.gate.weight" in reader:
        return f"{_layer_prefix(i)}block_sparse_moe."
    return f"{_layer_prefix(i)}mlp."


class AttentionSideBase(abc.ABC):
    """What every family's attention side holds and does besides attention itself: the
    embedding, per layer the two norms and the router, the final norm and lm_head, routing
    and logits. A family's side loads its attention weights in `_load_attention` and attends
    in `attention` (AttentionSide: RoPE + GQA; afkv.model.deepseek.MLAAttentionSide: MLA)."""

    def __init__(self, spec: ModelSpec, reader: CheckpointReader, device: torch.device, dtype: torch.dtype,
                 kernels: Kernels | None = None):
        """kernels: what this side runs (afkv.ops.kernels.select_kernels(device) when None)."""
        self.spec, self.device, self.dtype = spec, device, dtype
        self.kernels = kernels or select_kernels(device)

        def get(name: str) -> torch.Tensor:
            return reader.get(name, dtype, device)

        self.embed_tokens = get("model.embed_tokens.weight")  # [V, H]
        self.layers = []
        for i in range(spec.num_layers):
            p = _layer_prefix(i)
            layer = {
                "input_norm": get(p + "input_layernorm.weight"),
                "post_norm": get(p + "post_attention_layernorm.weight"),
                **self._load_attention(i, reader, get),
            }
            if spec.sparse_layers[i]:
                m = _moe_prefix(spec, reader, i)
                if spec.router is None:
                    layer["router"] = get(m + "gate.weight")  # [E, H]
                else:  # DeepSeek: routed in float32, as transformers keeps the router
                    layer["router"] = reader.get(m + "gate.weight", torch.float32, device)  # [E, H]
                    if spec.router.has_correction_bias:
                        layer["router_bias"] = reader.get(m + "gate.e_score_correction_bias", torch.float32, device)
            elif spec.upcycle is not None:
                layer["router"] = self._upcycle_router(i)
            self.layers.append(layer)
        self.norm = get("model.norm.weight")
        if spec.tie_embeddings or "lm_head.weight" not in reader:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = get("lm_head.weight")  # [V, H]
        self._tf = self.kernels.fused  # fused norms, rotary + K/V write, routing (None: torch compositions)
        self._post: tuple[torch.Tensor, torch.Tensor] | None = None  # (h, post-norm of h) from a fused add + norm

    @abc.abstractmethod
    def _load_attention(self, layer: int, reader: CheckpointReader, get) -> dict[str, torch.Tensor]:
        """The attention weights of `layer` (entries of self.layers[layer])."""

    @abc.abstractmethod
    def attention(self, i: int, h: torch.Tensor, inputs: StepInputs, kv) -> torch.Tensor:
        """h [T, H] -> h + attention(norm(h)); writes this step's KV of layer i into kv."""

    def _upcycle_router(self, layer: int) -> torch.Tensor:
        up = self.spec.upcycle
        gen = torch.Generator().manual_seed(up.router_seed * 1_000_003 + layer)
        w = torch.randn(up.num_experts, self.spec.hidden_size, generator=gen) * up.router_std  # [E, H]
        return w.to(self.dtype).to(self.device)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[token_ids]  # [T, H]

    def _input_norm(self, i: int, h: torch.Tensor) -> torch.Tensor:
        w, eps = self.layers[i]["input_norm"], self.spec.rms_norm_eps
        return self._tf.rms_norm(h, w, eps) if self._tf else rms_norm(h, w, eps)  # [T, H]

    def _residual(self, i: int, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """h + delta; with the fused kernels the post-attention norm is computed in the same
        kernel and kept for `route`."""
        if self._tf is None:
            return h + delta
        h_new, x = self._tf.add_rms_norm(h, delta, self.layers[i]["post_norm"], self.spec.rms_norm_eps)
        self._post = (h_new, x)
        return h_new

    def route(self, i: int, h: torch.Tensor) -> Routed:
        """Post-attention norm and router top-k of layer i (a dense layer routes to expert 0)."""
        spec, w, tf = self.spec, self.layers[i], self._tf
        post, self._post = self._post, None
        if post is not None and post[0] is h:  # normed by attention's fused residual add
            x = post[1]
        else:
            x = rms_norm(h, w["post_norm"], spec.rms_norm_eps)  # [T, H]
        router = w.get("router")
        if router is None:
            ids = torch.zeros(x.shape[0], 1, dtype=torch.int64, device=x.device)  # [T, 1]
            return Routed(x, ids, torch.ones(x.shape[0], 1, device=x.device))
        r = spec.router
        if r is not None and spec.sparse_layers[i]:
            logits = F.linear(x.float(), router)  # [T, E] float32
            ids, weights = route_grouped_topk(
                logits, spec.top_k, sigmoid=r.scoring == "sigmoid", num_groups=r.num_groups if r.method != "greedy"
                else 1, topk_groups=r.topk_groups, correction_bias=w.get("router_bias"), renormalize=r.renormalize,
                scaling_factor=r.scaling_factor)  # [T, k]
            return Routed(x, ids, weights)
        logits = F.linear(x, router)  # [T, E]
        renorm = spec.norm_topk_prob if spec.sparse_layers[i] else True
        ids, weights = (tf.route_topk if tf else route_topk)(logits, spec.layer_top_k(i), renorm)  # [T, k]
        return Routed(x, ids, weights)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, H] -> logits [T, V] in float32."""
        norm = self._tf.rms_norm if self._tf else rms_norm
        return F.linear(norm(h, self.norm, self.spec.rms_norm_eps), self.lm_head).float()


class AttentionSide(AttentionSideBase):
    """Attention with RoPE and GQA (q/k norm, qkv bias by family) over the paged KV cache."""

    def __init__(self, spec: ModelSpec, reader: CheckpointReader, device: torch.device, dtype: torch.dtype,
                 kernels: Kernels | None = None):
        super().__init__(spec, reader, device, dtype, kernels)
        self.rotary = Rotary(spec.head_dim, spec.rope_theta, device)

    def _load_attention(self, layer: int, reader: CheckpointReader, get) -> dict[str, torch.Tensor]:
        spec = self.spec
        a = _layer_prefix(layer) + "self_attn."
        # q, k and v in one matrix: one pass over the weights per layer
        out = {"qkv": torch.cat([get(a + f"{n}_proj.weight") for n in "qkv"]),  # [(Hq + 2 Hkv) D, H]
               "o": get(a + "o_proj.weight")}
        if spec.qkv_bias:
            out["qkv_bias"] = torch.cat([get(a + f"{n}_proj.bias") for n in "qkv"])
        if spec.qk_norm:
            out["q_norm"] = get(a + "q_norm.weight")
            out["k_norm"] = get(a + "k_norm.weight")
        return out

    def attention(self, i: int, h: torch.Tensor, inputs: StepInputs, kv: torch.Tensor | QuantizedKVCache) -> torch.Tensor:
        """h [T, H] -> h + attention(norm(h)); writes this step's K/V of layer i into kv."""
        spec, w, tf = self.spec, self.layers[i], self._tf
        eps = spec.rms_norm_eps
        x = self._input_norm(i, h)  # [T, H]
        qkv = F.linear(x, w["qkv"], w.get("qkv_bias"))  # [T, (Hq + 2 Hkv) D]
        if inputs.rope is None:  # the same for every layer of the step
            inputs.rope = self.rotary.cos_sin(inputs.positions, qkv.dtype)  # [T, D] each
        cos, sin = inputs.rope
        cache, slot_blocks = kv, inputs.slot_blocks  # where this step's K/V go
        if isinstance(kv, QuantizedKVCache):  # fp8/int8/int4 device tier: new tokens go to staging blocks
            if inputs.staging_slots is None:
                inputs.staging_slots = inputs.slot_blocks - kv.num_blocks  # [T]
            cache, slot_blocks = kv.staging, inputs.staging_slots
        if tf is not None:
            # split, q/k norm, rotary and the K/V write in one kernel
            q = tf.qk_norm_rope_write(qkv, spec.num_heads, spec.num_kv_heads, spec.head_dim, w.get("q_norm"),
                                      w.get("k_norm"), eps, cos, sin, cache, i, slot_blocks, inputs.slot_offsets)
        else:
            nq, nkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            q = qkv[:, :nq].view(-1, spec.num_heads, spec.head_dim)  # [T, Hq, D]
            k = qkv[:, nq : nq + nkv].view(-1, spec.num_kv_heads, spec.head_dim)  # [T, Hkv, D]
            v = qkv[:, nq + nkv :].view(-1, spec.num_kv_heads, spec.head_dim)  # [T, Hkv, D]
            if spec.qk_norm:
                q = rms_norm(q, w["q_norm"], eps)
                k = rms_norm(k, w["k_norm"], eps)
            q = Rotary.apply(q, cos, sin)
            k = Rotary.apply(k, cos, sin)
            write_kv(cache, i, slot_blocks, inputs.slot_offsets, k, v)
        d = inputs.decode
        decode, prefill = self.kernels.attention_for(kv)
        if d is not None and d.every_row:  # a decode-only step: no gather or scatter of rows
            return self._residual(i, h, F.linear(
                decode(q, kv, i, d.block_tables, d.context_lens, spec.sliding_window).flatten(1), w["o"]))
        out = torch.empty_like(q)  # [T, Hq, D]
        if d is not None:
            # the Triton kernels read only each row's context (the references gather the padded table)
            out[d.rows] = decode(q[d.rows], kv, i, d.block_tables, d.context_lens, spec.sliding_window)
        if inputs.stream is not None:
            if inputs.stream_rows is None:  # the same for every layer of the step
                inputs.stream_rows = stream_rows(inputs.chunks, inputs.stream.block_size, q.device)
            if inputs.stream_rows.rows.numel():
                out[inputs.stream_rows.rows] = self._streamed_decode(i, q, kv, inputs.stream_rows, inputs.stream)
        for c in inputs.chunks:
            if c.length == 1 and (c.stream is not None or d is not None and not c.score_keys):
                continue  # attended above
            rows = slice(c.start, c.start + c.length)
            if c.stream is not None:
                out[rows] = self._streamed_attention(i, q[rows], kv, c, inputs.stream)
            elif c.score_keys:  # H2O: the torch reference also returns each key's attention mass
                out[rows] = paged_attention(q[rows], kv, i, c.block_ids, c.context_len, spec.sliding_window,
                                            inputs.key_mass)
            else:
                out[rows] = prefill(q[rows], kv, i, c.block_ids, c.context_len, spec.sliding_window)
        return self._residual(i, h, F.linear(out.flatten(1), w["o"]))  # [T, H]

    def _streamed_decode(self, i: int, q: torch.Tensor, kv: torch.Tensor | QuantizedKVCache, sr: StreamRows,
                         stream: LayerStream) -> torch.Tensor:
        """The decode rows of streaming sequences, q [T, H, D] at sr.rows -> [S, H, D]: the decode
        kernels over their device blocks and over their streamed blocks, read in place from the
        ring slot (quantized codes included), merged by log-sum-exp. One call per part."""
        qs = q[sr.rows]  # [S, H, D]
        cache = stream.cache(i)
        streamed = self.kernels.partial_for(cache)(qs, cache, 0, sr.stream_tables, sr.stream_lens)
        own = self.kernels.partial_for(kv)(qs, kv, i, sr.block_tables, sr.context_lens)
        return merge_partials([own, streamed]).out.to(q.dtype)

    def _streamed_attention(self, i: int, q: torch.Tensor, kv: torch.Tensor | QuantizedKVCache, c: SeqChunk,
                            stream: LayerStream) -> torch.Tensor:
        """q [n, H, D] of a prefill chunk whose context is its device blocks (sinks + recent,
        causal by slot) plus streamed blocks (all before every query, no mask): the prefill
        partials over each, the streamed ones read in place from the ring slot (quantized codes
        included), merged by log-sum-exp. One call per part."""
        first, count = c.stream
        cache = stream.cache(i)
        ids = torch.arange(first, first + count, device=q.device)  # [count] its blocks in the ring slot
        streamed = self.kernels.prefill_partial_for(cache)(q, cache, 0, ids, count * stream.block_size, causal=False)
        own = self.kernels.prefill_partial_for(kv)(q, kv, i, c.block_ids, c.context_len)
        return merge_partials([own, streamed]).out.to(q.dtype)


@dataclass
class _Stacked:
    """A layer's held experts as stacked matrices (for one grouped GEMM per projection)."""

    gate_up: torch.Tensor  # [E_h, 2I, H]
    down: torch.Tensor  # [E_h, H, I]
    local: torch.Tensor  # [E + 1] int64: logical expert id -> index in the stack, E_h when not held
    gate_up_scale: torch.Tensor | None = None  # fp8 weights: [E_h, 2 I/128, H/128] float32 (gate, then up blocks)
    down_scale: torch.Tensor | None = None  # fp8 weights: [E_h, H/128, I/128] float32


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs here (it is private: probe once per device type and dtype)."""
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.ones(32, 16, dtype=dtype, device=device)
                b = torch.ones(2, 16, 16, dtype=dtype, device=device).transpose(-2, -1)
                offs = torch.tensor([16, 32], dtype=torch.int32, device=device)
                ok = bool((torch._grouped_mm(a, b, offs=offs) == 16).all())
            except (RuntimeError, NotImplementedError):
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


@dataclass
class _Expert:
    gate_up: torch.Tensor  # [2I, H]: gate rows, then up rows (one matmul for both)
    down: torch.Tensor  # [H, I]
    gate_up_scale: torch.Tensor | None = None  # fp8: [2 I/128, H/128] (gate blocks, then up blocks)
    down_scale: torch.Tensor | None = None  # fp8: [H/128, I/128]

    @classmethod
    def of(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> "_Expert":
        return cls(torch.cat([gate, up]), down)

    @classmethod
    def of_fp8(cls, gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor],
               down: tuple[torch.Tensor, torch.Tensor]) -> "_Expert":
        """From (fp8 weight, block scales) of each projection."""
        return cls(torch.cat([gate[0], up[0]]), down[0], torch.cat([gate[1], up[1]]), down[1])

    @classmethod
    def quantized(cls, gate_up: torch.Tensor, down: torch.Tensor) -> "_Expert":
        """fp8 from weights of any float dtype: gate_up [2I, H], down [H, I]."""
        inter = gate_up.shape[0] // 2
        q = fp8_ops.quantize_blocks
        return cls.of_fp8(q(gate_up[:inter]), q(gate_up[inter:]), q(down))


class FFNSide:
    """Experts of every MoE layer plus the shared experts and dense MLPs of the layers in
    `dense_layers` (all layers when None).

    `expert_ids` says which routed experts are held: None = all; a frozenset = the same ids
    in every layer; a mapping layer -> frozenset = per layer (an expert node's slots; a
    layer missing from it holds none). `expert_tensors` maps (layer, expert) to tensors
    already at hand (gate_up [2I, H], down [H, I]: received from another expert node, or
    held before a placement change); those are used instead of reading the checkpoint
    (quantized to fp8 when spec.expert_dtype is "fp8": expert_weights then hands out the
    dequantized weights in float32, and quantizing those again gives the same fp8 values
    wherever a block's largest magnitude sits at 448, as afkv's quantizer puts it).
    Upcycled dense layers always read their one MLP from the checkpoint."""

    def __init__(
        self,
        spec: ModelSpec,
        reader: CheckpointReader,
        device: torch.device,
        dtype: torch.dtype,
        expert_ids: frozenset[int] | Mapping[int, frozenset[int]] | None = None,
        dense_layers: frozenset[int] | None = None,
        expert_tensors: Mapping[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
        kernels: Kernels | None = None,
    ):
        self.spec, self.device, self.dtype = spec, device, dtype
        kernels = kernels or select_kernels(device)
        tensors = expert_tensors or {}

        def held_in(layer: int, num_experts: int) -> list[int]:
            if expert_ids is None:
                return list(range(num_experts))
            if isinstance(expert_ids, Mapping):
                return sorted(expert_ids.get(layer, frozenset()))
            return sorted(expert_ids)

        self.experts: list[dict[int, _Expert]] = []  # per layer: logical expert id -> weights
        self.dense: list[_Expert | None] = []  # per layer: dense MLP (dense layers)
        # per layer: shared expert(s) + gate [1, H] (None: always on, DeepSeek's shared experts)
        self.shared: list[tuple[_Expert, torch.Tensor | None] | None] = []
        self.stacked: list[_Stacked | None] = []  # per layer: the routed experts stacked (distinct experts)
        self.grouped = grouped_mm_works(device, dtype)  # else one GEMM pair per expert
        self._tf = kernels.fused  # fused SiLU-and-multiply of the grouped path (CUDA with triton)
        self._moe = kernels.moe  # the Triton fused-MoE kernels (CUDA with triton)
        self.fp8 = spec.expert_dtype == "fp8"  # routed experts as e4m3 with block scales
        if self.fp8 and device.type == "cuda" and (self._moe is None or not self._moe.fp8_available(device)):
            raise DeviceError("expert_dtype fp8 on CUDA needs the Triton fused-MoE kernel (pip install triton, "
                              "AFKV_MOE_KERNEL unset) and fp8 tensor cores (compute capability >= 8.9)")

        def get(name: str) -> torch.Tensor:
            return reader.get(name, dtype, device)

        for i in range(spec.num_layers):
            p = _layer_prefix(i)
            with_dense = dense_layers is None or i in dense_layers
            experts: dict[int, _Expert] = {}
            dense = shared = stacked = None
            if spec.sparse_layers[i]:
                held = held_in(i, spec.num_experts)
                experts = {e: self._given(*tensors[(i, e)]) for e in held if (i, e) in tensors}
                missing = [e for e in held if e not in experts]
                if missing:
                    experts |= self._load_experts(reader, get, _moe_prefix(spec, reader, i), missing)
                experts, stacked = self._stack(experts)
                if with_dense and spec.shared_expert_intermediate_size:
                    m = _moe_prefix(spec, reader, i)
                    s = m + ("shared_expert." if spec.shared_expert_gated else "shared_experts.")
                    mlp = _Expert.of(get(s + "gate_proj.weight"), get(s + "up_proj.weight"), get(s + "down_proj.weight"))
                    shared = (mlp, get(m + "shared_expert_gate.weight") if spec.shared_expert_gated else None)
            elif spec.upcycle is not None:
                # Upcycled dense layer: every expert is the same dense MLP (shared tensors).
                held = held_in(i, spec.upcycle.num_experts)
                if held:
                    mlp = _Expert.of(get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"), get(p + "mlp.down_proj.weight"))
                    experts = {e: mlp for e in held}
            elif with_dense:
                dense = _Expert.of(get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"), get(p + "mlp.down_proj.weight"))
            self.experts.append(experts)
            self.dense.append(dense)
            self.shared.append(shared)
            self.stacked.append(stacked)
        # per layer: ids of the experts sharing one set of tensors (all upcycled copies: one group)
        self._groups: list[list[torch.Tensor]] = []
        for experts in self.experts:
            groups: dict[int, list[int]] = {}
            for e, mlp in experts.items():
                groups.setdefault(id(mlp.down), []).append(e)
            self._groups.append([torch.tensor(g, device=device) for g in groups.values()])
        # per layer: every routable expert is one set of tensors (upcycled, all held): one dense pass
        routable = [spec.upcycle.num_experts if spec.upcycle is not None and not spec.sparse_layers[i] else spec.num_experts
                    for i in range(spec.num_layers)]
        self._one_mlp = [len(g) == 1 and len(e) == n for g, e, n in zip(self._groups, self.experts, routable)]

    def expert_weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors of a held routed expert: gate_up [2I, H], down [H, I] (fp8 experts:
        dequantized, float32). KeyError if not held."""
        mlp = self.experts[layer][expert]
        if mlp.gate_up_scale is None:
            return mlp.gate_up, mlp.down
        return (fp8_ops.dequantize_gate_up(mlp.gate_up, mlp.gate_up_scale),
                fp8_ops.dequantize_blocks(mlp.down, mlp.down_scale))

    def _given(self, gate_up: torch.Tensor, down: torch.Tensor) -> _Expert:
        """An expert from tensors at hand (expert_tensors)."""
        gate_up, down = gate_up.to(self.device), down.to(self.device)
        if self.fp8:
            return _Expert.quantized(gate_up, down)
        return _Expert(gate_up.to(self.dtype), down.to(self.dtype))

    def _stack(self, experts: dict[int, _Expert]) -> tuple[dict[int, _Expert], _Stacked | None]:
        """Stack a layer's experts; the per-expert weights become views into the stack."""
        if not experts:
            return experts, None
        ids = sorted(experts)
        gate_up = torch.stack([experts[e].gate_up for e in ids])  # [E_h, 2I, H]
        down = torch.stack([experts[e].down for e in ids])  # [E_h, H, I]
        # one extra entry: expert id num_experts marks padding rows, held by no node
        local = torch.full((self.spec.num_experts + 1,), len(ids), dtype=torch.int64, device=self.device)
        local[torch.tensor(ids, device=self.device)] = torch.arange(len(ids), device=self.device)
        if not self.fp8:
            views = {e: _Expert(gate_up[j], down[j]) for j, e in enumerate(ids)}
            return views, _Stacked(gate_up, down, local)
        gate_up_scale = torch.stack([experts[e].gate_up_scale for e in ids])  # [E_h, 2 I/128, H/128]
        down_scale = torch.stack([experts[e].down_scale for e in ids])  # [E_h, H/128, I/128]
        views = {e: _Expert(gate_up[j], down[j], gate_up_scale[j], down_scale[j]) for j, e in enumerate(ids)}
        return views, _Stacked(gate_up, down, local, gate_up_scale, down_scale)

    def _load_experts(self, reader, get, prefix: str, held) -> dict[int, _Expert]:
        if prefix + "experts.gate_up_proj" in reader:  # fused layout [E, 2I, H], [E, H, I]
            gate_up = reader.get(prefix + "experts.gate_up_proj", self.dtype)
            down = reader.get(prefix + "experts.down_proj", self.dtype)
            return {e: self._given(gate_up[e].contiguous(), down[e].contiguous()) for e in held}
        names = ("w1", "w3", "w2") if self.spec.family is Family.MIXTRAL else ("gate_proj", "up_proj", "down_proj")
        if self.fp8:
            return {e: _Expert.of_fp8(*(self._fp8_weight(reader, f"{prefix}experts.{e}.{n}.weight") for n in names))
                    for e in held}
        return {
            e: _Expert.of(*(get(f"{prefix}experts.{e}.{n}.weight") for n in names))
            for e in held
        }

    def _fp8_weight(self, reader, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 weight, 128 x 128 block scales): as stored in an FP8 checkpoint with such blocks,
        else quantized from the weight in the model dtype."""
        if reader.fp8_block == (fp8_ops.BLOCK, fp8_ops.BLOCK) and name + "_scale_inv" in reader:
            q = reader.get(name, None, self.device)
            if q.dtype == fp8_ops.FP8:
                return q, reader.get(name + "_scale_inv", torch.float32, self.device)
        return fp8_ops.quantize_blocks(reader.get(name, self.dtype, self.device))

    def forward(self, i: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids/weights [T, k] -> partial FFN output [T, H] over what this side holds."""
        dense = self.dense[i]
        if dense is not None:
            return gated_mlp(x, dense.gate_up, dense.down)
        assert self.spec.layer_has_router(i), f"layer {i} is dense and its MLP is not held here"
        stacked = self.stacked[i]
        if stacked is not None and stacked.gate_up_scale is not None:  # fp8 experts
            st = stacked
            if self._moe is not None:
                out = self._moe.moe_mlp(x, topk_ids, topk_weights, st.local, st.gate_up, st.down, st.gate_up_scale,
                                        st.down_scale)
            else:  # the CPU: the kernel's torch reference
                out = fp8_ops.moe_mlp_reference(x, topk_ids, topk_weights, st.local, st.gate_up, st.gate_up_scale,
                                                st.down, st.down_scale)
        elif stacked is not None and self._moe is not None:
            out = self._moe.moe_mlp(x, topk_ids, topk_weights, stacked.local, stacked.gate_up, stacked.down)
        elif stacked is not None and self.grouped:
            out = self._grouped(stacked, x, topk_ids, topk_weights, self._tf)
        else:
            out = self._per_expert(i, x, topk_ids, topk_weights)
        shared = self.shared[i]
        if shared is not None:
            mlp, gate = shared
            y = gated_mlp(x, mlp.gate_up, mlp.down)  # [T, H]
            out = out + (y if gate is None else torch.sigmoid(F.linear(x, gate)) * y)
        return out

    @staticmethod
    def _grouped(st: _Stacked, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 tf=None) -> torch.Tensor:
        """All held experts in two grouped GEMMs, without a host synchronisation."""
        t, k = topk_ids.shape
        num_held = st.gate_up.shape[0]
        local = st.local[topk_ids.flatten()]  # [T*k] stack index, num_held when not held here
        order = torch.argsort(local, stable=True)  # [T*k] pairs grouped by expert
        counts = torch.zeros(num_held + 1, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, local, torch.ones_like(local))  # [E_h + 1]; bincount would sync on CUDA
        offs = counts[:num_held].cumsum(0).to(torch.int32)  # [E_h]
        tokens = order // k  # [T*k] token of each sorted pair
        xs = x[tokens]  # [T*k, H]
        gate_up = torch._grouped_mm(xs, st.gate_up.transpose(-2, -1), offs=offs)  # [T*k, 2I]
        if tf is not None:
            act = tf.silu_mul(gate_up)  # [T*k, I] in one kernel
        else:
            gate, up = gate_up.chunk(2, dim=-1)  # [T*k, I] each
            act = F.silu(gate) * up
        y = torch._grouped_mm(act, st.down.transpose(-2, -1), offs=offs)  # [T*k, H]
        # rows past the last group are not computed (their values are garbage): select, never multiply
        held = (local[order] < num_held)[:, None]  # [T*k, 1]
        w = topk_weights.flatten()[order][:, None].to(y.dtype)  # [T*k, 1]
        y = torch.where(held, y * w, torch.zeros((), dtype=y.dtype, device=y.device))
        return torch.zeros_like(x).index_add_(0, tokens, y)  # [T, H]

    def _per_expert(self, i: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        experts = self.experts[i]
        if self._one_mlp[i]:  # every selection is this one MLP: no gather, no host synchronisation
            mlp = next(iter(experts.values()))
            return torch.zeros_like(x) + gated_mlp(x, mlp.gate_up, mlp.down) * topk_weights.sum(-1, keepdim=True).to(x.dtype)
        out = torch.zeros_like(x)  # [T, H]
        # Experts that share tensors (upcycled copies) run once over the union of their tokens,
        # each token scaled by the summed weight of its selections among them.
        for members in self._groups[i]:
            sel = torch.isin(topk_ids, members)  # [T, k]
            weight = (topk_weights * sel).sum(-1)  # [T]
            tokens = sel.any(-1).nonzero().squeeze(-1)  # [n]
            if tokens.numel() == 0:
                continue
            mlp = experts[int(members[0])]
            if tokens.numel() == x.shape[0]:  # every token: no gather/scatter
                out += gated_mlp(x, mlp.gate_up, mlp.down) * weight[:, None].to(x.dtype)
                continue
            y = gated_mlp(x[tokens], mlp.gate_up, mlp.down)  # [n, H]
            out.index_add_(0, tokens, y * weight[tokens, None].to(y.dtype))
        return out
