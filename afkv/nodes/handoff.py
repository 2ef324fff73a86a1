"""KV hand-off of prefill/decode disaggregation: a decode node asks a prefill node for the KV
blocks it lacks, by block hash, and the prefill node sends them as tier rows as its chunks
fill them.

Roles (`afkv launch`, `[deployment] prefill_nodes`):

    prefill node  a colocated Engine (the whole model in its process: a prompt's chunk is a
                  large batch, so its experts see enough tokens without AF) that computes
                  prompts in chunks and serves their blocks (afkv.serve.prefill.PrefillServer)
    decode node   an attention node (AF with the expert nodes; colocated when expert_nodes = 0):
                  for a prompt whose full blocks it lacks it picks a prefill node (PrefillLinks),
                  receives the rows into its KV cache (KVManager.begin_handoff / receive /
                  end_handoff), then computes the prompt's last partial block and first token
                  itself and decodes

Rows travel in `[deployment] handoff_format` (afkv.kv.formats): raw by default (exact), or
fp8 / int8 / int4 rows, a quarter to a half of the bytes (decoded into the decode node's device
format on arrival).

Only full blocks move. A block on the wire is named by its chained hash (afkv.kv.block_pool),
immutable, and the decode node's prefix machinery finds it like any other cached block; the
decode node computes at most block_size tokens of a prompt, samples every token itself, and
never holds a partial block made elsewhere. Blocks the decode node already holds are not asked
for (prefix reuse across roles). Blocks leave the prefill node as soon as the step that filled
them ends, so the transfer of early chunks overlaps the prefill of later ones; the decode node
admits the request when the last block has landed.

Protocol (control-plane messages, afkv.transport.control; the decode node is the client):

    decode -> prefill  request {"type": "prefill", "hid", "token_ids", "want": [[index, hash]],
                       "format": name, "digest": the format's digest}  -> ack once started
    prefill -> decode  {"type": "kv_blocks", "hid", "indices", "hashes", "crcs", "rows"}  as
                       blocks fill, at most ROWS_FRAME_BYTES of rows each
                       {"type": "prefill_done", "hid"} or {"type": "prefill_failed", "hid", "error"}
    decode -> prefill  {"type": "cancel", "hid"}  notification: the prefill request is aborted

Checks on every hop that leaves a device: each row travels with the crc32 of its bytes,
checked on arrival before anything is written; each block's hash must be the one asked for
(the two nodes agree on model, weights and dtype); the format digest must match. A failed
check is a CorruptBlockError for that transfer: the blocks not yet received are asked of
another prefill node.

Faults: a prefill node lost (its connection closes; heartbeats find a frozen one), or silent
for prefill_timeout_s between two messages, ends that transfer; the blocks still awaited are
asked of the next prefill node; when every node was tried, PrefillUnavailableError. Either
way the caller frees what it held (KVManager.free: an awaited block was never registered).

Transports: rows cross in control frames over TCP, the host data plane between processes
(CPUs). On GPUs the same `fetch` contract holds with other carriers chosen by
afkv.transport.peer's rule: NCCL between two GPUs, CUDA IPC (or pinned host memory) between
two processes on one GPU; the frames then carry only indices, hashes and checksums.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import zlib
from collections.abc import AsyncIterator, Sequence

import torch

from afkv import errors
from afkv.config import DeploymentConfig
from afkv.kv.block_pool import BlockHash
from afkv.kv.formats import BlockFormat
from afkv.nodes.rendezvous import lookup, open_store
from afkv.transport.control import ConnState, ControlClient, ControlLimits

log = logging.getLogger("afkv.handoff")

ROWS_FRAME_BYTES = 8 * 2**20  # rows per kv_blocks message (at least one row)
MAX_FRAME_BYTES = 64 * 2**20


def row_checksums(rows: torch.Tensor) -> list[int]:
    """crc32 of each row of uint8 [n, nbytes] (host memory)."""
    data = rows.numpy()
    return [zlib.crc32(data[i]) for i in range(rows.shape[0])]


def blocks_to_wire(hid: int, indices: Sequence[int], hashes: Sequence[BlockHash], rows: torch.Tensor) -> list[dict]:
    """kv_blocks messages for rows uint8 [n, nbytes] of table entries `indices`, split so that
    each carries at most ROWS_FRAME_BYTES of rows (at least one row)."""
    n, nbytes = rows.shape
    per = max(1, ROWS_FRAME_BYTES // max(nbytes, 1))
    crcs = row_checksums(rows)
    return [{"type": "kv_blocks", "hid": hid, "indices": list(indices[a:a + per]), "hashes": list(hashes[a:a + per]),
             "crcs": crcs[a:a + per], "rows": rows[a:a + per].numpy().tobytes()} for a in range(0, n, per)]


def blocks_from_wire(msg: dict, want: dict[int, BlockHash], fmt: BlockFormat) -> tuple[list[int], torch.Tensor]:
    """Check a kv_blocks message against the blocks asked for -> (indices, rows uint8 [n,
    nbytes]). CorruptBlockError for a checksum, hash or size that does not match, or a block
    not asked for (or sent twice)."""
    try:
        indices, hashes, crcs, data = ([int(i) for i in msg["indices"]], list(msg["hashes"]), list(msg["crcs"]),
                                       msg["rows"])
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.FrameError(f"malformed kv_blocks message: {exc!r}") from exc
    n = len(indices)
    if not (isinstance(data, bytes) and len(hashes) == n == len(crcs) and len(data) == n * fmt.nbytes):
        raise errors.CorruptBlockError(f"kv_blocks: {n} indices, {len(hashes)} hashes, {len(crcs)} checksums and "
                                       f"{len(data) if isinstance(data, bytes) else '?'} bytes of rows; expected "
                                       f"{fmt.nbytes} bytes per row")
    rows = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(n, fmt.nbytes) if n else \
        torch.empty((0, fmt.nbytes), dtype=torch.uint8)
    for i, h, crc, got in zip(indices, hashes, crcs, row_checksums(rows)):
        if want.get(i) != h:
            raise errors.CorruptBlockError(f"kv_blocks: block {i} {'is not awaited' if i not in want else 'has hash '}"
                                           f"{'' if i not in want else bytes(h).hex()}; the prefill node and this node "
                                           "disagree on the prompt, model or dtype")
        if crc != got:
            raise errors.CorruptBlockError(f"kv_blocks: block {i} failed its checksum ({got:#x}, sent {crc:#x})")
    return indices, rows


class PrefillLinks:
    """A decode node's links to the prefill nodes: routing and the transfers in flight.

    Owns (loop thread only): `_clients` (one control connection per prefill node, None until
    first used or after it was lost), `_queued` (prompt tokens this node has in flight on each
    prefill node: the routing load), `_queues` (hand-off id -> (node, the queue its messages
    go to), from a transfer's start to its end)."""

    def __init__(self, d: DeploymentConfig, name: str):
        self._d = d
        self._name = name
        self._clients: list[ControlClient | None] = [None] * d.prefill_nodes
        self._connecting = [asyncio.Lock() for _ in range(d.prefill_nodes)]
        self._queued = [0] * d.prefill_nodes
        self._queues: dict[int, tuple[int, asyncio.Queue]] = {}
        self._hids = itertools.count()
        self._watchers: set[asyncio.Task] = set()
        self._store = None
        self._first = [True] * d.prefill_nodes
        self.num_retries = 0  # transfers continued on another prefill node

    async def aclose(self) -> None:
        for c in self._clients:
            if c is not None:
                await c.aclose()
        for w in list(self._watchers):
            w.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    def pick(self, first_hash: BlockHash, exclude: set[int]) -> int | None:
        """The prefill node for a prompt: least queued tokens; among equals, the node its first
        block's hash maps to (prefix affinity: equal prefixes meet the same prefill cache)."""
        n = self._d.prefill_nodes
        affinity = int.from_bytes(first_hash[:8], "little") % n
        live = [j for j in range(n) if j not in exclude]
        return min(live, key=lambda j: (self._queued[j], j != affinity), default=None)

    async def _client(self, j: int) -> ControlClient:
        async with self._connecting[j]:
            c = self._clients[j]
            if c is not None and c.state is ConnState.OPEN:
                return c
            d = self._d
            if self._store is None:
                self._store = await asyncio.to_thread(open_store, d.host, d.port, False, d.prefill_timeout_s,
                                                      d.token or None)
            timeout_s = max(120.0, d.prefill_timeout_s) if self._first[j] else d.prefill_timeout_s  # start-up: loading
            self._first[j] = False
            [(host, port)] = await asyncio.to_thread(lookup, self._store, "prefill", j + 1, timeout_s, j)
            limits = ControlLimits(max_frame_bytes=MAX_FRAME_BYTES,
                                   idle_timeout_s=d.prefill_timeout_s, frame_timeout_s=d.prefill_timeout_s,
                                   heartbeat_interval_s=d.heartbeat_interval_s)
            c = await ControlClient.connect(host, port, token=d.token or None, role="decode",
                                            node_id=f"{self._name}-prefill{j}", timeout_s=d.prefill_timeout_s,
                                            handler=self._on_message, limits=limits)
            self._clients[j] = c
            watcher = asyncio.create_task(self._watch(j, c), name=f"afkv-prefill-watch {j}")
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
            return c

    async def _watch(self, j: int, client: ControlClient) -> None:
        """When the connection to prefill node j ends, end every transfer it was serving."""
        await client.wait_closed()
        for node, q in list(self._queues.values()):
            if node == j:
                q.put_nowait(errors.PeerLostError(f"prefill node {j} lost: {client.closed_reason}"))

    async def _on_message(self, conn, msg: dict) -> None:
        hid = msg.get("hid")
        entry = self._queues.get(hid) if isinstance(hid, int) and not isinstance(hid, bool) else None
        if entry is not None:
            entry[1].put_nowait(msg)
        return None

    async def fetch(self, token_ids: Sequence[int], want: dict[int, BlockHash],
                    fmt: BlockFormat) -> AsyncIterator[tuple[list[int], torch.Tensor]]:
        """The blocks `want` ({table index: hash}) of the prompt `token_ids` (whole blocks), from
        the prefill nodes: yields (indices, rows uint8 [n, fmt.nbytes]) as they arrive, each
        checked. A node that fails hands the blocks still awaited to the next;
        PrefillUnavailableError when every node failed (the causes in its message)."""
        want = dict(want)
        tried: set[int] = set()
        causes: list[str] = []
        first_hash = want[min(want)] if want else b""
        while want:
            j = self.pick(first_hash, tried)
            if j is None:
                raise errors.PrefillUnavailableError(
                    f"no prefill node handed over {len(want)} KV block(s): {'; '.join(causes)}")
            tried.add(j)
            try:
                async for indices, rows in self._fetch_from(j, token_ids, want, fmt):
                    for i in indices:
                        del want[i]
                    yield indices, rows
            except (errors.PeerLostError, errors.CorruptBlockError, errors.FrameError) as exc:
                causes.append(f"prefill node {j}: {exc}")
                if want:
                    self.num_retries += 1
                    log.warning("KV hand-off from prefill node %d failed (%s); %d block(s) still awaited", j, exc,
                                len(want))

    async def _fetch_from(self, j: int, token_ids: Sequence[int], want: dict[int, BlockHash],
                          fmt: BlockFormat) -> AsyncIterator[tuple[list[int], torch.Tensor]]:
        client = await self._client(j)
        hid = next(self._hids)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[hid] = (j, q)
        self._queued[j] += len(token_ids)
        ended = False
        timeout_s = self._d.prefill_timeout_s
        try:
            await client.request({"type": "prefill", "hid": hid, "token_ids": list(token_ids),
                                  "want": [[i, h] for i, h in want.items()], "format": fmt.name,
                                  "digest": fmt.digest},
                                 timeout_s=timeout_s)
            while True:
                try:
                    msg = await asyncio.wait_for(q.get(), timeout_s)
                except TimeoutError as exc:
                    raise errors.PeerLostError(f"prefill node {j} sent nothing for {timeout_s:.0f} s") from exc
                if isinstance(msg, BaseException):
                    ended = True
                    raise msg
                kind = msg.get("type")
                if kind == "kv_blocks":
                    yield blocks_from_wire(msg, want, fmt)
                elif kind == "prefill_done":
                    ended = True
                    if want:
                        raise errors.CorruptBlockError(f"prefill node {j} ended without blocks {sorted(want)}")
                    return
                elif kind == "prefill_failed":
                    ended = True
                    raise errors.error_from_wire(msg.get("error"))
                else:
                    raise errors.FrameError(f"prefill node {j}: unexpected message {kind!r:.50}")
        finally:
            self._queues.pop(hid, None)
            self._queued[j] -= len(token_ids)
            if not ended and client.state is ConnState.OPEN:
                try:
                    await client.send({"type": "cancel", "hid": hid})
                except errors.TransportError:
                    pass  # gone meanwhile: the prefill node aborts what it cannot send
