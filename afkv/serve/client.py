"""AttachedEngine: the async API of Engine, served by the attention nodes of a running
deployment (`afkv launch`). Requests are spread over the attention nodes round-robin.

    async with await afkv.Engine.attach("127.0.0.1:29600", token="...") as engine:
        async for chunk in engine.generate(prompt, params): ...
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

from afkv import errors
from afkv.engine.params import Completion, CompletionChunk, RequestMetrics, SamplingParams
from afkv.nodes.rendezvous import lookup, open_store
from afkv.serve.api import params_to_wire
from afkv.transport.control import ConnState, ControlClient

NUM_ATTENTION_KEY = "afkv/attention_nodes"

log = logging.getLogger("afkv.client")


def _dict(pairs):
    return None if pairs is None else {int(k): float(v) for k, v in pairs}


def chunk_from_wire(d: dict) -> CompletionChunk:
    m = d.get("metrics")
    return CompletionChunk(
        request_id=d["request_id"], token_ids=list(d["token_ids"]), text=d["text"], logprobs=list(d["logprobs"]),
        top_logprobs=None if d["top_logprobs"] is None else [_dict(t) for t in d["top_logprobs"]],
        finish_reason=d["finish_reason"],
        prompt_logprobs=None if d["prompt_logprobs"] is None else [_dict(t) for t in d["prompt_logprobs"]],
        metrics=None if m is None else RequestMetrics(**m),
        prompt_token_ids=d.get("prompt_token_ids"),
    )


class AttachedEngine:
    def __init__(self):
        """Use `await AttachedEngine.connect(...)` (or `afkv.Engine.attach`)."""
        self._clients: list[ControlClient] = []  # one per attention node
        self._turn = itertools.count()  # round-robin over the attention nodes
        self._rids = itertools.count()
        self._queues: dict[int, asyncio.Queue] = {}
        self._closed = False

    @classmethod
    async def connect(cls, address: str, token: str | None = None, timeout_s: float = 30.0) -> "AttachedEngine":
        """`address`: host:port of the deployment's rendezvous store."""
        host, _, port = address.rpartition(":")

        def find() -> list[tuple[str, int]]:
            store = open_store(host, int(port), is_master=False, timeout_s=timeout_s)
            from datetime import timedelta

            try:
                store.wait([NUM_ATTENTION_KEY], timedelta(seconds=timeout_s))
            except (RuntimeError, OSError) as exc:
                raise errors.PeerLostError(f"no deployment registered at {address}: {exc}") from exc
            return lookup(store, "attention", int(store.get(NUM_ATTENTION_KEY)), timeout_s)

        addresses = await asyncio.to_thread(find)
        self = cls()
        try:
            for i, (h, p) in enumerate(addresses):
                self._clients.append(await ControlClient.connect(
                    h, p, token=token, role="client", node_id=f"client-{id(self)}-{i}", timeout_s=timeout_s,
                    handler=self._on_message))
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aenter__(self) -> "AttachedEngine":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        for c in self._clients:
            await c.aclose()

    async def _on_message(self, conn, msg: dict) -> None:
        """Route a chunk or failure to its request. Never raises for a known rid: a message it
        cannot read ends that request with the reason, instead of leaving it waiting."""
        rid = msg.get("rid")
        q = self._queues.get(rid) if isinstance(rid, int) and not isinstance(rid, bool) else None
        if q is None:
            if msg["type"] == "failed":
                log.warning("attention node %s: %s", conn.peer, errors.error_from_wire(msg.get("error")))
            return None
        if msg["type"] == "chunk":
            try:
                q.put_nowait(chunk_from_wire(msg["chunk"]))
            except (KeyError, TypeError, ValueError) as exc:
                q.put_nowait(errors.FrameError(f"unreadable chunk from {conn.peer}: {exc!r}"))
        elif msg["type"] == "failed":
            q.put_nowait(errors.error_from_wire(msg.get("error")))
        return None

    async def generate(self, prompt, params: SamplingParams | None = None) -> AsyncIterator[CompletionChunk]:
        if self._closed:
            raise errors.EngineClosedError("this attached engine is closed")
        params = params or SamplingParams()
        client = self._clients[next(self._turn) % len(self._clients)]
        rid = next(self._rids)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        finished = False
        try:
            await client.send({"type": "generate", "rid": rid, "prompt": prompt, "params": params_to_wire(params)})
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), timeout=1.0)
                except TimeoutError:
                    if client.state is not ConnState.OPEN:
                        raise errors.PeerLostError(f"attention node {client.peer} is gone") from None
                    continue
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished and client.state is ConnState.OPEN:
                await client.send({"type": "abort", "rid": rid})

    async def complete(self, prompt, params: SamplingParams | None = None) -> Completion:
        chunks = [c async for c in self.generate(prompt, params)]
        last = chunks[-1]
        return Completion(
            request_id=last.request_id, prompt_token_ids=chunks[0].prompt_token_ids, token_ids=[t for c in chunks for t in c.token_ids],
            text="".join(c.text for c in chunks), logprobs=[lp for c in chunks for lp in c.logprobs],
            top_logprobs=None if chunks[0].top_logprobs is None else [t for c in chunks for t in c.top_logprobs],
            finish_reason=last.finish_reason, prompt_logprobs=chunks[0].prompt_logprobs, metrics=last.metrics,
        )

    async def stats(self) -> list[dict]:
        return [await c.request({"type": "stats"}, timeout_s=10.0) for c in self._clients]

    async def set_micro_batches(self, m: int) -> None:
        for c in self._clients:
            await c.request({"type": "set_micro_batches", "m": m}, timeout_s=10.0)
