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
                       "format": name, "digest": the format's digest, "segment": name or None,
                       "device_segment": DeviceSegment.wire or None} -> {"type": "ack", "carrier":
                       "device" | "segment" | "frames"} once started (what the rows will take)
    prefill -> decode  {"type": "kv_blocks", "hid", "indices", "hashes", "crcs", "rows"}  as
                       blocks fill, at most ROWS_FRAME_BYTES of rows each; or, with the rows
                       written into the segment's slots, {..., "in_segment": true} and no rows;
                       or, written into the device segment's slots, {..., "in_device": true},
                       no rows and no checksums
                       {"type": "prefill_done", "hid"} or {"type": "prefill_failed", "hid", "error"}
    decode -> prefill  {"type": "cancel", "hid"}  notification: the prefill request is aborted

Checks on every hop that leaves a device (the frames and the shared-memory segment): each row travels with the crc32 of its bytes,
checked on arrival before anything is written; each block's hash must be the one asked for
(the two nodes agree on model, weights and dtype); the format digest must match. A failed
check is a CorruptBlockError for that transfer: the blocks not yet received are asked of
another prefill node.

Faults: a prefill node lost (its connection closes; heartbeats find a frozen one), or silent
for prefill_timeout_s between two messages, ends that transfer; the blocks still awaited are
asked of the next prefill node; when every node was tried, PrefillUnavailableError. Either
way the caller frees what it held (KVManager.free: an awaited block was never registered).

Carriers, chosen per transfer by what the prefill node can open (the decode node offers what
it has; the prefill node takes the first that works, in this order):

    CUDA IPC (one GPU)      the decode node's KV is on a GPU: it allocates a device buffer of
                            row slots for the transfer (DeviceSegment) and offers it as a CUDA IPC
                            handle (torch's CUDA tensor sharing; the fields travel in msgpack).
                            A prefill node on the same GPU (same UUID) opens it and its worker
                            enqueues the copy of its blocks device -> device into the slots (one
                            copy per run of blocks, or one gather kernel: Copier), a thread of the
                            KV manager waits for it, and only indices and hashes are sent; the
                            decode node's worker copies the slots into its cache blocks (a few
                            copies or one scatter kernel, device -> device). No host copy, no
                            checksum: nothing left the device. torch's IPC reference counting keeps
                            the buffer allocated while the prefill node holds it open, so a late
                            writer never writes into memory the decode node gave to anything else.
    shared memory (one host) a /dev/shm file of row slots (RowSegment, mode 0600); the prefill
                            node's worker writes each row there once (device -> segment), the
                            decode node checks its crc32 there and its worker copies it into the
                            cache. On CUDA this is the fallback when IPC cannot be opened (another
                            GPU, a platform without CUDA IPC); the copies then go through pageable
                            memory.
    frames (other hosts)    rows inline in the kv_blocks messages (at most ROWS_FRAME_BYTES each),
                            when the prefill node can open neither.

Why CUDA IPC rather than pinned host memory on one GPU: the rows never cross PCIe (two D2D copies
at HBM speed instead of D2H + H2D at ~25 GB/s each way), no checksum is needed, and the buffer is
one allocation per transfer with no page pinning (cudaHostRegister of a per-transfer /dev/shm
segment costs about as much as the copy it would speed up). The NCCL carrier between two GPUs
(a peer per (prefill, decode) pair, rows as one send/recv on a copy stream) is designed, not built.
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
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

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


class DeviceSegment:
    """Decode side, CUDA: a device buffer of row slots for one transfer (slot k: the k-th block
    asked for), offered to the prefill node as a CUDA IPC handle (`wire`: msgpack-safe fields of
    torch's CUDA tensor sharing, plus the GPU's UUID so that only a process on the same GPU
    opens it). `rows` keeps the buffer alive; torch keeps it allocated after that until the
    prefill node lets it go (an IPC reference count in shared memory, counting one for the
    offer). A prefill node that did not open it says so in its ack: `decline` then drops the
    offer's count here, else the buffer would stay allocated for good."""

    def __init__(self, num_rows: int, nbytes: int, device: torch.device):
        torch.cuda.ipc_collect()  # buffers of earlier transfers that every prefill node has released
        self.rows = torch.empty((num_rows, nbytes), dtype=torch.uint8, device=device)  # [num_rows, nbytes]
        _, args = reduce_tensor(self.rows)
        (_, _, _, _, _, _, _, handle, size_bytes, offset_bytes, _, ref_handle, ref_offset, event_handle,
         event_sync) = args
        self.wire = {"uuid": str(torch.cuda.get_device_properties(device).uuid), "rows": num_rows, "nbytes": nbytes,
                     "handle": handle, "size": size_bytes, "offset": offset_bytes, "ref_handle": ref_handle,
                     "ref_offset": ref_offset, "event": event_handle, "event_sync": bool(event_sync)}

    def decline(self) -> None:
        """The prefill node did not open the buffer: release the reference the offer counted."""
        torch.UntypedStorage._release_ipc_counter_cuda(self.wire["ref_handle"], self.wire["ref_offset"])


def open_device_segment(wire: object, num_rows: int, nbytes: int, device: torch.device) -> torch.Tensor | None:
    """Prefill side: the decode node's DeviceSegment as rows uint8 [num_rows, nbytes] on
    `device` (this node's KV device); None when it is on another GPU or host, or CUDA IPC
    cannot open it here (rows then take the shared-memory segment or the frames). Blocks on
    the CUDA driver: call it off the event loop."""
    if wire is None or device.type != "cuda":
        return None
    try:
        uuid, rows, width = wire["uuid"], wire["rows"], wire["nbytes"]
        fields = (wire["handle"], int(wire["size"]), int(wire["offset"]), wire["ref_handle"], int(wire["ref_offset"]),
                  wire["event"], bool(wire["event_sync"]))
        if not all(isinstance(wire[k], bytes) for k in ("handle", "ref_handle", "event")):
            raise TypeError("its handles are not bytes")
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.FrameError(f"a prefill message's 'device_segment' is malformed: {exc!r}") from exc
    if (rows, width) != (num_rows, nbytes):
        raise errors.FrameError(f"a prefill message's device segment has {rows} x {width} bytes of slots for "
                                f"{num_rows} blocks of {nbytes} bytes")
    if uuid != str(torch.cuda.get_device_properties(device).uuid):
        return None
    handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle, event_sync = fields
    try:
        return rebuild_cuda_tensor(torch.Tensor, torch.Size((num_rows, nbytes)), (nbytes, 1), 0,
                                   torch.storage.TypedStorage, torch.uint8, device.index or 0, handle, size_bytes,
                                   offset_bytes, False, ref_handle, ref_offset, event_handle, event_sync)
    except RuntimeError as exc:  # no CUDA IPC between these processes (platform, permissions)
        log.warning("cannot open the decode node's device segment (%s): rows go through host memory", exc)
        return None


def row_checksums(rows: torch.Tensor) -> list[int]:
    """crc32 of each row of uint8 [n, nbytes] (host memory)."""
    data = rows.numpy()
    return [zlib.crc32(data[i]) for i in range(rows.shape[0])]


def blocks_to_wire(hid: int, indices: Sequence[int], hashes: Sequence[BlockHash], rows: torch.Tensor,
                   carrier: str) -> list[dict]:
    """kv_blocks messages for rows uint8 [n, nbytes] of table entries `indices`. carrier
    "device": the rows are already in the decode node's device segment (one message, no
    checksums); "segment": already in its shared-memory segment (one message, with their
    checksums); "frames": the rows travel in messages of at most ROWS_FRAME_BYTES of rows each
    (at least one row)."""
    n, nbytes = rows.shape
    if carrier == "device":
        return [{"type": "kv_blocks", "hid": hid, "indices": list(indices), "hashes": list(hashes), "crcs": [],
                 "in_device": True}]
    crcs = row_checksums(rows)
    if carrier == "segment":
        return [{"type": "kv_blocks", "hid": hid, "indices": list(indices), "hashes": list(hashes), "crcs": crcs,
                 "in_segment": True}]
    per = max(1, ROWS_FRAME_BYTES // max(nbytes, 1))
    return [{"type": "kv_blocks", "hid": hid, "indices": list(indices[a:a + per]), "hashes": list(hashes[a:a + per]),
             "crcs": crcs[a:a + per], "rows": rows[a:a + per].numpy().tobytes()} for a in range(0, n, per)]


def blocks_from_wire(msg: dict, want: dict[int, BlockHash], fmt: BlockFormat, segment: RowSegment | None = None,
                     slot_of: dict[int, int] | None = None, device_segment: DeviceSegment | None = None
                     ) -> tuple[list[int], torch.Tensor]:
    """Check a kv_blocks message against the blocks asked for -> (indices, rows uint8 [n,
    nbytes]: from the message, or views of the segment's slots: host or device memory).
    CorruptBlockError for a checksum, hash or size that does not match, or a block not asked
    for (or sent twice); rows said to be in a segment of the other kind than `segment`."""
    try:
        indices, hashes, crcs = [int(i) for i in msg["indices"]], list(msg["hashes"]), list(msg["crcs"])
        in_device, in_segment = bool(msg.get("in_device")), bool(msg.get("in_segment"))
        data = None if in_device or in_segment else msg["rows"]
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.FrameError(f"malformed kv_blocks message: {exc!r}") from exc
    n = len(indices)
    for i, h in zip(indices, hashes):
        if want.get(i) != h:
            raise errors.CorruptBlockError(f"kv_blocks: block {i} {'is not awaited' if i not in want else 'has hash '}"
                                           f"{'' if i not in want else bytes(h).hex()}; the prefill node and this node "
                                           "disagree on the prompt, model or dtype")
    if len(hashes) != n or len(crcs) != (0 if in_device else n):
        raise errors.CorruptBlockError(f"kv_blocks: {n} indices, {len(hashes)} hashes, {len(crcs)} checksums")
    if data is None:
        segment = device_segment if in_device else segment
        if segment is None:
            raise errors.CorruptBlockError(f"kv_blocks: rows said to be in a {'device ' * in_device}segment, but none "
                                           "was offered")
        slots = [slot_of[i] for i in indices]
        contiguous = slots == list(range(slots[0], slots[0] + n)) if n else True
        rows = segment.rows[slots[0]:slots[0] + n] if contiguous and n else \
            segment.rows[torch.tensor(slots, device=segment.rows.device)]
        if in_device:
            return indices, rows  # never left the device: nothing to check
    elif isinstance(data, bytes) and len(data) == n * fmt.nbytes:
        rows = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(n, fmt.nbytes) if n else \
            torch.empty((0, fmt.nbytes), dtype=torch.uint8)
    else:
        raise errors.CorruptBlockError(f"kv_blocks: {len(data) if isinstance(data, bytes) else '?'} bytes of rows "
                                       f"for {n} blocks of {fmt.nbytes} bytes")
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

    async def fetch(self, token_ids: Sequence[int], want: dict[int, BlockHash], fmt: BlockFormat,
                    device: torch.device, acked: Callable[[], None] | None = None
                    ) -> AsyncIterator[tuple[list[int], torch.Tensor]]:
        """The blocks `want` ({table index: hash}) of the prompt `token_ids` (whole blocks), from
        the prefill nodes: yields (indices, rows uint8 [n, fmt.nbytes]) as they arrive, each
        checked; rows in host memory, or on `device` (this node's KV device) when they came
        through CUDA IPC. `acked()` is called when a prefill node acknowledges the transfer (its
        carrier open: what follows is the copy). A node that fails hands the blocks still awaited
        to the next; PrefillUnavailableError when every node failed (the causes in its message)."""
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
                async for indices, rows in self._fetch_from(j, token_ids, want, fmt, device, acked):
                    for i in indices:
                        del want[i]
                    yield indices, rows
            except (errors.PeerLostError, errors.CorruptBlockError, errors.FrameError) as exc:
                causes.append(f"prefill node {j}: {exc}")
                if want:
                    self.num_retries += 1
                    log.warning("KV hand-off from prefill node %d failed (%s); %d block(s) still awaited", j, exc,
                                len(want))

    async def _fetch_from(self, j: int, token_ids: Sequence[int], want: dict[int, BlockHash], fmt: BlockFormat,
                          device: torch.device, acked: Callable[[], None] | None
                          ) -> AsyncIterator[tuple[list[int], torch.Tensor]]:
        client = await self._client(j)
        device_segment = None
        if device.type == "cuda":
            try:
                device_segment = await asyncio.to_thread(DeviceSegment, len(want), fmt.nbytes, device)
            except RuntimeError as exc:  # no room for the slots, or no CUDA IPC here: rows go through host memory
                log.warning("no device segment for a KV hand-off (%s): rows go through host memory", exc)
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
            ack = await client.request({"type": "prefill", "hid": hid, "token_ids": list(token_ids),
                                        "want": [[i, want[i]] for i in sorted(want)], "format": fmt.name,
                                        "digest": fmt.digest, "segment": None if segment is None else segment.name,
                                        "device_segment": None if device_segment is None else device_segment.wire},
                                       timeout_s=timeout_s)
            if acked is not None:
                acked()
            if device_segment is not None and ack.get("carrier") != "device":
                device_segment.decline()
                device_segment = None
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
                    yield blocks_from_wire(msg, want, fmt, segment, slot_of, device_segment)
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
