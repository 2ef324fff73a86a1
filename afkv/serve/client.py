"""AttachedEngine: the async API of Engine, served by the attention nodes of a running
deployment (`afkv launch`). Each request goes to the attention node (the decode node, with
prefill nodes) with the most free KV: the node's last report (Engine.free_kv_tokens, sent with
every chunk) less what the client sent it since that has not started streaming (prompt tokens,
estimated at 4 characters a token for text); among equals, the fewest requests in flight, then
in turn.

    async with await afkv.attach("127.0.0.1:29600", token="...") as engine:
        async for chunk in engine.generate(prompt, params): ...

The address is the deployment's rendezvous; the token is the deployment's (default
$AFKV_TOKEN). Nothing listening there, or a wrong token, fails at once (PeerLostError,
AuthError).

Deadlines: attention nodes send heartbeats; one silent for `peer_timeout_s` (frozen, or the
network gone) is dropped, and each request it was serving ends with PeerLostError. The
next request for that node looks its address up again (it may have been restarted) and
reconnects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import uuid
from collections.abc import AsyncIterator

from afkv import errors
from afkv.engine.engine import EngineStats, check_prompt_size
from afkv.engine.params import Completion, CompletionChunk, RequestMetrics, SamplingParams
from afkv.kv.metrics import KVMetricsSnapshot
from afkv.nodes.rendezvous import RendezvousClient, lookup
from afkv.serve.api import params_to_wire
from afkv.transport.control import ConnState, ControlClient, ControlLimits

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


@dataclasses.dataclass(frozen=True)
class NodeMetrics:
    """One attention node's Engine.stats(), layer_timings() and kv_metrics()."""

    stats: EngineStats
    layer: dict[str, float]
    kv: KVMetricsSnapshot


class AttachedEngine:
    """Owns one control connection per attention node (`_clients`, None until first used or
    after it was lost), `_queues`: rid -> (attention node, the queue its chunks go to), from a
    request's start to its end, and the routing state (loop thread only): `_free_kv` (each
    node's last report), `_unstarted` (rid -> its prompt's estimated tokens, until its first
    chunk), `_pending` (per node, the sum of those), `_in_flight` (requests per node)."""

    def __init__(self, rendezvous: RendezvousClient, num_attention: int, peer_timeout_s: float):
        """Use `await afkv.attach(...)` (AttachedEngine.connect)."""
        self._rendezvous = rendezvous
        self._peer_timeout_s = peer_timeout_s
        self._clients: list[ControlClient | None] = [None] * num_attention
        self._limits: list[tuple[int, int]] = [(0, 0)] * num_attention  # (max_prompt_chars, max_model_len)
        self._connecting = [asyncio.Lock() for _ in range(num_attention)]
        self._watchers: set[asyncio.Task] = set()
        self._name = f"client-{uuid.uuid4().hex[:12]}"
        self._turn = itertools.count()  # the last tie-break: in turn
        self._free_kv = [0] * num_attention
        self._pending = [0] * num_attention
        self._in_flight = [0] * num_attention
        self._unstarted: dict[int, int] = {}
        self._rids = itertools.count()
        self._queues: dict[int, tuple[int, asyncio.Queue]] = {}
        self._closed = False

    @classmethod
    async def connect(cls, address: str, token: str | None = None, timeout_s: float = 30.0,
                      peer_timeout_s: float = 10.0) -> "AttachedEngine":
        """`address`: host:port of the deployment's rendezvous; `token`: the deployment's
        (default $AFKV_TOKEN). `timeout_s` bounds finding and reaching the attention nodes,
        `peer_timeout_s` how long one may stay silent (no chunk, no heartbeat)."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise errors.ConfigError(f"a deployment's address is host:port, got {address!r}")
        token = token if token is not None else os.environ.get("AFKV_TOKEN") or None
        rendezvous = RendezvousClient(host, int(port), token, timeout_s, node_id="client")
        try:
            count = int(await asyncio.to_thread(rendezvous.get, NUM_ATTENTION_KEY, 0.0))
        except errors.PeerLostError as exc:
            raise errors.PeerLostError(f"no deployment at {address}: {exc}") from exc
        self = cls(rendezvous, count, peer_timeout_s)
        try:
            for i in range(count):
                await self._client(i)
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
            if c is not None:
                await c.aclose()
        for w in list(self._watchers):
            w.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    async def _client(self, i: int) -> ControlClient:
        """The connection to attention node i, (re)connected after looking up its address."""
        async with self._connecting[i]:
            c = self._clients[i]
            if c is not None and c.state is ConnState.OPEN:
                return c
            r = self._rendezvous
            [(host, port)] = await asyncio.to_thread(lookup, r, "attention", i + 1, r.timeout_s, i)
            limits = ControlLimits(idle_timeout_s=self._peer_timeout_s, frame_timeout_s=self._peer_timeout_s,
                                   heartbeat_interval_s=min(1.0, self._peer_timeout_s / 4))
            c = await ControlClient.connect(host, port, token=r.token, role="client", node_id=f"{self._name}-{i}",
                                            timeout_s=r.timeout_s, handler=self._on_message, limits=limits)
            try:
                sizes = await c.request({"type": "limits"}, timeout_s=self._peer_timeout_s)
                self._limits[i] = (int(sizes["max_prompt_chars"]), int(sizes["max_model_len"]))
                self._free_kv[i] = int(sizes["free_kv"])
            except BaseException:
                await c.aclose()
                raise
            self._clients[i] = c
            watcher = asyncio.create_task(self._watch(i, c), name=f"afkv-client-watch {i}")
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
            return c

    async def _watch(self, i: int, client: ControlClient) -> None:
        """When the connection to attention node i ends, end every request it was serving."""
        await client.wait_closed()
        reason = client.closed_reason
        for rid, (node, q) in list(self._queues.items()):
            if node == i:
                q.put_nowait(errors.PeerLostError(f"attention node {i} lost: {reason}"))

    async def _on_message(self, conn, msg: dict) -> None:
        """Route a chunk or failure to its request. Never raises for a known rid: a message it
        cannot read ends that request with the reason, instead of leaving it waiting."""
        rid = msg.get("rid")
        entry = self._queues.get(rid) if isinstance(rid, int) and not isinstance(rid, bool) else None
        q = None if entry is None else entry[1]
        if q is None:
            if msg["type"] == "failed":
                log.warning("attention node %s: %s", conn.peer, errors.error_from_wire(msg.get("error")))
            return None
        if msg["type"] == "chunk":
            free_kv = msg.get("free_kv")
            if isinstance(free_kv, int) and not isinstance(free_kv, bool):
                self._free_kv[entry[0]] = free_kv
            self._started(rid, entry[0])
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
        if not isinstance(params, SamplingParams):
            raise errors.RequestError(f"params must be SamplingParams, not {type(params).__name__}")
        i = self._pick()
        rid = next(self._rids)
        self._unstarted[rid] = estimate_prompt_tokens(prompt)  # counted before any await: a burst spreads
        self._pending[i] += self._unstarted[rid]
        self._in_flight[i] += 1
        client = None
        finished = False
        try:
            client = await self._client(i)
            check_prompt_size(prompt, *self._limits[i])  # a larger one would not fit in a frame the node reads
            q: asyncio.Queue = asyncio.Queue()
            self._queues[rid] = (i, q)
            await client.request({"type": "generate", "rid": rid, "prompt": prompt, "params": params_to_wire(params)},
                                 timeout_s=self._peer_timeout_s)
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            self._queues.pop(rid, None)
            self._started(rid, i)
            self._in_flight[i] -= 1
            if not finished and client is not None and client.state is ConnState.OPEN:
                try:
                    await client.send({"type": "abort", "rid": rid})
                except errors.TransportError:
                    pass  # gone meanwhile: the node drops the request when it cannot send to us

    def _pick(self) -> int:
        """The attention node for the next request (the routing rule: the module docstring)."""
        n = len(self._clients)
        turn = next(self._turn) % n
        return max(range(n), key=lambda i: (self._free_kv[i] - self._pending[i], -self._in_flight[i],
                                            -((i - turn) % n)))

    def _started(self, rid: int, i: int) -> None:
        """Request rid on node i streams (or ended): the node's reports count its KV from now on."""
        tokens = self._unstarted.pop(rid, None)
        if tokens is not None:
            self._pending[i] -= tokens

    async def complete(self, prompt, params: SamplingParams | None = None) -> Completion:
        chunks = [c async for c in self.generate(prompt, params)]
        last = chunks[-1]
        return Completion(
            request_id=last.request_id, prompt_token_ids=chunks[0].prompt_token_ids, token_ids=[t for c in chunks for t in c.token_ids],
            text="".join(c.text for c in chunks), logprobs=[lp for c in chunks for lp in c.logprobs],
            top_logprobs=None if chunks[0].top_logprobs is None else [t for c in chunks for t in c.top_logprobs],
            finish_reason=last.finish_reason, prompt_logprobs=chunks[0].prompt_logprobs, metrics=last.metrics,
        )

    async def node_metrics(self) -> list[NodeMetrics]:
        """Engine.stats(), layer_timings() and kv_metrics() of each attention node, in rank
        order, from one round trip per node."""
        names = [f.name for f in dataclasses.fields(EngineStats)]
        return [NodeMetrics(EngineStats(**{n: r[n] for n in names if n in r}), dict(r["layer"]),
                            KVMetricsSnapshot.from_dict(r["kv"]))
                for r in await self._request_all({"type": "stats"})]

    async def stats(self) -> list[EngineStats]:
        """EngineStats of each attention node (Engine.stats() of each), in rank order."""
        return [m.stats for m in await self.node_metrics()]

    async def layer_timings(self) -> list[dict[str, float]]:
        """Engine.layer_timings() of each attention node, in rank order."""
        return [m.layer for m in await self.node_metrics()]

    async def kv_metrics(self) -> list[KVMetricsSnapshot]:
        """Engine.kv_metrics() of each attention node, in rank order."""
        return [m.kv for m in await self.node_metrics()]

    async def set_micro_batches(self, m: int) -> None:
        """Engine.set_micro_batches(m) on every attention node (0: chosen from measured step times)."""
        await self._request_all({"type": "set_micro_batches", "m": m})

    async def _request_all(self, msg: dict) -> list[dict]:
        if self._closed:
            raise errors.EngineClosedError("this attached engine is closed")
        clients = [await self._client(i) for i in range(len(self._clients))]
        return [await c.request(msg, timeout_s=self._peer_timeout_s) for c in clients]


def estimate_prompt_tokens(prompt: object) -> int:
    """Tokens a prompt will take, before the node tokenizes it: a token list's length; text
    (or chat messages' contents) at 4 characters a token. O(1) per message."""
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return sum(len(m["content"]) // 4 + 1 if isinstance(m, dict) and isinstance(m.get("content"), str) else 1
                   for m in prompt)
    return len(prompt) if isinstance(prompt, (list, tuple)) else 1


async def attach(address: str, token: str | None = None, timeout_s: float = 30.0,
                 peer_timeout_s: float = 10.0) -> AttachedEngine:
    """Connect to a running deployment (`afkv launch`; `address` is its rendezvous,
    host:port; `token` its token, default $AFKV_TOKEN). Returns an AttachedEngine with the
    Engine's async API (generate, complete, stats). `afkv.attach` is this function."""
    return await AttachedEngine.connect(address, token, timeout_s, peer_timeout_s)
