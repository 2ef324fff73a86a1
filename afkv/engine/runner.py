"""ModelRunner: executes one scheduled step on the model worker thread.

The event loop hands it a `StepPlan` of plain Python values and gets plain Python
values back; all torch work (building inputs, the forward pass, sampling) happens here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afkv.model.model import Model
from afkv.model.sides import SeqChunk, StepInputs
from afkv.ops.sampling import row_generator, sample_row, top_logprobs


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
    num_dropped: int = 0  # KV pruning: tokens before start_pos dropped from the cache; token p is in slot p - num_dropped
    score_keys: bool = False  # KV pruning (H2O): accumulate the attention mass of the cached tokens


@dataclass
class ChunkResult:
    token_id: int | None = None
    logprob: float | None = None
    top: dict[int, float] | None = None
    prompt_logprobs: list[dict[int, float]] | None = None


class ModelRunner:
    def __init__(self, model: Model, kv: torch.Tensor, block_size: int, device: torch.device, micro_batches: int = 1,
                 key_mass: torch.Tensor | None = None):
        self.model, self.kv, self.block_size, self.device = model, kv, block_size, device
        self.key_mass = key_mass  # [num_blocks, block_size] float32 (KVManager.key_mass), for H2O chunks
        self.micro_batches = micro_batches  # read once per step: the engine may change it between steps

    def _inputs(self, plan: list[ChunkPlan]) -> StepInputs:
        bs, dev = self.block_size, self.device
        ids, pos, blocks, offsets, chunks = [], [], [], [], []
        for c in plan:
            start = len(ids)
            n = len(c.token_ids)
            ids.extend(c.token_ids)
            for p in range(c.start_pos, c.start_pos + n):
                pos.append(p)
                blocks.append(c.block_table[(p - c.num_dropped) // bs])
                offsets.append((p - c.num_dropped) % bs)
            ctx = c.start_pos - c.num_dropped + n  # cached tokens (slots) after this step
            table = torch.tensor(c.block_table[: -(-ctx // bs)], dtype=torch.int64, device=dev)
            chunks.append(SeqChunk(start, n, ctx, table, c.score_keys))

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=dev)

        key_mass = self.key_mass if any(c.score_keys for c in plan) else None
        return StepInputs(t(ids), t(pos), t(blocks), t(offsets), chunks, key_mass=key_mass)

    @torch.inference_mode()
    def execute(self, plan: list[ChunkPlan]) -> list[ChunkResult]:
        inputs = self._inputs(plan)
        h = self.model.forward(inputs, self.kv, self.micro_batches)  # [T, H]
        rows: list[int] = []  # rows of h whose logits are needed
        for c, chunk in zip(plan, inputs.chunks):
            rows.extend(range(chunk.start, chunk.start + len(c.prompt_targets)))
            if c.sample is not None:
                rows.append(chunk.start + chunk.length - 1)
        if not rows:
            return [ChunkResult() for _ in plan]
        logits = self.model.attn.logits(h[torch.tensor(rows, device=h.device)])  # [R, V] float32
        logprobs = torch.log_softmax(logits, -1)  # [R, V]
        results, r = [], 0
        for c in plan:
            res = ChunkResult()
            if c.prompt_targets:
                n = len(c.prompt_targets)
                lp = logprobs[r : r + n]  # [n, V]
                target_lp = lp.gather(1, torch.tensor(c.prompt_targets, device=lp.device)[:, None])[:, 0].tolist()
                res.prompt_logprobs = []
                for j, tok in enumerate(c.prompt_targets):
                    entry = top_logprobs(lp[j], c.num_prompt_top)
                    entry[tok] = target_lp[j]
                    res.prompt_logprobs.append(entry)
                r += n
            if c.sample is not None:
                s = c.sample
                gen = None if s.temperature == 0 else row_generator(s.seed, s.step, logits.device)
                tok = sample_row(logits[r], s.temperature, s.top_k, s.top_p, gen)
                res.token_id = tok
                res.logprob = float(logprobs[r, tok])
                if s.num_top_logprobs:
                    res.top = top_logprobs(logprobs[r], s.num_top_logprobs)
                r += 1
            results.append(res)
        return results
