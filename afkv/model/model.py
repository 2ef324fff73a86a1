"""The decoder layer loop, joining the attention side to an FFN backend at the AF seam.

With m micro-batches the loop is a ping-pong (MegaScale-Infer's): while the FFN backend
works on micro-batch i of layer l, the attention side computes micro-batch i+1.

    for layer l:
        for micro-batch i:
            h_i += ffn result of (l-1, i)          # wait only for what is needed now
            h_i  = attention_l(h_i); r_i = route_l(h_i)
            submit r_i to the FFN backend          # returns at once when remote
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from afkv.model.sides import AttentionSide, AttentionSideBase, DecodeRows, FFNSide, SeqChunk, StepInputs
from afkv.model.spec import ModelSpec, UpcycleSpec, load_spec
from afkv.model.weights import CheckpointReader
from afkv.ops.kernels import Kernels, select_kernels


class FFNHandle(Protocol):
    def result(self) -> torch.Tensor: ...


class FFNBackend(Protocol):
    """What the attention side calls once per layer and micro-batch: the local FFNSide
    (colocated) or a transport to expert nodes (disaggregated). `begin_step` announces the
    micro-batch sizes of a step before its first submit."""

    def begin_step(self, mb_sizes: list[int], announce: bool = True) -> None:
        """`announce=False` sets the step's shapes without telling peers (CUDA-graph capture)."""
        ...

    def end_step(self) -> None:
        """Called after the step's last result: may wait for it (bounded) and raise on a lost peer."""
        ...

    def submit(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> FFNHandle: ...


class _Done:
    def __init__(self, y: torch.Tensor):
        self._y = y

    def result(self) -> torch.Tensor:
        return self._y


class LocalFFN:
    """Colocated backend: the FFN side runs in this process, at submit time."""

    graph_safe = True  # a step's GPU work can be captured in a CUDA graph

    def __init__(self, ffn: FFNSide):
        self.ffn = ffn

    def begin_step(self, mb_sizes: list[int], announce: bool = True) -> None:
        pass

    def end_step(self) -> None:
        pass

    def submit(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> FFNHandle:
        return _Done(self.ffn.forward(layer, x, topk_ids, topk_weights))


def split_micro_batches(inputs: StepInputs, m: int) -> list[StepInputs]:
    """Split a step into at most m micro-batches of whole sequence chunks, balanced by tokens."""
    chunks = inputs.chunks
    m = max(1, min(m, len(chunks)))
    if m == 1:
        return [inputs]
    total = sum(c.length for c in chunks)
    groups: list[list[SeqChunk]] = [[]]
    acc = 0
    for c in chunks:
        if groups[-1] and len(groups) < m and acc >= total * len(groups) / m:
            groups.append([])
        groups[-1].append(c)
        acc += c.length
    out = []
    parent = inputs.decode
    singles = 0  # single-token chunks before this group: the parent's decode rows are in chunk order
    for g in groups:
        start, end = g[0].start, g[-1].start + g[-1].length
        rows = slice(start, end)
        n = sum(c.length == 1 and not c.score_keys and c.stream is None for c in g)  # the parent's decode rows
        decode = None
        if parent is not None and n:
            sel = slice(singles, singles + n)
            decode = DecodeRows(parent.rows[sel] - start, parent.block_tables[sel], parent.context_lens[sel],
                                parent.every_row)
        singles += n
        out.append(StepInputs(
            inputs.token_ids[rows], inputs.positions[rows], inputs.slot_blocks[rows], inputs.slot_offsets[rows],
            [SeqChunk(c.start - start, c.length, c.context_len, c.block_ids, c.score_keys, c.stream) for c in g], decode,
            key_mass=inputs.key_mass, stream=inputs.stream,
        ))
    return out


@dataclass
class LayerTimings:
    """Attention-side time per micro-batch layer, accumulated (seconds; host clock: on GPUs
    this is launch time unless the FFN wait synchronises)."""

    count: int = 0
    attention_s: float = 0.0  # attention + router
    wait_s: float = 0.0  # waiting for the FFN result (idle when the FFN is remote)


class Model:
    def __init__(self, spec: ModelSpec, attn: AttentionSideBase, ffn: FFNBackend):
        self.spec, self.attn, self.ffn = spec, attn, ffn
        self.timings = LayerTimings()

    def forward(self, inputs: StepInputs, kv: torch.Tensor, micro_batches: int = 1, hooks: bool = True) -> torch.Tensor:
        """One step over the flattened chunks of all scheduled sequences -> hidden states [T, H].
        `hooks=False` leaves the FFN backend's begin_step/end_step to the caller (a CUDA graph
        captures only the GPU work; the step is announced and awaited around each replay)."""
        mbs = split_micro_batches(inputs, micro_batches)
        if hooks:
            self.ffn.begin_step([mb.token_ids.numel() for mb in mbs])
        hs = [self.attn.embed(mb.token_ids) for mb in mbs]  # m x [T_i, H]
        pending: list[FFNHandle | None] = [None] * len(mbs)
        t = self.timings
        for layer in range(self.spec.num_layers):
            for i, mb in enumerate(mbs):
                t0 = time.perf_counter()
                if pending[i] is not None:
                    hs[i] = hs[i] + pending[i].result()
                t1 = time.perf_counter()
                hs[i] = self.attn.attention(layer, hs[i], mb, kv)
                r = self.attn.route(layer, hs[i])
                pending[i] = self.ffn.submit(layer, r.x, r.topk_ids, r.topk_weights)
                t.count += 1
                t.wait_s += t1 - t0
                t.attention_s += time.perf_counter() - t1
        hs = [h + p.result() for h, p in zip(hs, pending)]
        if hooks:
            self.ffn.end_step()
        return hs[0] if len(hs) == 1 else torch.cat(hs)


def open_checkpoint(model: str | Path, upcycle: UpcycleSpec | None = None, expert_dtype: str = "auto"):
    """-> (spec, reader) of a checkpoint directory, or of `random:<name>` real-shape weights;
    `expert_dtype` (auto | fp8) is how the routed experts are to be held (ModelSpec)."""
    from afkv.model.random import RandomCheckpoint, is_random, random_spec

    if is_random(str(model)):
        spec = random_spec(str(model))
        reader = RandomCheckpoint(spec)
    else:
        spec = load_spec(model)
        if upcycle is not None:
            spec = spec.with_upcycle(upcycle)
        reader = CheckpointReader(model, spec.fp8_block)
    if expert_dtype != "auto":
        spec = spec.with_expert_dtype(expert_dtype)
    return spec, reader


def attention_side(spec: ModelSpec, reader, device: torch.device, dtype: torch.dtype,
                   kernels: Kernels | None = None) -> AttentionSideBase:
    """The attention side of a model's family: MLA for DeepSeek, else RoPE + GQA."""
    if spec.is_mla:
        from afkv.model.deepseek import MLAAttentionSide

        return MLAAttentionSide(spec, reader, device, dtype, kernels)
    return AttentionSide(spec, reader, device, dtype, kernels)


def load_attention_side(model_dir: str | Path, device: torch.device, dtype: torch.dtype,
                        upcycle: UpcycleSpec | None = None, expert_dtype: str = "auto",
                        kernels: Kernels | None = None) -> tuple[ModelSpec, AttentionSideBase]:
    spec, reader = open_checkpoint(model_dir, upcycle, expert_dtype)
    try:
        return spec, attention_side(spec, reader, device, dtype, kernels)
    finally:
        reader.close()


def load_ffn_side(spec: ModelSpec, model_dir: str | Path, device: torch.device, dtype: torch.dtype,
                  expert_ids: frozenset[int] | dict[int, frozenset[int]] | None = None,
                  dense_layers: frozenset[int] | None = None,
                  expert_tensors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
                  kernels: Kernels | None = None) -> FFNSide:
    """`expert_ids`: all, the same ids in every layer, or per layer; `expert_tensors`: (layer,
    expert) -> tensors at hand, not read from the checkpoint (see FFNSide)."""
    _, reader = open_checkpoint(model_dir, spec.upcycle)
    try:
        return FFNSide(spec, reader, device, dtype, expert_ids, dense_layers, expert_tensors, kernels)
    finally:
        reader.close()


def load_colocated(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype, upcycle: UpcycleSpec | None = None,
    expert_dtype: str = "auto",
) -> Model:
    """Both halves in one process (the baseline every disaggregated topology is compared to);
    the kernels are chosen once for both."""
    kernels = select_kernels(device)
    spec, attn = load_attention_side(model_dir, device, dtype, upcycle, expert_dtype, kernels)
    return Model(spec, attn, LocalFFN(load_ffn_side(spec, model_dir, device, dtype, kernels=kernels)))
