"""Scheduler: continuous batching with chunked prefill (loop thread only).

Every step, each running sequence gets the tokens it still has to compute (one for a
decoding sequence, a chunk of the prompt for a prefilling one) within a token budget;
waiting sequences are admitted while budget, sequence slots and KV blocks allow. When
KV blocks run out, the most recently admitted running sequence is preempted: its blocks
are freed (its sampled tokens are kept). Its full blocks stay cached, and with tiers below
the device they are demoted rather than lost when their slots are reused, so readmission
finds its prefix again (swapped out, not recomputed; only the last partial block is).

With a disk tier, a waiting sequence whose prefix is partly on disk is *loading* while
those blocks are read: it keeps its place and the sequences behind it may be admitted
first. The next `prefetch_depth` waiting sequences get their disk blocks read ahead.

KV pruning (afkv.kv.pruning; a request's own or the engine's `[kv.pruning]`): before a running
sequence's table grows, the KV manager drops what its policy says and counts the dropped
tokens (`kv.num_dropped`, the one count), so token p is computed into slot p - num_dropped. A preempted
pruned sequence recomputes from its tokens (pruning again as it goes).

After a step, `postprocess` commits it: computed tokens and their KV, prompt logprobs, the
sampled token, a finish by token rules (EOS, stop token ids, length), or the failure of a
request whose sampling failed. The engine adds what only text can tell (a stop string) with
`finish`, and ends requests with `abort` and `fail`. These are the only places a sequence
changes after it was added (nano-vllm's `postprocess` shape).

Contexts larger than the device (`[kv] stream_*`, afkv.kv.stream): before a running sequence's
table grows, the KV manager also moves the middle of a long sequence to host memory (`kv.place`),
counted in the same `num_dropped`; its plan names those blocks, which attention streams. A step
in which a streamed disk block of a sequence failed its checks (ChunkResult.corrupt) is not
committed for it: the sequence goes back to the head of the waiting queue with its blocks freed
and computes its KV again from its tokens (the preemption path), at most
MAX_STREAM_RECOMPUTES times; after that its request fails (a disk that corrupts what it is given).

KV transfers: `schedule` collects finished ones first (`kv.poll`) and submits the ones it
queued last (`kv.flush`), before the engine submits the step it planned.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from itertools import islice

from afkv.engine.runner import ChunkPlan, ChunkResult, SampleSpec
from afkv.engine.sequence import Sequence, SeqStatus
from afkv.kv.manager import KVManager
from afkv.kv.pruning import KVPruning

log = logging.getLogger("afkv.scheduler")

MAX_STREAM_RECOMPUTES = 2  # per sequence: corrupt streamed disk blocks recomputed, then its request fails


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int


class Scheduler:
    """Owner of the waiting queue, the running list, the set of sequences prefetched, and of
    every Sequence added to it (the engine only reads them).

    Waiting sequences hold KV blocks only while their prefix is loading (and within one
    `schedule` call): one that cannot get blocks releases them, along with every other
    waiting sequence that is not loading, so with nothing running the head always fits."""

    def __init__(self, kv: KVManager, limits: SchedulerLimits, pruning: KVPruning | None = None,
                 eos_ids: frozenset[int] = frozenset()):
        self.kv = kv
        self.limits = limits
        self.pruning = pruning or KVPruning()  # for requests that do not set their own
        self.eos_ids = eos_ids  # sampled, they end a request (unless it ignores EOS)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # of the sequences added
        self.num_cached_prompt_tokens = 0  # found in the cache, counted at each request's first token
        self.num_generated_tokens = 0
        self._prefetched: set[int] = set()  # waiting sequence ids whose disk blocks were read ahead

    def add(self, seq: Sequence) -> None:
        if seq.pruning is None:
            seq.pruning = self.pruning
        self.waiting.append(seq)
        self.num_prompt_tokens += seq.num_prompt_tokens

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _remove(self, seq: Sequence) -> None:
        """Take a sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._prefetched.discard(seq.seq_id)
        self.kv.free(seq.seq_id)

    def finish(self, seq: Sequence, reason: str, now: float) -> None:
        """End a sequence that completed ("stop", "length")."""
        self._remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.metrics.finished_s = now

    def abort(self, seq: Sequence) -> None:
        """End a sequence its caller gave up on."""
        self._remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = "abort"

    def fail(self, seq: Sequence) -> None:
        """End a sequence by a fault (its request gets the error)."""
        self._remove(seq)
        seq.status = SeqStatus.FINISHED

    def _num_slots(self, seq: Sequence) -> int:
        """Tokens of `seq` held in the KV cache."""
        return seq.num_computed - self.kv.num_dropped(seq.seq_id)

    def _requeue(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and put it first in the waiting queue: it computes its
        KV again from its tokens (prompt and sampled ones; cached prefix blocks are found again)."""
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._requeue(seq)
        self.num_preemptions += 1

    def _recompute_corrupt(self, seq: Sequence, res: ChunkResult) -> bool:
        """A streamed disk block of the sequence failed its checks this step: requeue it to
        compute its KV again (-> True), or, past MAX_STREAM_RECOMPUTES, set res.error (-> False)."""
        assert res.corrupt
        self.kv.count_corrupt(len(res.corrupt))
        sid, why = next(iter(res.corrupt.items()))
        if seq.num_recomputes >= MAX_STREAM_RECOMPUTES:
            res.error = (f"streamed KV block {sid} is corrupt on disk ({why}), after its KV was computed again "
                         f"{seq.num_recomputes} times")
            return False
        seq.num_recomputes += 1
        log.warning("request %d: streamed KV block %d is corrupt on disk (%s); computing its %d tokens again",
                    seq.seq_id, sid, why, seq.num_computed)
        self._requeue(seq)
        return True

    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> [(sequence, number of tokens to compute this step)]; empty when idle or blocked."""
        self.kv.poll()
        budget = self.limits.max_num_batched_tokens
        step: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            self.kv.prune(seq.seq_id, self._num_slots(seq))
            self.kv.place(seq.seq_id, self._num_slots(seq))
            n = min(seq.num_uncomputed, budget)
            while not self.kv.allocate(seq.seq_id, self._num_slots(seq) + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                step.append((seq, n))
                budget -= n
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[i]
            if not self.kv.has(seq.seq_id):
                # prompt logprobs need logits at every prompt position: no prefix reuse
                self.kv.match_prefix(seq.seq_id, [] if seq.wants_prompt_logprobs else seq.token_ids, seq.pruning)
            cached = self.kv.settle(seq.seq_id)
            if cached is None:  # its prefix is still coming from disk
                i += 1
                continue
            seq.num_computed = cached
            if seq.metrics.first_token_s is None:  # tokens a prefill node handed over were not cached here
                seq.metrics.num_cached_tokens = min(cached, seq.num_prompt_tokens) - seq.metrics.num_handoff_tokens
            n = min(seq.num_uncomputed, budget)
            if not self.kv.allocate(seq.seq_id, seq.num_computed + n):
                if self._release_waiting(keep=seq):
                    continue  # try again with the blocks the others held
                self.kv.free(seq.seq_id)
                seq.num_computed = 0
                break
            del self.waiting[i]
            self._prefetched.discard(seq.seq_id)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            step.append((seq, n))
            budget -= n
        self._prefetch()
        self.kv.flush()
        return step

    def _release_waiting(self, keep: Sequence) -> bool:
        """Free the blocks of every other waiting sequence that is not loading (their full
        blocks stay cached and are found again at their next admission). -> whether any."""
        released = False
        for seq in self.waiting:
            if seq is not keep and self.kv.has(seq.seq_id) and not self.kv.is_loading(seq.seq_id):
                self.kv.free(seq.seq_id)
                seq.num_computed = 0
                released = True
        return released

    def _prefetch(self) -> None:
        """Start reading from disk the prefix blocks of the next waiting sequences."""
        for seq in islice(self.waiting, self.kv.prefetch_depth):
            if (seq.seq_id in self._prefetched or self.kv.has(seq.seq_id) or seq.wants_prompt_logprobs
                    or seq.pruning.needs_scores):  # H2O sequences reuse no prefix
                continue
            self.kv.prefetch(seq.token_ids)
            self._prefetched.add(seq.seq_id)

    def plan(self, step: list[tuple[Sequence, int]]) -> list[ChunkPlan]:
        out = []
        num_streamed = 0
        for seq, n in step:
            start = seq.num_computed
            end = start + n
            sample = None
            if end == len(seq.token_ids):
                p = seq.params
                sample = SampleSpec(p.temperature, p.top_k, p.top_p, seq.seed, seq.num_output_tokens, p.logprobs)
            targets: tuple[int, ...] = ()
            if seq.wants_prompt_logprobs and start < seq.num_prompt_tokens - 1:
                targets = tuple(seq.token_ids[start + 1 : min(end, seq.num_prompt_tokens - 1) + 1])
            out.append(
                ChunkPlan(
                    seq_id=seq.seq_id,
                    token_ids=tuple(seq.token_ids[start:end]),
                    start_pos=start,
                    block_table=tuple(self.kv.block_table(seq.seq_id)),
                    num_dropped=self.kv.num_dropped(seq.seq_id),
                    score_keys=seq.pruning.needs_scores,
                    streamed=tuple(self.kv.streamed_blocks(seq.seq_id)),
                    sample=sample,
                    prompt_targets=targets,
                    num_prompt_top=seq.params.prompt_logprobs or 0,
                )
            )
            num_streamed += len(out[-1].streamed)
        self.kv.count_streamed(num_streamed)
        return out

    def postprocess(self, step: list[tuple[Sequence, int]], plan: list[ChunkPlan], results: list[ChunkResult],
                    now: float, skip: set[int] = frozenset()) -> list[tuple[Sequence, ChunkResult, str | None]]:
        """Commit a computed step. Per running sequence (not in `skip`: aborted meanwhile): its
        chunk's tokens are computed and their full blocks registered, prompt logprobs kept, the
        sampled token appended; a sequence whose sampling failed is failed instead, one that read a
        corrupt streamed block computes its KV again (_recompute_corrupt). -> (sequence,
        its result, finish reason by token rules or None) for each sequence that failed or got a
        token; a finish reason is not applied yet (the engine may find a stop string first)."""
        out = []
        for (seq, n), chunk, res in zip(step, plan, results):
            if seq.seq_id in skip or seq.status is not SeqStatus.RUNNING:
                continue
            if res.corrupt and self._recompute_corrupt(seq, res):
                continue
            if res.error is not None:  # this request alone: the others of the step go on
                self.fail(seq)
                out.append((seq, res, None))
                continue
            seq.num_computed += n
            self.kv.commit(seq.seq_id, seq.token_ids, seq.num_computed)
            if res.prompt_logprobs:
                for j, entry in enumerate(res.prompt_logprobs):
                    pos = chunk.start_pos + 1 + j
                    while len(seq.prompt_logprobs) <= pos:
                        seq.prompt_logprobs.append(None)
                    seq.prompt_logprobs[pos] = entry
            if res.token_id is None:
                continue
            tok = res.token_id
            seq.token_ids.append(tok)
            seq.logprobs.append(res.logprob)
            if seq.top_logprobs is not None:
                seq.top_logprobs.append(res.top or {})
            m = seq.metrics
            if m.first_token_s is None:
                m.first_token_s = now
                self.num_cached_prompt_tokens += m.num_cached_tokens
            m.token_times_s.append(now)
            self.num_generated_tokens += 1
            p = seq.params
            finish = None
            if (not p.ignore_eos and tok in self.eos_ids) or tok in p.stop_token_ids:
                finish = "stop"
            elif seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= seq.max_len:
                finish = "length"
            out.append((seq, res, finish))
        return out
