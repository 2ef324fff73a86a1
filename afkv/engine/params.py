"""Request parameters and results of the async API."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from afkv.errors import InvalidSamplingParamsError
from afkv.kv.pruning import KVPruning

__all__ = ["KVPruning", "SamplingParams", "RequestMetrics", "CompletionChunk", "Completion", "TopLogprobs"]

MAX_LOGPROBS = 20
MIN_TEMPERATURE = 1e-3  # below it (but 0) sampling is greedy in all but name: refused, use 0
MAX_TEMPERATURE = 100.0
SEED_RANGE = (-(2**63), 2**64)  # what msgpack carries


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int in Python


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value))


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. temperature 0 is greedy decoding, else a number in
    [MIN_TEMPERATURE, MAX_TEMPERATURE]. Every field is checked with its exact type (True is
    not an int here); a bad value raises InvalidSamplingParamsError naming the field.

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
        """Exact types (a bool is not an int here, NaN is not a number), and ranges."""
        def bad(msg: str) -> InvalidSamplingParamsError:
            return InvalidSamplingParamsError(f"SamplingParams: {msg}")

        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
            raise bad(f"stop must be a non-empty string or a list of them, got {self.stop!r:.200}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(
                not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r:.200}")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise bad(f"max_tokens must be a positive integer, got {self.max_tokens!r:.50}")
        t = self.temperature
        if not _is_real(t) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise bad(f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                      f"got {t!r:.50}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r:.50}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad(f"top_p must be a number in (0, 1], got {self.top_p!r:.50}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise bad(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r:.50}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (not _is_int(n) or not 0 <= n <= MAX_LOGPROBS):
                raise bad(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {n!r:.50}")
        if not isinstance(self.ignore_eos, bool):
            raise bad(f"ignore_eos must be a bool, got {self.ignore_eos!r:.50}")
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
    num_handoff_tokens: int = 0  # PD decode node: prompt tokens whose KV blocks a prefill node handed over
    handoff_ack_s: float | None = None  # PD decode node: when the prefill node acknowledged (its carrier open)
    handoff_end_s: float | None = None  # PD decode node: when the hand-off ended (its last block landed)

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
