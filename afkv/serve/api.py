"""API server of an attention node: serves an Engine to remote clients (afkv.serve.client).

Messages (msgpack over the control plane, afkv.transport.control):
    client -> node   {"type": "generate", "rid", "prompt", "params"}     request: "ack" once started
    node -> client   {"type": "chunk", "rid", "chunk", "free_kv"} ...     the last has finish_reason;
                                                                          free_kv: Engine.free_kv_tokens
                     {"type": "failed", "rid", "error"}                    error: afkv.errors.error_to_wire
    client -> node   {"type": "abort", "rid"}                             notification
    client -> node   {"type": "stats"} / {"type": "set_micro_batches", "m"}   requests
                     {"type": "limits"} -> {"max_prompt_chars", "max_model_len", "free_kv"}

`rid` is the client's name for one stream: an int, unique among the streams in flight on its
connection. A generate without an int rid, or with one in flight, is answered with a
FrameError (the stream in flight goes on). A started stream ends with its last chunk or
exactly one "failed" message, whatever ended it (the connection closing aside).

Limits (`api_limits`): a generate message may hold what the engine's longest prompt needs
(a larger frame closes the connection unread: AttachedEngine refuses such prompts itself,
PromptTooLongError), any other message 64 KiB (refused alone, FrameTooLargeError); a client
silent for client_timeout_s (no frame, no heartbeat), or that takes longer to send one
frame, is dropped; the node sends heartbeats every second, so that a client can tell a
frozen node from a quiet one; at most 256 connections.
"""

from __future__ import annotations

import dataclasses

from afkv import errors
from afkv.engine.engine import Engine
from afkv.engine.params import CompletionChunk, KVPruning, SamplingParams
from afkv.serve.streams import StreamServer
from afkv.transport.control import MAX_FRAME_BYTES, ControlConnection, ControlLimits


_PARAM_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))
SMALL_MESSAGE_BYTES = 64 * 1024
HEARTBEAT_INTERVAL_S = 1.0
MAX_CLIENTS = 256


def api_limits(engine: Engine, client_timeout_s: float) -> ControlLimits:
    """Limits of an attention node's API port (see the module docstring). A generate message
    holds at most max_prompt_chars characters of UTF-8 (4 bytes each), or max_model_len token
    ids or chat messages, plus its parameters."""
    generate_bytes = 4 * engine.max_prompt_chars + 80 * engine.max_model_len + SMALL_MESSAGE_BYTES
    return ControlLimits(max_frame_bytes=max(MAX_FRAME_BYTES, generate_bytes), max_inbound_bytes=generate_bytes,
                         idle_timeout_s=client_timeout_s,
                         frame_timeout_s=client_timeout_s, heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
                         max_connections=MAX_CLIENTS, message_bytes={"generate": generate_bytes},
                         default_message_bytes=SMALL_MESSAGE_BYTES)


def params_to_wire(p: SamplingParams) -> dict:
    out = {}
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        out[f.name] = dataclasses.asdict(v) if isinstance(v, KVPruning) else list(v) if isinstance(v, tuple) else v
    return out


def params_from_wire(wire: object) -> SamplingParams:
    """SamplingParams from a generate message; InvalidSamplingParamsError naming what is wrong."""
    if wire is None:
        return SamplingParams()
    if not isinstance(wire, dict):
        raise errors.InvalidSamplingParamsError(f"params must be a map, got {type(wire).__name__}")
    unknown = sorted(map(str, set(wire) - _PARAM_NAMES))
    if unknown:
        raise errors.InvalidSamplingParamsError(f"unknown sampling parameter(s) {', '.join(unknown)}")
    kwargs = dict(wire)
    pruning = kwargs.get("pruning")
    if isinstance(pruning, dict):
        try:
            kwargs["pruning"] = KVPruning(**pruning)
        except TypeError as exc:
            raise errors.InvalidSamplingParamsError(f"pruning: {exc}") from exc
    return SamplingParams(**kwargs)


def _pairs(d: dict[int, float] | None):
    return None if d is None else [[int(k), float(v)] for k, v in d.items()]


def chunk_to_wire(c: CompletionChunk) -> dict:
    out = {
        "request_id": c.request_id, "token_ids": c.token_ids, "text": c.text, "logprobs": c.logprobs,
        "top_logprobs": None if c.top_logprobs is None else [_pairs(t) for t in c.top_logprobs],
        "finish_reason": c.finish_reason,
        "prompt_logprobs": None if c.prompt_logprobs is None else [_pairs(t) for t in c.prompt_logprobs],
        "prompt_token_ids": c.prompt_token_ids,
    }
    if c.metrics is not None:
        m = c.metrics
        out["metrics"] = {"arrival_s": m.arrival_s, "num_prompt_tokens": m.num_prompt_tokens,
                          "num_cached_tokens": m.num_cached_tokens, "first_token_s": m.first_token_s,
                          "token_times_s": m.token_times_s, "finished_s": m.finished_s,
                          "num_handoff_tokens": m.num_handoff_tokens, "handoff_ack_s": m.handoff_ack_s,
                          "handoff_end_s": m.handoff_end_s}
    return out


class ApiServer(StreamServer):
    """Serves an Engine to remote clients: each generate message is a stream (StreamServer)
    of the request's chunks; abort cancels it."""

    KEY, FAILED, PEER, WHAT, WHERE = "rid", "failed", "client", "request", "the attention node"

    def __init__(self, engine: Engine, host: str, port: int = 0, token: str | None = None,
                 client_timeout_s: float = 60.0):
        self.engine = engine
        super().__init__(host, port, token, api_limits(engine, client_timeout_s))

    async def _handle(self, conn: ControlConnection, msg: dict) -> dict | None:
        kind = msg["type"]
        if kind == "generate":
            rid = self._stream_id(msg)
            self._start(conn, rid, lambda: self._generate(conn, rid, msg), f"afkv-api-stream {rid}")
            return None
        if kind == "abort":
            self._cancel(conn, msg.get("rid"))
            return None
        if kind == "stats":
            return {"type": "stats", **dataclasses.asdict(self.engine.stats()), "layer": self.engine.layer_timings(),
                    "kv": dataclasses.asdict(self.engine.kv_metrics()), "micro_batches": self.engine.micro_batches}
        if kind == "limits":
            return {"type": "limits", "max_prompt_chars": self.engine.max_prompt_chars,
                    "max_model_len": self.engine.max_model_len, "free_kv": self.engine.free_kv_tokens}
        if kind == "set_micro_batches":
            m = msg.get("m")
            if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 16:
                raise errors.FrameError(f"set_micro_batches needs an int m in [0, 16] (0: automatic), got {m!r:.50}")
            self.engine.set_micro_batches(m)
            return {"type": "ok"}
        raise errors.FrameError(f"attention node API: unknown message type {kind!r}")

    async def _generate(self, conn: ControlConnection, rid: int, msg: dict) -> None:
        params = params_from_wire(msg.get("params"))
        async for chunk in self.engine.generate(msg.get("prompt"), params):
            await conn.send({"type": "chunk", "rid": rid, "chunk": chunk_to_wire(chunk),
                             "free_kv": self.engine.free_kv_tokens})
