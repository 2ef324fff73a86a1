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
                       "format": name, "digest": the format's digest, "segment": name or None}
                       -> ack once started
    prefill -> decode  {"type": "kv_blocks", "hid", "indices", "hashes", "crcs", "rows"}  as
                       blocks fill, at most ROWS_FRAME_BYTES of rows each; or, with the rows
                       written into the segment's slots, {..., "in_segment": true} and no rows
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

Carriers. Rows cross between processes of one host through a shared-memory segment the decode
node makes per transfer (RowSegment: /dev/shm, mode 0600, a slot per block asked for; the
prefill node writes each row once, the decode node checks its crc32 there and its worker copies
it into the cache), and inline in the kv_blocks frames when the prefill node cannot open the
segment (another host). On a GPU the prefill node's worker first copies the blocks into pinned
host memory (KVManager.export_rows) and the decode node's worker copies the rows to its device
(KVManager.receive). The GPU carriers keep this protocol and `fetch`'s contract and change only
what a kv_blocks message carries, chosen by afkv.transport.peer's rule (designed, not built):

    pinned host (one host)  the segment registered as pinned memory in both processes
                            (cudaHostRegister): the prefill node's worker copies device -> segment
                            and the decode node's segment -> device, asynchronously, no bounce
    CUDA IPC (one GPU)      a device ring of row slots the decode node allocates once per link and
                            shares as an IPC handle; the prefill node copies device -> device and
                            records an IPC event the decode node's worker waits on before copying
                            slots into cache blocks: no host copy, no checksum (nothing left the device)
    NCCL (two GPUs)         a peer per (prefill, decode) pair: the message announces n rows, the
                            rows follow as one send/recv of [n, nbytes] on a copy stream
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import os
import re
import secrets
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import torch

from afkv import errors
from afkv.config import DeploymentConfig
from afkv.kv.block_pool import BlockHash
from afkv.kv.formats import BlockFormat
from afkv.nodes.rendezvous import lookup, open_store
from afkv.transport.control import ConnState, ControlClient, ControlLimits

log = logging.getLogger("afkv.handoff")

ROWS_FRAME_BYTES = 8 * 2**20  # rows per kv_blocks message carrying them (at least one row)
MAX_FRAME_BYTES = 64 * 2**20
SEGMENT_DIR = Path("/dev/shm")  # POSIX shared memory (Linux): where row segments live
_SEGMENT_NAME = re.compile(r"afkv-handoff-[0-9]+-[0-9a-f]{16}")


class RowSegment:
    """Decode side: a shared-memory file of row slots for one transfer (slot k: the k-th block
    asked for, in table order), mode 0600, named in the prefill message. A prefill node on the
    same host writes rows there and sends only their indices, hashes and checksums. `rows` (and
    every view of it) keeps the mapping alive after `unlink`."""

    def __init__(self, num_rows: int, nbytes: int):
        self.name = f"afkv-handoff-{os.getpid()}-{secrets.token_hex(8)}"
        self.path = SEGMENT_DIR / self.name
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, num_rows * nbytes)
            mapping = mmap.mmap(fd, num_rows * nbytes)
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)
        self.rows = torch.frombuffer(mapping, dtype=torch.uint8).view(num_rows, nbytes)  # [num_rows, nbytes]

    @staticmethod
    def available() -> bool:
        return SEGMENT_DIR.is_dir() and os.access(SEGMENT_DIR, os.W_OK)

    def unlink(self) -> None:
        """Remove the name (the memory goes with the last view of `rows`)."""
        self.path.unlink(missing_ok=True)


def open_segment(name: object, num_rows: int, nbytes: int) -> torch.Tensor | None:
    """Prefill side: the decode node's segment `name` as rows uint8 [num_rows, nbytes]; None when
    this host has no such segment (the decode node runs elsewhere): rows then travel in frames."""
    if not isinstance(name, str) or not _SEGMENT_NAME.fullmatch(name):
        raise errors.FrameError(f"a prefill message's 'segment' is not a row segment name: {name!r:.60}")
    try:
        fd = os.open(SEGMENT_DIR / name, os.O_RDWR)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != num_rows * nbytes:
            return None
        mapping = mmap.mmap(fd, num_rows * nbytes)
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch.uint8).view(num_rows, nbytes)


def row_checksums(rows: torch.Tensor) -> list[int]:
    """crc32 of each row of uint8 [n, nbytes] (host memory)."""
    data = rows.numpy()
    return [zlib.crc32(data[i]) for i in range(rows.shape[0])]


def blocks_to_wire(hid: int, indices: Sequence[int], hashes: Sequence[BlockHash], rows: torch.Tensor,
                   segment: torch.Tensor | None = None, slots: Sequence[int] = ()) -> list[dict]:
    """kv_blocks messages for rows uint8 [n, nbytes] of table entries `indices`: with a segment,
    the rows are copied into its `slots` and the one message names them; else the rows travel
    in messages of at most ROWS_FRAME_BYTES of rows each (at least one row)."""
    n, nbytes = rows.shape
    crcs = row_checksums(rows)
    if segment is not None:
        segment[torch.tensor(list(slots))] = rows
        return [{"type": "kv_blocks", "hid": hid, "indices": list(indices), "hashes": list(hashes), "crcs": crcs,
                 "in_segment": True}]
    per = max(1, ROWS_FRAME_BYTES // max(nbytes, 1))
    return [{"type": "kv_blocks", "hid": hid, "indices": list(indices[a:a + per]), "hashes": list(hashes[a:a + per]),
             "crcs": crcs[a:a + per], "rows": rows[a:a + per].numpy().tobytes()} for a in range(0, n, per)]


def blocks_from_wire(msg: dict, want: dict[int, BlockHash], fmt: BlockFormat,
                     segment: RowSegment | None = None, slot_of: dict[int, int] | None = None
                     ) -> tuple[list[int], torch.Tensor]:
    """Check a kv_blocks message against the blocks asked for -> (indices, rows uint8 [n,
    nbytes]: from the message, or views of the segment's slots). CorruptBlockError for a
    checksum, hash or size that does not match, or a block not asked for (or sent twice)."""
    try:
        indices, hashes, crcs = [int(i) for i in msg["indices"]], list(msg["hashes"]), list(msg["crcs"])
        data = None if msg.get("in_segment") else msg["rows"]
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.FrameError(f"malformed kv_blocks message: {exc!r}") from exc
    n = len(indices)
    for i, h in zip(indices, hashes):
        if want.get(i) != h:
            raise errors.CorruptBlockError(f"kv_blocks: block {i} {'is not awaited' if i not in want else 'has hash '}"
                                           f"{'' if i not in want else bytes(h).hex()}; the prefill node and this node "
                                           "disagree on the prompt, model or dtype")
    if data is None:
        if segment is None:
            raise errors.CorruptBlockError("kv_blocks: rows said to be in a segment, but none was offered")
        slots = [slot_of[i] for i in indices]
        contiguous = slots == list(range(slots[0], slots[0] + n)) if n else True
        rows = segment.rows[slots[0]:slots[0] + n] if contiguous and n else segment.rows[torch.tensor(slots)]
    elif isinstance(data, bytes) and len(data) == n * fmt.nbytes:
        rows = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(n, fmt.nbytes) if n else \
            torch.empty((0, fmt.nbytes), dtype=torch.uint8)
    else:
        raise errors.CorruptBlockError(f"kv_blocks: {len(data) if isinstance(data, bytes) else '?'} bytes of rows "
                                       f"for {n} blocks of {fmt.nbytes} bytes")
    if not len(hashes) == n == len(crcs):
        raise errors.CorruptBlockError(f"kv_blocks: {n} indices, {len(hashes)} hashes, {len(crcs)} checksums")
    for i, crc, got in zip(indices, crcs, row_checksums(rows)):
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
        segment = None
        if RowSegment.available():
            try:
                segment = RowSegment(len(want), fmt.nbytes)
            except OSError as exc:  # shared memory full: the rows travel in the frames
                log.warning("no shared-memory segment for a KV hand-off (%s): rows go in frames", exc)
        slot_of = {i: k for k, i in enumerate(sorted(want))}
        hid = next(self._hids)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[hid] = (j, q)
        self._queued[j] += len(token_ids)
        ended = False
        timeout_s = self._d.prefill_timeout_s
        try:
            await client.request({"type": "prefill", "hid": hid, "token_ids": list(token_ids),
                                  "want": [[i, want[i]] for i in sorted(want)], "format": fmt.name,
                                  "digest": fmt.digest, "segment": None if segment is None else segment.name},
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
                    yield blocks_from_wire(msg, want, fmt, segment, slot_of)
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
            if segment is not None:
                segment.unlink()  # the rows received stay mapped until written into the cache
            self._queues.pop(hid, None)
            self._queued[j] -= len(token_ids)
            if not ended and client.state is ConnState.OPEN:
                try:
                    await client.send({"type": "cancel", "hid": hid})
                except errors.TransportError:
                    pass  # gone meanwhile: the prefill node aborts what it cannot send
