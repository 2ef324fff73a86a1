"""ModelRunner: executes one scheduled step on the model worker thread.

The event loop hands it a step's plan (a list of ChunkPlan: plain Python values) and gets
ChunkResults (plain Python values) back; all torch work (building inputs, the forward pass,
sampling) happens here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from afkv.errors import KVError
from afkv.kv.stream import StreamRing, StreamStep
from afkv.model.graphs import DecodeGraphs, GraphCaptureError
from afkv.model.model import Model
from afkv.model.sides import DecodeRows, SeqChunk, StepInputs
from afkv.ops.attention import QuantizedKVCache
from afkv.ops.sampling import row_generator, sample_tokens, top_logprobs_batch

log = logging.getLogger("afkv.runner")


@dataclass(frozen=True)
class SampleSpec:
    temperature: float
    top_k: int
    top_p: float
    seed: int
    step: int  # index of the token being sampled within the request's output
    num_top_logprobs: int | None


@dataclass(frozen=True)
class ChunkPlan:
    seq_id: int
    token_ids: tuple[int, ...]  # tokens computed this step
    start_pos: int  # position of token_ids[0]
    block_table: tuple[int, ...]  # covers start_pos - num_dropped + len(token_ids) tokens
    sample: SampleSpec | None  # set when this chunk reaches the end of the known tokens
    prompt_targets: tuple[int, ...] = ()  # prompt tokens following each row, when prompt logprobs are asked
    num_prompt_top: int = 0
    num_dropped: int = 0  # tokens before start_pos not in block_table (pruned, or streamed): token p is in slot p - num_dropped
    score_keys: bool = False  # KV pruning (H2O): accumulate the attention mass of the cached tokens
    streamed: tuple[int, ...] = ()  # stream store ids of its context's middle, attended from host memory (afkv.kv.stream)


@dataclass
class ChunkResult:
    token_id: int | None = None
    logprob: float | None = None
    top: dict[int, float] | None = None
    prompt_logprobs: list[dict[int, float]] | None = None
    error: str | None = None  # sampling failed for this row alone (e.g. non-finite logits): its request ends
    corrupt: dict[int, str] | None = None  # streamed disk blocks of its context that failed their checks (store id
    # -> why): attention read zeros for them, so nothing of the step is kept; the scheduler recomputes its KV


def _decode_only(plan: list[ChunkPlan]) -> bool:
    return all(len(c.token_ids) == 1 and c.sample is not None and not c.prompt_targets
               and not c.num_dropped and not c.score_keys and not c.streamed for c in plan)


class ModelRunner:
    def __init__(self, model: Model, kv: torch.Tensor | QuantizedKVCache, block_size: int, device: torch.device,
                 micro_batches: int = 1, graphs: DecodeGraphs | None = None, key_mass: torch.Tensor | None = None,
                 stream: StreamRing | None = None):
        # kv: the device cache, or a quantized device tier (block ids in plans then name rows or staging blocks)
        self.model, self.kv, self.block_size, self.device = model, kv, block_size, device
        self.key_mass = key_mass  # [num_blocks, block_size] float32 (KVManager.key_mass), for H2O chunks
        self.stream = stream  # KVManager.stream_ring: streams the host-resident blocks of chunks with `streamed`
        self.micro_batches = micro_batches  # read once per step: the engine may change it between steps
        self.graphs = graphs  # CUDA graphs of decode-only steps, when the model allows them
        self.graph_steps = 0

    def _inputs(self, plan: list[ChunkPlan]) -> StepInputs:
        """Plan -> step inputs, built on the host and moved to the device in one copy."""
        bs = self.block_size
        ids, pos, blocks, offsets, tables = [], [], [], [], []
        spans = []  # per chunk: (start, length, context_len, offset of its table in `tables`, table length)
        for c in plan:
            start, n = len(ids), len(c.token_ids)
            ids.extend(c.token_ids)
            for p in range(c.start_pos, c.start_pos + n):
                pos.append(p)
                blocks.append(c.block_table[(p - c.num_dropped) // bs])
                offsets.append((p - c.num_dropped) % bs)
            ctx = c.start_pos - c.num_dropped + n  # cached tokens (slots) after this step
            nb = -(-ctx // bs)
            spans.append((start, n, ctx, len(tables), nb))
            tables.extend(c.block_table[:nb])
        singles = [s for s, c in zip(spans, plan) if s[1] == 1 and not c.score_keys and not c.streamed]
        batched = bool(singles)  # single-token chunks attend in one call of the decode kernel (split-K)
        width = max((s[4] for s in singles), default=0) if batched else 0
        extra: list[int] = []
        if batched:
            extra += [s[0] for s in singles] + [s[2] for s in singles]
            for s in singles:  # padded with block 0: masked out past each row's context
                extra += tables[s[3] : s[3] + s[4]] + [0] * (width - s[4])
        t_count = len(ids)
        flat = torch.tensor(ids + pos + blocks + offsets + tables + extra, dtype=torch.int64).to(self.device)
        cols = flat[: 4 * t_count].view(4, t_count)
        table_dev = flat[4 * t_count : 4 * t_count + len(tables)]
        streamed: list[int] = []  # every chunk's streamed store ids, in chunk order
        where: list[tuple[int, int] | None] = []  # per chunk: (first, count) of its ids in `streamed`
        for c in plan:
            where.append((len(streamed), len(c.streamed)) if c.streamed else None)
            streamed.extend(c.streamed)
        chunks = [SeqChunk(s[0], s[1], s[2], table_dev[s[3] : s[3] + s[4]], c.score_keys, w)
                  for s, c, w in zip(spans, plan, where)]
        decode = None
        if batched:
            b = len(singles)
            rest = flat[4 * t_count + len(tables) :]
            decode = DecodeRows(rest[:b], rest[2 * b :].view(b, width), rest[b : 2 * b], every_row=b == len(plan) == t_count)
        key_mass = self.key_mass if any(c.score_keys for c in plan) else None
        stream = None
        if streamed:
            if self.stream is None:
                raise KVError("a step has blocks streamed from host memory but this runner has no stream ring")
            stream = self.stream.begin(streamed)
        return StepInputs(cols[0], cols[1], cols[2], cols[3], chunks, decode, key_mass=key_mass, stream=stream)

    def _graph_logits(self, plan: list[ChunkPlan]) -> torch.Tensor | None:
        """Logits [B, V] of a decode-only step through its CUDA graph, or None to run eagerly."""
        g = self.graphs
        if g is None or not _decode_only(plan):
            return None
        bs = self.block_size
        tables = [c.block_table[: c.start_pos // bs + 1] for c in plan]
        if not g.fits(len(plan), max(len(t) for t in tables)):
            return None
        try:
            logits = g.run([c.token_ids[0] for c in plan], [c.start_pos for c in plan],
                           [c.block_table[c.start_pos // bs] for c in plan], [c.start_pos % bs for c in plan],
                           [c.start_pos + 1 for c in plan], tables, self.micro_batches)
        except GraphCaptureError as e:
            if not g.warned:
                log.warning("CUDA graphs off for this shape, running eagerly: %s", e)
                g.warned = True
            return None
        self.graph_steps += 1
        return logits

    @torch.inference_mode()
    def execute(self, plan: list[ChunkPlan]) -> list[ChunkResult]:
        logits = self._graph_logits(plan)
        if logits is not None:
            rows = list(range(len(plan)))
        else:
            inputs = self._inputs(plan)
            h = self.model.forward(inputs, self.kv, self.micro_batches)  # [T, H]
            rows = []  # rows of h whose logits are needed
            for c, chunk in zip(plan, inputs.chunks):
                rows.extend(range(chunk.start, chunk.start + len(c.prompt_targets)))
                if c.sample is not None:
                    rows.append(chunk.start + chunk.length - 1)
            if not rows:
                return _mark_corrupt(plan, [ChunkResult() for _ in plan], inputs.stream)
            logits = self.model.attn.logits(h[torch.tensor(rows, device=h.device)])  # [R, V] float32
            return _mark_corrupt(plan, self._sample(plan, logits), inputs.stream)
        return self._sample(plan, logits)

    def _sample(self, plan: list[ChunkPlan], logits: torch.Tensor) -> list[ChunkResult]:
        """Sampling, logprobs and top logprobs of every row on the device; one copy back to the host.
        The rows of `logits` are, per chunk, its prompt-target rows then its sampled row."""
        dev = logits.device
        logprobs = torch.log_softmax(logits, -1)  # [R, V]
        sample_rows, specs, target_rows, targets = [], [], [], []
        r = 0
        for c in plan:
            target_rows.extend(range(r, r + len(c.prompt_targets)))
            targets.extend(c.prompt_targets)
            r += len(c.prompt_targets)
            if c.sample is not None:
                s = c.sample
                gen = None if s.temperature == 0 else row_generator(s.seed, s.step, dev)
                sample_rows.append(r)
                specs.append((s.temperature, s.top_k, s.top_p, gen))
                r += 1
        num_top = max([c.num_prompt_top for c in plan if c.prompt_targets]
                      + [c.sample.num_top_logprobs or 0 for c in plan if c.sample is not None] + [0])
        out: dict[str, torch.Tensor] = {}
        if sample_rows:
            idx = torch.tensor(sample_rows, device=dev)
            tokens, ok = sample_tokens(logits[idx], specs)  # [S], [S]
            out["tokens"] = tokens
            out["ok"] = ok
            out["token_lp"] = logprobs[idx].gather(1, tokens[:, None])[:, 0]
        if targets:
            tidx = torch.tensor(target_rows, device=dev)
            out["target_lp"] = logprobs[tidx].gather(1, torch.tensor(targets, device=dev)[:, None])[:, 0]
        if num_top:
            out["top_lp"], out["top_ids"] = top_logprobs_batch(logprobs, min(num_top, logprobs.shape[-1]))
        host = {k: v.tolist() for k, v in out.items()}  # the step's only wait for the device
        results, r, si, ti = [], 0, 0, 0
        for c in plan:
            res = ChunkResult()
            if c.prompt_targets:
                res.prompt_logprobs = []
                for tok in c.prompt_targets:
                    entry = _top(host, r, c.num_prompt_top)
                    entry[tok] = host["target_lp"][ti]
                    res.prompt_logprobs.append(entry)
                    r += 1
                    ti += 1
            if c.sample is not None:
                if not host["ok"][si]:
                    res.error = "its logits hold NaN or +inf: there is nothing to sample from"
                res.token_id = host["tokens"][si]
                res.logprob = host["token_lp"][si]
                if c.sample.num_top_logprobs:
                    res.top = _top(host, r, c.sample.num_top_logprobs)
                r += 1
                si += 1
            results.append(res)
        return results


def _top(host: dict[str, list], row: int, n: int) -> dict[int, float]:
    if n <= 0:
        return {}
    return dict(zip(host["top_ids"][row][:n], host["top_lp"][row][:n]))


def _mark_corrupt(plan: list[ChunkPlan], results: list[ChunkResult], stream: StreamStep | None) -> list[ChunkResult]:
    """Name, in the result of each chunk, its streamed disk blocks that failed their checks this
    step (its attention read zeros for them)."""
    if stream is None or not stream.corrupt:
        return results
    for c, res in zip(plan, results):
        bad = {s: stream.corrupt[s] for s in c.streamed if s in stream.corrupt}
        if bad:
            res.corrupt = bad
    return results
