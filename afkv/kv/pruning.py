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

Pure policy here; the KV manager applies it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

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
