"""Sequence: one request's state inside the engine.

Owned by the Scheduler (afkv.engine.scheduler), on the loop thread: only it changes a
sequence once added; the engine reads them. Tokens pruning dropped from its cache are
counted by the KV manager (`KVManager.num_dropped`)."""

from __future__ import annotations

from enum import Enum

from afkv.engine.params import RequestMetrics, SamplingParams, TopLogprobs
from afkv.kv.pruning import KVPruning


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, seed: int, max_len: int, arrival_s: float):
        self.seq_id = seq_id
        self.params = params
        self.seed = seed
        self.token_ids: list[int] = list(prompt_ids)  # prompt + output
        self.num_prompt_tokens = len(prompt_ids)
        self.max_len = max_len  # total tokens allowed (context limit)
        self.num_computed = 0  # tokens whose KV was computed (kept in the cache, or pruned from it: KVManager.num_dropped)
        self.num_recomputes = 0  # times its KV was computed again because a streamed disk block was corrupt
        self.pruning: KVPruning | None = params.pruning  # None: the engine's default (set by the scheduler)
        self.status = SeqStatus.WAITING
        self.finish_reason: str | None = None
        self.logprobs: list[float] = []
        self.top_logprobs: list[TopLogprobs] | None = [] if params.logprobs else None
        self.prompt_logprobs: list[TopLogprobs | None] | None = [None] if params.prompt_logprobs is not None else None
        self.metrics = RequestMetrics(arrival_s=arrival_s, num_prompt_tokens=len(prompt_ids))

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None
