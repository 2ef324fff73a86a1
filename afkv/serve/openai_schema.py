"""The OpenAI API's request schemas (pydantic) and the JSON afkv answers with.

Requests are validated here: a field out of range is a 400 before the engine sees it, and a
field afkv does not implement with a value that would change the answer (n > 1, echo,
penalties, logit_bias, tools, json response formats) is refused by name rather than ignored.
Unknown fields are ignored, as OpenAI-compatible servers do. Responses are plain dicts
(built once per chunk on the hot path, no model validation).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from afkv.engine.params import MAX_LOGPROBS, CompletionChunk, SamplingParams
from afkv.errors import InvalidSamplingParamsError
from afkv.model.tokenizer import Tokenizer

MAX_TOKENS_UNBOUNDED = 2**31 - 1  # no max_tokens: the request runs to the end of the context


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # afkv (and vLLM) extensions
    top_k: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def _refuse_unsupported(self) -> None:
        def refuse(field: str, why: str) -> None:
            raise InvalidSamplingParamsError(f"{field}: {why}")

        if self.n != 1:
            refuse("n", "afkv returns one choice per request (n = 1); send n requests")
        if self.presence_penalty or self.frequency_penalty:
            refuse("presence_penalty" if self.presence_penalty else "frequency_penalty", "penalties are not supported")
        if self.logit_bias:
            refuse("logit_bias", "not supported")
        if self.stream_options is not None and not self.stream:
            refuse("stream_options", "only allowed with stream = true")

    def _params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=MAX_TOKENS_UNBOUNDED if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def engine_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise InvalidSamplingParamsError("prompt: afkv takes one prompt per request; send one request each")
            p = p[0]
        return p

    def sampling_params(self) -> SamplingParams:
        self._refuse_unsupported()
        if self.echo:
            raise InvalidSamplingParamsError("echo: not supported")
        if self.best_of not in (None, 1):
            raise InvalidSamplingParamsError("best_of: only 1 is supported")
        if self.suffix:
            raise InvalidSamplingParamsError("suffix: not supported")
        return self._params(self.max_tokens, self.logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def to_engine(self) -> dict:
        c = self.content
        text = c if isinstance(c, str) else "".join(p.text for p in c or ())
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "text"


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = None
    response_format: ResponseFormat | None = None

    def engine_prompt(self) -> list[dict]:
        return [m.to_engine() for m in self.messages]

    def sampling_params(self) -> SamplingParams:
        self._refuse_unsupported()
        if self.tools:
            raise InvalidSamplingParamsError("tools: tool calls are not supported")
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidSamplingParamsError(f"response_format: {self.response_format.type!r} is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidSamplingParamsError("top_logprobs: needs logprobs = true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._params(max_tokens, (self.top_logprobs or None) if self.logprobs else None)


# ---- responses ----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def completion_logprobs(tokenizer: Tokenizer | None, chunk: CompletionChunk, text_offset: int) -> dict:
    """Legacy completions logprobs of one chunk's tokens: tokens, token_logprobs, top_logprobs,
    text_offset (each token's start in the output text, counting its text alone)."""
    tokens = [_token_text(tokenizer, t) for t in chunk.token_ids]
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    tops = chunk.top_logprobs or [None] * len(tokens)
    return {
        "tokens": tokens,
        "token_logprobs": chunk.logprobs,
        "top_logprobs": [None if top is None else {_token_text(tokenizer, i): lp for i, lp in top.items()}
                         for top in tops],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Tokenizer | None, chunk: CompletionChunk) -> list[dict]:
    """Chat logprobs entries of one chunk's tokens (`logprobs.content`)."""
    tops = chunk.top_logprobs or [{}] * len(chunk.token_ids)
    return [dict(_token_entry(tokenizer, t, lp), top_logprobs=[_token_entry(tokenizer, i, v) for i, v in top.items()])
            for t, lp, top in zip(chunk.token_ids, chunk.logprobs, tops)]


def _token_entry(tokenizer: Tokenizer | None, token_id: int, logprob: float) -> dict:
    text = _token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    return tokenizer.token_text(token_id) if tokenizer is not None else f"token_id:{token_id}"
