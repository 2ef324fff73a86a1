"""API server of an attention node: serves an Engine to remote clients (afkv.serve.client).

Messages (msgpack over the control plane, afkv.transport.control):
    client -> node   {"type": "generate", "rid", "prompt", "params"}     notification
    node -> client   {"type": "chunk", "rid", "chunk"} ...                the last has finish_reason
                     {"type": "failed", "rid", "error", "message"}         a typed afkv error, by class name
    client -> node   {"type": "abort", "rid"}
    client -> node   {"type": "stats"} / {"type": "set_micro_batches", "m"}   requests
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from afkv import errors
from afkv.engine.engine import Engine
from afkv.engine.params import CompletionChunk, SamplingParams
from afkv.transport.control import ControlConnection, ControlServer

log = logging.getLogger("afkv.api")

def params_to_wire(p: SamplingParams) -> dict:
    return {f.name: (list(v) if isinstance(v := getattr(p, f.name), tuple) else v) for f in dataclasses.fields(p)}


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
                          "token_times_s": m.token_times_s, "finished_s": m.finished_s}
    return out


class ApiServer:
    """Serves an Engine to remote clients; one task per streaming request."""

    def __init__(self, engine: Engine, host: str, port: int = 0, token: str | None = None):
        self.engine = engine
        self._server = ControlServer(self._handle, host=host, port=port, token=token)
        self._streams: dict[tuple[int, int], asyncio.Task] = {}

    @property
    def port(self) -> int:
        return self._server.port

    async def start(self) -> int:
        await self._server.start()
        return self._server.port

    async def aclose(self) -> None:
        for t in list(self._streams.values()):
            t.cancel()
        await asyncio.gather(*self._streams.values(), return_exceptions=True)
        await self._server.aclose()

    async def _handle(self, conn: ControlConnection, msg: dict) -> dict | None:
        kind = msg["type"]
        if kind == "generate":
            key = (id(conn), int(msg["rid"]))
            self._streams[key] = asyncio.create_task(self._stream(conn, key, msg))
            return None
        if kind == "abort":
            task = self._streams.get((id(conn), int(msg["rid"])))
            if task is not None:
                task.cancel()
            return None
        if kind == "stats":
            return {"type": "stats", **dataclasses.asdict(self.engine.stats()), "layer": self.engine.layer_timings(),
                    "micro_batches": self.engine.micro_batches}
        if kind == "set_micro_batches":
            self.engine.set_micro_batches(int(msg["m"]))
            return {"type": "ok"}
        raise errors.FrameError(f"attention node API: unknown message type {kind!r}")

    async def _stream(self, conn: ControlConnection, key: tuple[int, int], msg: dict) -> None:
        rid = key[1]
        try:
            prompt = msg["prompt"]
            params = SamplingParams(**msg.get("params", {}))
            async for chunk in self.engine.generate(prompt, params):
                await conn.send({"type": "chunk", "rid": rid, "chunk": chunk_to_wire(chunk)})
        except asyncio.CancelledError:
            raise
        except errors.TransportError:
            log.info("client of request %d is gone", rid)
        except (errors.AfkvError, TypeError, KeyError) as exc:
            name = type(exc).__name__ if isinstance(exc, errors.AfkvError) else "RequestError"
            try:
                await conn.send({"type": "failed", "rid": rid, "error": name, "message": str(exc)})
            except errors.TransportError:
                log.info("client of request %d is gone; its error was: %s", rid, exc)
        finally:
            self._streams.pop(key, None)
