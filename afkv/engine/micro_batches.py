"""MicroBatchTuner: how many micro-batches m a disaggregated decode step uses when
`[deployment] micro_batches = 0`, chosen from the step times this engine measures.

Why measured, not a formula: MegaScale-Infer's rule m >= 2(1 + T_c / T_f) assumes that the
expert side's time per micro-batch shrinks with its rows. Below a few hundred rows per expert
an expert node is bound by reading the touched experts' weights, once per micro-batch, so its
time grows with m instead: on 2x H200 (afkv/bench/RESULTS.md, 1A1F, Qwen3-30B-A3B and
Mixtral-8x7B shapes) m = 2 was slower than m = 1 at every batch. Whether m >= 2 pays depends on
the model, the batch, the context and how many attention nodes an expert node serves, so the
engine times the candidates and keeps the fastest.

Policy, per bucket of decode rows (the step's rows rounded up to a power of two):
- candidates: 1, 2 and the rule's m (`rule_m`, in [2, 4]), each at most the bucket's rows;
- measuring: candidates take turns; a candidate's first `warmup` steps in the bucket are not
  counted (a CUDA graph of a new shape is captured in them), then `trials` steps each;
- the bucket then runs the candidate with the lowest median seconds per decode row, and after
  `period` steps on it measures again (the context grows, other attention nodes' loads change).
Steps with prompt tokens (prefill chunks) are not counted; they run the m of their rows' bucket.

Owner: the engine's event loop (a few comparisons per step, no torch work).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    seen: dict[int, int] = field(default_factory=dict)  # m -> steps run while measuring (warm-up included)
    times: dict[int, list[float]] = field(default_factory=dict)  # m -> counted seconds per row
    best: int | None = None  # chosen m once every candidate is measured
    since: int = 0  # counted steps on `best` since it was chosen


class MicroBatchTuner:
    def __init__(self, warmup: int = 2, trials: int = 5, period: int = 512):
        if warmup < 0 or trials < 1 or period < 1:
            raise ValueError(f"warmup >= 0, trials >= 1, period >= 1; got {warmup}, {trials}, {period}")
        self.warmup, self.trials, self.period = warmup, trials, period
        self._buckets: dict[int, _Bucket] = {}
        self.rule_m = 2

    @property
    def choices(self) -> dict[int, int]:
        """Bucket -> the m it runs, for the buckets measured so far."""
        return {b: st.best for b, st in self._buckets.items() if st.best is not None}

    @staticmethod
    def bucket(rows: int) -> int:
        return 1 << max(0, rows - 1).bit_length()

    def candidates(self, rows: int) -> list[int]:
        b = self.bucket(rows)
        return sorted({m for m in (1, 2, self.rule_m) if m <= b})

    def choose(self, rows: int) -> int:
        """m for a step with `rows` decode rows (or a prefill step of that many sequences)."""
        state = self._buckets.setdefault(self.bucket(rows), _Bucket())
        if state.best is not None:
            return state.best
        # measuring: the candidate furthest from done (fewest steps), lowest m first
        return min(self.candidates(rows), key=lambda m: (state.seen.get(m, 0), m))

    def observe(self, rows: int, m: int, seconds: float, decode_only: bool) -> None:
        """A step of `rows` rows ran with m micro-batches in `seconds`."""
        if not decode_only or rows < 1:
            return
        b = self.bucket(rows)
        state = self._buckets.setdefault(b, _Bucket())
        if state.best is not None:
            state.since += 1
            if state.since >= self.period:  # measure again
                self._buckets[b] = _Bucket()
            return
        if m not in self.candidates(rows):  # set from outside while measuring (rule_m changed)
            return
        n = state.seen[m] = state.seen.get(m, 0) + 1
        if n > self.warmup:
            state.times.setdefault(m, []).append(seconds / rows)
        cands = self.candidates(rows)
        if all(len(state.times.get(c, ())) >= self.trials for c in cands):
            state.best = min(cands, key=lambda c: (statistics.median(state.times[c]), c))
