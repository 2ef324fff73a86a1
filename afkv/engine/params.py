"""Request parameters and results of the async API."""

from __future__ import annotations

from dataclasses import dataclass, field

from afkv.errors import InvalidSamplingParamsError
from afkv.kv.pruning import KVPruning

__all__ = ["KVPruning", "SamplingParams", "RequestMetrics", "CompletionChunk", "Completion", "TopLogprobs"]

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. temperature 0 is greedy decoding.

    logprobs: the logprob of every new token is always returned; logprobs=N also returns
    the N most likely tokens at each step. prompt_logprobs=N returns, for every prompt
    token after the first, its logprob (and the top N) given the tokens before it.

    pruning: this request's KV pruning (afkv.kv.pruning: StreamingLLM or H2O), overriding the
    engine's `[kv.pruning]`; None uses the engine's, KVPruning() turns it off.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | str = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    pruning: KVPruning | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidSamplingParamsError:
            return InvalidSamplingParamsError(f"SamplingParams: {msg}")

        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
                raise bad(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {n!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.pruning is not None:
            if not isinstance(self.pruning, KVPruning):
                raise bad(f"pruning must be a KVPruning or None, got {type(self.pruning).__name__}")

            def need(ok: bool, key: str, msg: str) -> None:
                if not ok:
                    raise bad(f"pruning.{key}: {msg}")

            self.pruning.validate(need)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RequestMetrics:
    arrival_s: float  # time.monotonic() at arrival
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # time each new token was produced
    finished_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies."""
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.arrival_s


TopLogprobs = dict[int, float]


@dataclass
class CompletionChunk:
    """What `Engine.generate` yields: the tokens produced since the previous chunk."""

    request_id: int
    token_ids: list[int]
    text: str  # text delta (may lag tokens by a few characters while a stop string could still match)
    logprobs: list[float]  # logprob of each new token
    top_logprobs: list[TopLogprobs] | None  # when SamplingParams.logprobs is set
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    prompt_logprobs: list[TopLogprobs | None] | None = None  # first chunk only, when asked
    prompt_token_ids: list[int] | None = None  # first chunk only
    metrics: RequestMetrics | None = None  # last chunk only


@dataclass
class Completion:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[TopLogprobs] | None
    finish_reason: str
    prompt_logprobs: list[TopLogprobs | None] | None
    metrics: RequestMetrics
