"""KV pruning: which cached tokens of a sequence to keep (StreamingLLM, H2O).

A pruned sequence's tokens are decoupled from its KV slots: its kept tokens occupy slots
0 .. num_slots - 1 in position order (keys keep the RoPE rotation of their true position),
and token p of a sequence that has dropped d tokens before it sits in slot p - d. Slot s
lives at (block_table[s // block_size], s % block_size).

    streaming   attention sinks (the first num_sink_tokens) + the last `window` cached
                tokens. Block granularity: whole blocks strictly between the blocks holding
                the sinks and the blocks holding the window are dropped from the table (no
                copy); the first ceil(num_sink_tokens / block_size) blocks stay whole.
    h2o         heavy hitters under `budget` tokens: the sinks, the last `window` tokens and
                the budget - num_sink_tokens - window other tokens with the largest
                accumulated attention mass (summed over query heads, queries and layers).
                Token granularity: once a sequence holds budget + block_size slots, the kept
                tokens are compacted into its first ceil(budget / block_size) blocks and the
                rest of its blocks go back to the pool (one copy of at most `budget` tokens x
                all layers every block_size new tokens).

The policy (`KVPruning`, `streaming_drop`, `h2o_keep`) and `PruningState`, the per-sequence
state the KV manager asks: which sequences prune, how many tokens each dropped (the one
count: the scheduler reads it), and the H2O copies queued for the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import torch

from afkv.kv.block_pool import BlockPool
from afkv.kv.checks import owned
from afkv.kv.layout import Layout
from afkv.kv.metrics import KVMetrics

log = logging.getLogger("afkv.kv")

POLICIES = ("none", "streaming", "h2o")


@dataclass(frozen=True)
class KVPruning:
    """How to prune one sequence's KV cache (`[kv.pruning]` in the config, or per request
    through SamplingParams.pruning). Validated by `validate`, not on construction, so the
    caller names the source (config file and key, or the request)."""

    policy: str = "none"  # none | streaming | h2o
    num_sink_tokens: int = 4  # first tokens always kept (attention sinks)
    window: int = 256  # most recent cached tokens always kept
    budget: int = 0  # h2o: tokens kept in all (sinks + window + heavy hitters); streaming: must be 0

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    @property
    def needs_scores(self) -> bool:
        """Whether attention must accumulate the mass each cached token receives."""
        return self.policy == "h2o"

    def validate(self, need: Callable[[bool, str, str], None]) -> None:
        """need(ok, key, message) for each rule; keys are field names."""
        need(self.policy in POLICIES, "policy", f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for key in ("num_sink_tokens", "window", "budget"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool), key, f"{key} must be an integer, got {value!r}")
        need(self.num_sink_tokens >= 0, "num_sink_tokens", f"num_sink_tokens must be >= 0, got {self.num_sink_tokens}")
        need(self.window >= 1, "window", f"window must be >= 1 (the newest token is always kept), got {self.window}")
        need(self.budget >= 0, "budget", f"budget must be >= 0, got {self.budget}")
        if self.policy == "streaming":
            need(self.budget == 0, "budget",
                 f"budget is for policy 'h2o'; streaming keeps num_sink_tokens + window, got budget {self.budget}")
        if self.policy == "h2o":
            need(self.budget > self.num_sink_tokens + self.window, "budget",
                 f"h2o budget ({self.budget}) must exceed num_sink_tokens + window "
                 f"({self.num_sink_tokens} + {self.window}) to leave room for heavy hitters")


def streaming_drop(num_slots: int, block_size: int, spec: KVPruning) -> range:
    """Table indexes of the blocks StreamingLLM drops from a sequence holding num_slots
    cached tokens: the full blocks after the sink blocks that hold no token of the window."""
    first = -(-spec.num_sink_tokens // block_size)  # sink blocks stay whole
    end = max(0, num_slots - spec.window) // block_size  # blocks before the window's first block
    return range(first, max(first, end))


def h2o_should_prune(num_slots: int, block_size: int, spec: KVPruning) -> bool:
    """Compact once at least one whole block can be freed (amortises the copy over block_size tokens)."""
    return num_slots >= spec.budget + block_size


def h2o_keep(scores: torch.Tensor, spec: KVPruning) -> torch.Tensor:
    """scores [N] accumulated attention mass per cached slot -> sorted slot indexes to keep
    [min(N, budget)] int64: sinks, the last `window` slots, and the highest-scoring slots
    in between (ties go to the earlier slot)."""
    n = scores.shape[0]
    if n <= spec.budget:
        return torch.arange(n, device=scores.device)
    sinks = min(spec.num_sink_tokens, n)
    recent_start = max(sinks, n - spec.window)
    num_heavy = spec.budget - sinks - (n - recent_start)
    middle = scores[sinks:recent_start]  # [M]
    order = torch.sort(middle, descending=True, stable=True).indices[:num_heavy] + sinks  # [num_heavy]
    keep = torch.cat([torch.arange(sinks, device=scores.device), order,
                      torch.arange(recent_start, n, device=scores.device)])  # [budget]
    return torch.sort(keep).values


class PruningState:
    """Owner of these fields (loop thread only):

    _specs     sequence id -> its pruning spec (pruned sequences only)
    _private   sequence ids that register no blocks (H2O from the start; others once pruned)
    _dropped   sequence id -> tokens pruning dropped from its cache (its slots = tokens - dropped)
    _compact   H2O compactions queued for the next flush: (old table, slots held, spec)
    _zero      blocks whose key mass is reset at the next flush (new blocks of H2O sequences)

    `key_mass` [num_blocks, block_size] float32: the attention mass each cached token received
    (H2O), accumulated by attention on the worker, moved with its token by compaction. `kv` is
    the device cache H2O compacts in place (a device tier that `writes_in_place`)."""

    def __init__(self, layout: Layout, pool: BlockPool, kv: torch.Tensor, metrics: KVMetrics,
                 in_place: bool):
        self.layout, self.pool, self.kv, self.metrics = layout, pool, kv, metrics
        self.in_place = in_place  # False: H2O is not available (its requests run unpruned)
        self.key_mass = torch.zeros((pool.num_blocks, layout.block_size), dtype=torch.float32, device=kv.device)
        self._specs: dict[int, KVPruning] = {}
        self._private: set[int] = set()
        self._dropped: dict[int, int] = {}
        self._compact: list[tuple[tuple[int, ...], int, KVPruning]] = []
        self._zero: list[int] = []
        self._warned_h2o = False

    def admit(self, seq_id: int, spec: KVPruning | None) -> bool:
        """Start a sequence under `spec` -> whether it may reuse (and register) prefix blocks
        (an H2O sequence neither reuses nor registers: it writes its slots in place)."""
        if spec is not None and spec.needs_scores and not self.in_place:
            if not self._warned_h2o:
                log.warning("H2O pruning rewrites cached slots in place: not available with a quantized "
                            "device tier ([kv] device_format); such requests run without pruning")
                self._warned_h2o = True
            self.metrics.counters["pruning_unsupported"] += 1
            spec = None
        if spec is None or not spec.enabled:
            return True
        self._specs[seq_id] = spec
        if spec.needs_scores:
            self._private.add(seq_id)
            return False
        return True

    def prunes(self, seq_id: int) -> bool:
        """Whether the sequence runs under a pruning policy."""
        return seq_id in self._specs

    def is_private(self, seq_id: int) -> bool:
        return seq_id in self._private

    def num_dropped(self, seq_id: int) -> int:
        """Tokens pruned from the sequence's cache so far: token p sits in slot p - num_dropped."""
        return self._dropped.get(seq_id, 0)

    def grew(self, seq_id: int, block_ids: Sequence[int]) -> None:
        spec = self._specs.get(seq_id)
        if spec is not None and spec.needs_scores:
            self._zero.extend(block_ids)

    def prune(self, seq_id: int, table: list[int], num_slots: int, release: Callable[[Sequence[int]], None]) -> int:
        """Apply the sequence's policy to its num_slots cached tokens: edits `table` and hands
        the blocks it drops to `release`. -> tokens dropped (0: nothing to do yet)."""
        spec = self._specs.get(seq_id)
        if spec is None:
            return 0
        bs = self.layout.block_size
        if num_slots > len(table) * bs:
            owned(False, f"sequence {seq_id}: {num_slots} cached tokens but {len(table)} blocks")
        if spec.policy == "streaming":
            drop = streaming_drop(num_slots, bs, spec)
            if not drop:
                return 0
            release(table[drop.start : drop.stop])
            del table[drop.start : drop.stop]
            dropped = len(drop) * bs
        else:
            if not h2o_should_prune(num_slots, bs, spec):
                return 0
            self._compact.append((tuple(table[: self.layout.num_blocks_for(num_slots)]), num_slots, spec))
            keep_blocks = self.layout.num_blocks_for(spec.budget)
            release(table[keep_blocks:])
            del table[keep_blocks:]
            dropped = num_slots - spec.budget
        self._private.add(seq_id)
        self._dropped[seq_id] = self._dropped.get(seq_id, 0) + dropped
        self.metrics.counters["pruned_tokens"] += dropped
        return dropped

    def forget(self, seq_id: int) -> None:
        self._specs.pop(seq_id, None)
        self._private.discard(seq_id)
        self._dropped.pop(seq_id, None)

    def flush(self, worker: Executor) -> Future | None:
        """Submit the queued H2O copies (first in a pass: they read blocks this pass released,
        which tier copies of this pass may fill)."""
        if not (self._compact or self._zero):
            return None
        job = worker.submit(self._run, self._compact, self._zero)
        self._compact, self._zero = [], []
        return job

    def _run(self, compactions: list[tuple[tuple[int, ...], int, KVPruning]], zero: list[int]) -> None:
        """Worker: H2O compactions (keys, values and key mass move with their token), then
        reset the key mass of blocks new to H2O sequences."""
        bs = self.layout.block_size
        device = self.kv.device
        with torch.inference_mode():
            for table, num_slots, spec in compactions:
                blocks = torch.tensor(table, dtype=torch.int64, device=device)  # [nb]
                slots = (blocks[:, None] * bs + torch.arange(bs, device=device)).flatten()[:num_slots]  # [N]
                mass = self.key_mass.view(-1)  # [num_blocks * bs]
                keep = h2o_keep(mass[slots], spec)  # [K] sorted slot indexes
                moved = keep != torch.arange(keep.shape[0], device=device)  # [K]
                src = slots[keep[moved]]  # [M] flat slot ids
                dst = slots[: keep.shape[0]][moved]  # [M]
                values = self.kv[src // bs, :, :, src % bs]  # [M, L, 2, Hkv, D] (a copy: safe to overwrite src)
                self.kv[dst // bs, :, :, dst % bs] = values
                mass[dst] = mass[src]
            if zero:
                self.key_mass[torch.tensor(zero, dtype=torch.int64, device=device)] = 0

    def check_invariants(self, tables: dict[int, list[int]]) -> None:
        owned(set(self._specs) <= set(tables) and self._private <= set(tables), "pruning state of a freed sequence")
        for seq_id, spec in self._specs.items():
            if spec.needs_scores:  # H2O blocks are written in place: never shared
                owned(seq_id in self._private, f"H2O sequence {seq_id} registers blocks")
                owned(all(self.pool.ref_count(b) == 1 for b in tables[seq_id]), f"H2O sequence {seq_id} shares a block")
