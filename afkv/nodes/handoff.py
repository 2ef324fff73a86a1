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
                       "format": name, "digest": the format's digest, "segment": offer or None,
                       "device_segment": offer or None, "nccl": offer or None} -> {"type":
                       "ack", "carrier": "device" | "nccl" | "segment" | "frames"} once started
                       (what the rows will take; a "device" ack also names the prefill
                       process, "process": {"pid", "start"}: process_identity); an offer
                       names the link's staging buffer (a RowSegment's {"name", "rows"}, a
                       DeviceSegment's CUDA IPC fields with its
                       "id"; for nccl the link communicator's unique "id", the decode GPU's
                       "gpu" and the buffer's "rows") and "slots": the row of the k-th block
                       asked for (table order)
    prefill -> decode  {"type": "nccl_joining", "hid", "comm": id}  before the ack, when the
                       prefill node joins the offered communicator: the decode node joins too
    prefill -> decode  {"type": "kv_blocks", "hid", "indices", "hashes", "crcs", "rows"}  as
                       blocks fill, at most ROWS_FRAME_BYTES of rows each; or, with the rows
                       written into the segment's slots, {..., "in_segment": true} and no rows;
                       or, written into the device segment's slots, {..., "in_device": true},
                       no rows and no checksums; or, sent over the link's communicator,
                       {..., "in_nccl": true}, no rows and no checksums (the decode node posts
                       the matching receive as the message arrives)
                       then exactly one of {"type": "prefill_done", "hid"}, {"type":
                       "prefill_failed", "hid", "error"}, {"type": "prefill_cancelled", "hid"}
    decode -> prefill  {"type": "cancel", "hid"}  notification: the prefill request is aborted;
                       answered by prefill_cancelled once no write into its slots is in flight
                       (at once when the stream already ended or never started: messages of a
                       connection are handled in order, so the answer follows the request's)
    decode -> prefill  {"type": "release", "hid", "buffer": id} -> {"type": "released", "opened"}
                       for a device buffer whose offer got no answer (its request timed out, was
                       cancelled or refused): the prefill node lets go of it if it holds it and
                       says whether it ever opened it (DeviceSegment: who releases its count)
    prefill -> decode  {"type": "let_go", "buffers": [id]} -> ack: the prefill node closes (its
                       streams ended) and has let go of these device buffers; then its
                       connection ends

Checks on every hop that leaves a device (the frames and the shared-memory segment): each row travels with the crc32 of its bytes,
checked on arrival before anything is written; each block's hash must be the one asked for
(the two nodes agree on model, weights and dtype); the format digest must match. A failed
check is a CorruptBlockError for that transfer: the blocks not yet received are asked of
another prefill node.

Faults: a prefill node lost (its connection closes; heartbeats find a frozen one), or silent
for prefill_timeout_s between two messages, ends that transfer; the blocks still awaited are
asked of the next prefill node; when every node was tried, PrefillUnavailableError. Either
way the caller frees what it held (KVManager.free: an awaited block was never registered).

Carriers, chosen per link by what the prefill node can open (the decode node offers what it
has on a link's first transfer; the prefill node takes the first that works, in this order: CUDA
IPC, NCCL, shared memory, frames; later transfers offer only that one):

    CUDA IPC (one GPU)      the decode node's KV is on a GPU: its row slots are a device buffer
                            (DeviceSegment), offered as a CUDA IPC handle (torch's CUDA tensor
                            sharing; the fields travel in msgpack). A prefill node on the same GPU
                            (same UUID) opens it and its worker enqueues the copy of its blocks
                            device -> device into the slots (one copy per run of blocks, or one
                            gather kernel: Copier), a thread of the KV manager waits for it, and
                            only indices and hashes are sent; the decode node's worker copies the
                            slots into its cache blocks (a few copies or one scatter kernel,
                            device -> device). No host copy, no checksum: nothing left the device.
    shared memory (one host) a /dev/shm file of row slots (RowSegment, mode 0600, its name unlinked
                            once the prefill node has opened it); the prefill node's worker writes
                            each row there once (device -> segment), the decode node checks its
                            crc32 there and its worker copies it into the cache. On CUDA this is the
                            fallback when IPC cannot be opened (another GPU, a platform without CUDA
                            IPC); the copies then go through pageable memory.
    NCCL (another GPU)      a prefill node on another GPU (of this host or another; CuPy's NCCL
                            on both): the link's two-rank communicator (NcclLink: decode rank 0,
                            prefill rank 1), its unique id in the first offer, joined once by
                            both (the prefill node before its ack, with a deadline: a failed join
                            acks the next carrier and the decode node drops its end). The decode
                            node's slots are a device buffer of its GPU (NcclBuffer); the prefill
                            node's worker exports the rows into the link's send buffer on its
                            own GPU (a Staging of that side: leased per transfer, given back
                            when the export and its sends are done, freed with the link), and
                            the link's thread sends them (one NCCL group per kv_blocks
                            message, a send per run of consecutive slots), in the order of the
                            messages, which the prefill node sends after enqueueing them; the
                            decode node's message handler posts the matching receives in that
                            same order, on its link's thread, and the transfer waits for them
                            once per message before its worker copies the slots into the cache.
                            No checksum (device to device). A receive with nothing coming for
                            prefill_timeout_s, or a prefill node lost, aborts the communicator:
                            its receives end with PeerLostError, the link drops it (the next
                            transfer offers a new one) and the transfer goes on elsewhere. A
                            join whose peer failed after announcing it cannot be interrupted (no
                            non-blocking creation: NcclLink): its thread stays, holding nothing
                            of the link. The NCCL calls are behind the `NCCL` seam (CudaNccl),
                            which CPU tests fake.
    frames (other hosts)    rows inline in the kv_blocks messages (at most ROWS_FRAME_BYTES each),
                            when the prefill node can open neither.

Staging (the slots of one link): the buffer is allocated once per link and the prefill node opens
it once, keeping it open under its id while the connection lasts; a transfer leases slots of it
(Lease) and costs no allocation and no handle. The ordering rule that lets slots be reused: a
transfer's slots go back only when (1) the prefill node has ended the transfer (its terminal
message, sent after every write into them completed: export_prefill waits for its copies even
when cancelled) and (2) the decode node's copies out of them are done (the futures of its
KVManager.receive jobs). A cancelled or failed transfer therefore drains: the decode node sends
cancel and gives the slots back at prefill_cancelled (a slot whose answer can no longer come,
the connection ended, is abandoned: its buffer retired). Transfers at once lease disjoint slots;
one that finds too few free gets a grown buffer (every slot in flight + its own), the old one
retired. A retired buffer is closed when its last lease ends; a connection that ends retires the
link's buffers. A device buffer then stays allocated until its offer's IPC count is released,
exactly once (torch's count keeps it while another process holds it open, so a late writer
never writes into memory given to anything else): by the prefill node when it lets go of what
it opened (a newer id, its connection's end, its close), or here for an offer it declined; an
offer whose answer never came is retired at once and settled by a release request when its
last lease ends (DeviceSegment). A prefill process that dies holding a buffer never lets go
of it: its device ack named the process (pid and start time, checked against /proc here: the
same host, since it opened this GPU's memory), which the decode node holds by a pidfd; when the
connection ends and that process has exited (within EXIT_GRACE_S: a killed process closes its
sockets a moment before it counts as exited), the decode node releases the count of each
buffer it held on its behalf, once, with a warning (handoff_released_for_exited_prefill). A
process alive then lets go itself (its side sees the connection end), and nothing is released
here later: a later death cannot be told from a let-go followed by a death, and a second
release would keep the buffer allocated for good (its count below zero). What still stays
allocated until the decode process ends: a buffer held by a prefill process alive when its
connection ended (frozen, say) that dies before it lets go; any buffer whose prefill process
cannot be told (no os.pidfd_open: Linux < 5.3; no /proc; another pid namespace: a warning says
so); a buffer superseded by a newer one (grown) whose transfers were abandoned when the
connection ended, when the prefill process had ended them, let go of it and died within
EXIT_GRACE_S (released twice: kept). Gauges: handoff_staging_live_buffers (buffers a Staging
has not closed, both roles), handoff_unsettled_offers (device offers being settled);
handoff_staging_buffers counts allocations.

Why CUDA IPC rather than pinned host memory on one GPU: the rows never cross PCIe (two D2D copies
at HBM speed instead of D2H + H2D at ~25 GB/s each way), no checksum is needed, and no page
pinning. The NCCL carrier has run on CPU with its NCCL calls faked only, not yet on two GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import mmap
import os
import re
import secrets
import select
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
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
EXIT_GRACE_S = 2.0  # a killed process closes its sockets a moment before it counts as exited


class RowSegment:
    """Decode side: a shared-memory file of row slots for one transfer (slot k: the k-th block
    asked for, in table order), mode 0600, named in the prefill message. A prefill node on the
    same host writes rows there and sends only their indices, hashes and checksums. `rows` (and
    every view of it) keeps the mapping alive after `unlink`."""

    kind = "segment"

    def __init__(self, num_rows: int, nbytes: int):
        self.name = f"afkv-handoff-{os.getpid()}-{secrets.token_hex(8)}"
        self.num_rows = num_rows
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

    @property
    def offer(self) -> dict:
        return {"name": self.name, "rows": self.num_rows}

    def unlink(self) -> None:
        """Remove the name (the memory goes with the last view of `rows`)."""
        self.path.unlink(missing_ok=True)

    def answered(self, opened: bool) -> None:
        """The prefill node has tried to open the segment (opened or not): the name can go."""
        self.unlink()

    close = unlink


def open_segment(offer: object, nbytes: int) -> torch.Tensor | None:
    """Prefill side: the decode node's segment ({"name", "rows"}) as rows uint8 [rows, nbytes];
    None when this host has no such segment (the decode node runs elsewhere): rows then travel in
    frames."""
    try:
        name, num_rows = offer["name"], int(offer["rows"])
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.FrameError(f"a prefill message's 'segment' is malformed: {exc!r}") from exc
    if not isinstance(name, str) or not _SEGMENT_NAME.fullmatch(name) or num_rows <= 0:
        raise errors.FrameError(f"a prefill message's 'segment' is not a row segment: {name!r:.60}, {num_rows} rows")
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
    """Decode side, CUDA: a device buffer of row slots, offered to the prefill node as a CUDA IPC
    handle (`offer`: msgpack-safe fields of torch's CUDA tensor sharing, the GPU's UUID so that
    only a process on the same GPU opens it, and an id unique in this process, under which the
    prefill node keeps it open). `rows` keeps the buffer alive; torch keeps it allocated after
    that until the offer's count is released (an IPC reference count in shared memory, one for
    the offer), exactly once: by the prefill node when it lets go of the buffer it opened (at a
    newer id of the link, or its connection's end), or here (`decline`) when it did not open it.

    Who releases the count is what the prefill node answers (`answered`): its ack (opened: the
    carrier is "device") or, for an offer whose ack never came (the request timed out, was
    cancelled, or its connection failed), `settle`: called by `close` (the buffer retired and no
    lease left), it asks the prefill node whether it ever opened the buffer (PrefillLinks: a
    `release` request, answered in the connection's order, so after every request that named
    it) and answers. A buffer offered without an answer is retired at once (never offered
    again), so nothing can open it after that question. A buffer it opened is held by its
    process (`holder`, PrefillProcess), which the link releases it for if it exits holding it
    (PrefillLinks._reap)."""

    kind = "device"
    _ids = itertools.count()

    def __init__(self, num_rows: int, nbytes: int, device: torch.device,
                 settle: Callable[[DeviceSegment], None] | None = None):
        torch.cuda.ipc_collect()  # buffers that every prefill node has released
        self.num_rows = num_rows
        self.rows = torch.empty((num_rows, nbytes), dtype=torch.uint8, device=device)  # [num_rows, nbytes]
        _, args = reduce_tensor(self.rows)
        (_, _, _, _, _, _, _, handle, size_bytes, offset_bytes, _, ref_handle, ref_offset, event_handle,
         event_sync) = args
        self.offer = {"id": next(self._ids), "uuid": str(torch.cuda.get_device_properties(device).uuid),
                      "rows": num_rows, "nbytes": nbytes, "handle": handle, "size": size_bytes,
                      "offset": offset_bytes, "ref_handle": ref_handle, "ref_offset": ref_offset,
                      "event": event_handle, "event_sync": bool(event_sync)}
        self.opened: bool | None = None  # by the prefill node; None: no answer yet
        self.holder: PrefillProcess | None = None  # the process that opened it (its ack named it), if known
        self.closed = False
        self.abandoned = False  # a lease of it ended without its writer's last word (Lease.abandon)
        self._settle = settle

    @staticmethod
    def available(device: torch.device) -> bool:
        return device.type == "cuda"

    def answered(self, opened: bool) -> None:
        """The prefill node's first answer naming this buffer: opened (it keeps it open for the
        connection, and its letting go releases the offer's count) or not (released here)."""
        if self.opened is None:
            self.opened = opened
            if not opened:
                self.decline()

    def decline(self) -> None:
        """The prefill node did not open the buffer: release the reference the offer counted."""
        torch.UntypedStorage._release_ipc_counter_cuda(self.offer["ref_handle"], self.offer["ref_offset"])

    def close(self) -> None:
        """Retired, no lease left: the memory goes with the last view of `rows` once the offer's
        count is released; an offer never answered is settled first, and one opened is told to
        the link (`settle`: whether its holder let go of it)."""
        self.closed = True
        if self.opened is not False and self._settle is not None:
            self._settle(self)


def process_identity(pid: int | None = None) -> dict | None:
    """{"pid", "start"} of a process of this host (this one by default): its pid and its start
    time (/proc/<pid>/stat, clock ticks since boot), which together name one process: a reused
    pid, or a pid of another pid namespace, names another; None without /proc or that pid."""
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return {"pid": pid, "start": int(stat.rsplit(")", 1)[1].split()[19])}  # field 22: starttime
    except (OSError, IndexError, ValueError):
        return None


class PrefillProcess:
    """Decode side: the prefill process at the other end of one connection, as its device acks
    name it (`process_identity`: it opened a CUDA IPC buffer of this GPU, so it runs on this
    host), held by a pidfd (os.pidfd_open) opened when it is learned, so that a reused pid
    cannot pass for it. `held`: the device buffers it opened that it may still hold, whose
    counts PrefillLinks releases on its behalf if it exits holding them.

    Owns (loop thread only): `held`, `newest` (the highest buffer id it acked: it let go of every
    older one of the link when it opened that one), the pidfd (closed by `close`)."""

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self.held: set[DeviceSegment] = set()
        self.newest = -1
        self._pidfd: int | None = pidfd

    @classmethod
    def learn(cls, wire: object) -> PrefillProcess | None:
        """The process an ack names ({"pid", "start"}), None when it cannot be told apart from
        others here: no pidfd (Linux < 5.3, or not Linux), no /proc, or the pid names another
        process here (another pid namespace) or none. The pidfd is opened first: a stat that
        then matches is that very process, even when it has exited since (a zombie keeps its
        stat until reaped, and its pid is not reused before)."""
        pidfd_open = getattr(os, "pidfd_open", None)
        try:
            pid, start = int(wire["pid"]), int(wire["start"])
        except (KeyError, TypeError, ValueError):
            return None
        if pidfd_open is None or pid <= 0:
            return None
        try:
            pidfd = pidfd_open(pid)
        except OSError:  # no such process, or pidfds not supported by this kernel
            return None
        if process_identity(pid) != {"pid": pid, "start": start}:
            os.close(pidfd)
            return None
        return cls(pid, pidfd)

    def acked(self, seg: DeviceSegment) -> None:
        """It opened `seg` (its ack): it holds it. Opening it, it let go of every older buffer of
        the link, which it released once its transfers into them ended: those closed here with
        every transfer ended by its last message leave `held` (one still leased leaves at its
        close: `closed_here`)."""
        seg.holder = self
        self.held.add(seg)
        self.newest = max(self.newest, seg.offer["id"])
        self.held = {s for s in self.held if not self._released(s)}

    def closed_here(self, seg: DeviceSegment) -> None:
        """`seg`, which it opened, is closed here (retired, no lease left)."""
        if self._released(seg):
            self.held.discard(seg)

    def _released(self, seg: DeviceSegment) -> bool:
        """Released there: superseded (a newer buffer acked), and every transfer into it ended
        with its last message (its writes, and with them its references, are gone)."""
        return seg.closed and not seg.abandoned and seg.offer["id"] < self.newest

    def exited(self) -> bool:
        """Whether the process has exited (its pidfd is readable then)."""
        if self._pidfd is None:
            raise RuntimeError("the prefill process's pidfd is closed")
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(0))

    async def wait_exited(self, timeout_s: float) -> bool:
        """Whether the process exits within timeout_s (waits on the pidfd, in the event loop)."""
        if self.exited():
            return True
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        loop.add_reader(self._pidfd, lambda: gone.done() or gone.set_result(None))
        try:
            await asyncio.wait_for(gone, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self._pidfd)

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def open_device_segment(offer: object, nbytes: int, device: torch.device) -> tuple[int, torch.Tensor] | None:
    """Prefill side: the decode node's DeviceSegment -> (its id, rows uint8 [rows, nbytes] on
    `device`, this node's KV device); None when it is on another GPU or host, or CUDA IPC
    cannot open it here (rows then take the shared-memory segment or the frames). Blocks on
    the CUDA driver: call it off the event loop."""
    if offer is None or device.type != "cuda":
        return None
    try:
        seg_id, uuid, rows, width = int(offer["id"]), offer["uuid"], int(offer["rows"]), offer["nbytes"]
        fields = (offer["handle"], int(offer["size"]), int(offer["offset"]), offer["ref_handle"],
                  int(offer["ref_offset"]), offer["event"], bool(offer["event_sync"]))
        if not all(isinstance(offer[k], bytes) for k in ("handle", "ref_handle", "event")):
            raise TypeError("its handles are not bytes")
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.FrameError(f"a prefill message's 'device_segment' is malformed: {exc!r}") from exc
    if width != nbytes or rows <= 0:
        raise errors.FrameError(f"a prefill message's device segment has {rows} x {width} bytes of slots for "
                                f"blocks of {nbytes} bytes")
    if uuid != str(torch.cuda.get_device_properties(device).uuid):
        return None
    handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle, event_sync = fields
    try:
        return seg_id, rebuild_cuda_tensor(torch.Tensor, torch.Size((rows, nbytes)), (nbytes, 1), 0,
                                           torch.storage.TypedStorage, torch.uint8, device.index or 0, handle,
                                           size_bytes, offset_bytes, False, ref_handle, ref_offset, event_handle,
                                           event_sync)
    except RuntimeError as exc:  # no CUDA IPC between these processes (platform, permissions)
        log.warning("cannot open the decode node's device segment (%s): rows go through host memory", exc)
        return None


class NcclBuffer:
    """NCCL: a device buffer of row slots of one link on this node's GPU: on the decode node the
    link's communicator receives into it, on the prefill node its worker exports the rows there
    and the link's thread sends them (nothing is shared with another process: no handle, no id)."""

    kind = "nccl"

    def __init__(self, num_rows: int, nbytes: int, device: torch.device):
        self.num_rows = num_rows
        self.rows = torch.empty((num_rows, nbytes), dtype=torch.uint8, device=device)  # [num_rows, nbytes]
        self.offer = {"rows": num_rows, "nbytes": nbytes}

    def answered(self, opened: bool) -> None:
        """Nothing to release: the prefill node opens nothing of it."""

    def close(self) -> None:
        """Nothing to do: the memory goes with the last view of `rows`."""


class CudaNccl:
    """The NCCL primitives of the nccl carrier (afkv.transport.nccl through CuPy's libnccl): the
    seam `NCCL` names, which a CPU test replaces with a fake of the same methods."""

    def gpu(self, device: torch.device) -> str | None:
        """This device's identity for NCCL (its GPU's UUID: NCCL refuses two ranks on one GPU),
        None when the carrier cannot run here (not CUDA, or no CuPy NCCL)."""
        return _gpu_identity(device) if device.type == "cuda" else None

    def new_id(self) -> str:
        from afkv.transport.nccl import new_unique_id

        return new_unique_id()

    def join(self, unique_id: str, rank: int, device: torch.device) -> CudaChannel:
        """Blocks until the other rank joins (call it on a thread of its own)."""
        from afkv.transport.nccl import NcclPeer

        return CudaChannel(NcclPeer(unique_id, rank, device), device)


class CudaChannel:
    """One end of a link's two-rank communicator: moves lists of contiguous uint8 views, as one
    NCCL group on a stream of its own, and waits for them with a deadline (then aborts)."""

    def __init__(self, peer, device: torch.device):
        self._peer, self._device = peer, device
        with torch.cuda.device(device):
            self._stream = torch.cuda.Stream(device)
        self.aborted = False

    def send(self, views: list[torch.Tensor], timeout_s: float) -> None:
        self._move(self._peer.send, views, timeout_s)

    def recv(self, views: list[torch.Tensor], timeout_s: float) -> None:
        self._move(self._peer.recv, views, timeout_s)

    def _move(self, op: Callable, views: list[torch.Tensor], timeout_s: float) -> None:
        with torch.cuda.device(self._device):
            with self._peer.group():
                for v in views:
                    op(v, self._stream)
            done = torch.cuda.Event()
            done.record(self._stream)
            deadline = time.monotonic() + timeout_s
            while not done.query():  # once per kv_blocks message, on the link's thread
                if self.aborted:
                    break
                if time.monotonic() > deadline:
                    self.abort()
                    raise errors.PeerLostError(f"NCCL hand-off: no progress within {timeout_s:.0f} s; "
                                               "communicator aborted")
                time.sleep(0.0002)
        if self.aborted:  # the kernels of an aborted communicator end without their bytes
            raise errors.PeerLostError("NCCL hand-off: the link's communicator was aborted")

    def abort(self) -> None:
        self.aborted = True
        self._peer.abort()

    def close(self) -> None:
        self._peer.close()


@functools.cache
def _gpu_identity(device: torch.device) -> str | None:
    """(CudaNccl.gpu, once per device: the first call imports CuPy.)"""
    from afkv.transport.nccl import nccl_module

    try:
        nccl_module()
    except errors.TransportError:
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


NCCL = CudaNccl()  # the seam: tests put a fake here


async def moved(move: Future) -> None:
    """Wait for an NcclLink move; one cancelled by the link's abort is its PeerLostError."""
    try:
        await asyncio.wrap_future(move)
    except asyncio.CancelledError:
        if not move.cancelled():
            raise  # this waiter was cancelled
        raise errors.PeerLostError("NCCL hand-off: the link's communicator was aborted") from None


class NcclLink:
    """One side of a (decode node, prefill node) link's communicator (decode rank 0, prefill
    rank 1), made from the unique id of the link's first nccl offer. `start` joins it on a
    daemon thread of its own; `move` then runs sends (prefill) or receives (decode) one at a
    time on the link's thread, in the order they are submitted: both sides submit in the order
    of the connection's kv_blocks messages, so every send meets its receive. `abort` ends it:
    pending and later moves fail with PeerLostError.

    A join whose peer never comes (it failed after announcing its join) blocks in
    ncclCommInitRank, which nothing can interrupt: CuPy 14's NcclCommunicator has no
    non-blocking creation (its NcclConfig sets only split_share, not `blocking`), and
    afkv.transport.nccl's ctypes path calls the blocking ncclCommInitRank. Such a thread stays
    until the process ends; what it can hold is bounded: the id, the device and the `joined`
    future, never this link (an aborted link is dropped and freed, and the next transfer offers
    a new communicator), a lease, a pool's worker, or a lock the event loop takes. If the join
    returns after the link was aborted, the thread aborts what it made."""

    def __init__(self, nccl, unique_id: str, rank: int, device: torch.device, timeout_s: float):
        self.uid, self.rank, self.device, self.timeout_s = unique_id, rank, device, timeout_s
        self._nccl = nccl
        self.joined: Future = Future()  # the channel; cancelled by abort before the join ends
        self.aborted = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"afkv-nccl{rank}")
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            threading.Thread(target=_join, args=(self._nccl, self.uid, self.rank, self.device, self.joined),
                             name=f"afkv-nccl-join{self.rank}", daemon=True).start()

    def move(self, send: bool, views: list[torch.Tensor]) -> Future:
        """Send (or receive into) `views` after every move submitted before -> its Future
        (PeerLostError when the link is aborted, or the peer is silent for timeout_s)."""
        try:
            return self._pool.submit(self._move, send, views)
        except RuntimeError:  # aborted: the pool is shut down
            failed: Future = Future()
            failed.set_exception(errors.PeerLostError("NCCL hand-off: the link's communicator was aborted"))
            return failed

    def _move(self, send: bool, views: list[torch.Tensor]) -> None:
        try:
            channel = self.joined.result(self.timeout_s)
        except FutureTimeout as exc:
            self.abort()
            raise errors.PeerLostError(f"NCCL hand-off: the communicator was not joined within "
                                       f"{self.timeout_s:.0f} s") from exc
        except Exception as exc:
            raise errors.PeerLostError(f"NCCL hand-off: no communicator: {exc}") from exc
        if self.aborted:
            raise errors.PeerLostError("NCCL hand-off: the link's communicator was aborted")
        try:
            (channel.send if send else channel.recv)(views, self.timeout_s)
        except errors.TransportError as exc:  # the communicator is out of step from here: no more moves
            self.abort()
            raise errors.PeerLostError(f"NCCL hand-off failed: {exc}") from exc

    def abort(self) -> None:
        """Drop the communicator: moves in progress end (their kernels abort), later ones fail;
        a join still running aborts what it makes when it returns."""
        if self.aborted:
            return
        self.aborted = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if not self.joined.cancel() and not self.joined.cancelled() and self.joined.exception() is None:
            threading.Thread(target=self.joined.result().abort, name="afkv-nccl-abort", daemon=True).start()


def _join(nccl, unique_id: str, rank: int, device: torch.device, joined: Future) -> None:
    """NcclLink.start's thread: join the communicator -> `joined` (a module function, so that a
    join that never returns holds no link)."""
    try:
        channel = nccl.join(unique_id, rank, device)
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the link
        with contextlib.suppress(InvalidStateError):  # (aborted meanwhile: nobody waits)
            joined.set_exception(exc)
        return
    try:
        joined.set_result(channel)
    except InvalidStateError:  # the link was aborted while this joined
        channel.abort()


def runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive slots -> [(first k, first slot, length)]: one NCCL send/receive each
    (both sides cut a kv_blocks message's rows the same way: by the decode node's slots)."""
    out: list[tuple[int, int, int]] = []
    for k, s in enumerate(slots):
        if out and out[-1][1] + out[-1][2] == s:
            k0, s0, n = out[-1]
            out[-1] = (k0, s0, n + 1)
        else:
            out.append((k, s, 1))
    return out


class Lease:
    """Slots `slots` of a Staging buffer, held by one transfer (slot k: the k-th block asked
    for). They go back to the staging only when both writer and reader are done with them: on
    the decode node, the prefill node (its terminal message for the transfer: prefill_done,
    prefill_failed, or prefill_cancelled, its answer to a cancel) and this node's copies out of
    them (the futures of `KVManager.receive` jobs, `imported`); on the prefill node (its NCCL
    send buffer), its export (done when export_prefill returns) and the sends out of them
    (`imported`). A transfer whose writer cannot be asked (the connection failed while
    cancelling) is `abandon`ed: its slots never come back and its buffer is retired."""

    def __init__(self, staging: Staging, buffer: DeviceSegment | RowSegment | NcclBuffer, slots: list[int]):
        self.staging, self.buffer, self.slots = staging, buffer, slots
        self.slot_of: dict[int, int] = {}  # block table index -> its slot (set by the transfer)
        self.link: NcclLink | None = None  # nccl: the communicator the transfer was offered on
        self._imports: list[Future] = []
        self._writer_done = False
        self._released = False

    def imported(self, future: Future | None) -> None:
        if future is not None:
            self._imports.append(future)

    def writer_done(self) -> None:
        """The writer writes no more into the slots: give them back once the reads out of them
        have completed (a callback on the event loop, never a wait)."""
        if self._writer_done:
            return
        self._writer_done = True
        pending = [asyncio.wrap_future(f) for f in self._imports if not f.done()]
        if not pending:
            self._release()
            return
        asyncio.gather(*pending, return_exceptions=True).add_done_callback(lambda _: self._release())

    def abandon(self) -> None:
        """Whether the writer still writes is unknown: never hand the slots out again."""
        if not self._released:
            if self.staging.kind == "device":
                self.buffer.abandoned = True  # (its holder may still hold it: PrefillProcess)
            self._writer_done = self._released = True
            self.staging.retire(self.buffer)
            self.staging.give_back(self.buffer, self.slots)

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.staging.give_back(self.buffer, self.slots)


class Staging:
    """The row slots of one link's carrier, allocated once and kept while the link lasts, so
    that a transfer costs no allocation and no handle opening. On the decode node: "device" (a
    DeviceSegment: the prefill node keeps it open under its id), "segment" (a RowSegment),
    "nccl" (an NcclBuffer the communicator receives into); on the prefill node, "nccl": its send
    buffer. Transfers lease disjoint slots; a transfer that needs more than are free gets a new
    buffer of max(capacity, leased + needed) rows (grown: leased counts every buffer's slots in
    flight, so a burst of transfers sizes the buffer for the next), the old one retired. A
    retired buffer is closed (`buffer.close()`: freed, as far as this node holds it) when its
    last lease is given back, at once when it has none.

    Owns (loop thread only): `buffer` (the one new leases come from), `_free` (its free slots,
    ascending; a lease takes the first run of consecutive slots that fits, so that copies into
    it are one slice and the prefill node's rows are one view of it), `_held` (slots held by
    leases, per buffer not yet closed: the current one and retired ones), `num_buffers`
    (allocations so far: the set-up a kept buffer saves). counters (the KV manager's, so that
    metrics show them): "handoff_staging_buffers" counts allocations, the gauge
    "handoff_staging_live_buffers" the buffers not yet closed."""

    def __init__(self, kind: str, make: Callable[[int], DeviceSegment | RowSegment | NcclBuffer],
                 counters: Counter[str] | None = None, runs_only: bool = False):
        """runs_only: a lease is always one run of consecutive slots (grown when no run fits):
        its rows are then one view of the buffer, never a gathered copy."""
        self.kind = kind
        self._make = make
        self._runs_only = runs_only
        self._counters: Counter[str] = Counter() if counters is None else counters
        self.buffer: DeviceSegment | RowSegment | NcclBuffer | None = None
        self._free: list[int] = []
        self._held: dict[DeviceSegment | RowSegment | NcclBuffer, int] = {}
        self._growing = asyncio.Lock()
        self._closed = False
        self.num_buffers = 0

    @property
    def num_live(self) -> int:
        """Buffers not yet closed: the current one and retired ones that leases still hold."""
        return len(self._held)

    @property
    def _leased(self) -> int:
        """Slots held by leases, of every buffer."""
        return sum(self._held.values())

    async def lease(self, n: int) -> Lease:
        """n slots (raises what allocating a new buffer raises: RuntimeError, OSError); a new
        buffer is allocated off the event loop (the CUDA driver may block)."""
        async with self._growing:
            if self._closed:
                raise RuntimeError("the link's staging is closed")
            if self.buffer is None or len(self._free) < n or self._runs_only and self._run(n) is None:
                capacity = max(n + self._leased, 0 if self.buffer is None else self.buffer.num_rows)
                buffer = await asyncio.to_thread(self._make, capacity)
                self.num_buffers += 1
                self._counters["handoff_staging_buffers"] += 1
                self._counters["handoff_staging_live_buffers"] += 1
                self._held[buffer] = 0
                self.retire(self.buffer)
                if self._closed:  # closed while it was made: never leased
                    self._close(buffer)
                    raise RuntimeError("the link's staging is closed")
                self.buffer, self._free = buffer, list(range(capacity))
            free, at = self._free, self._run(n)  # the first run of n consecutive slots, else the n lowest
            at = 0 if at is None else at
            slots, self._free = free[at:at + n], free[:at] + free[at + n:]
            self._held[self.buffer] += n
            return Lease(self, self.buffer, slots)

    def _run(self, n: int) -> int | None:
        """Where the first run of n consecutive free slots starts in `_free` (ascending)."""
        free = self._free
        return next((k for k in range(len(free) - n + 1) if free[k + n - 1] - free[k] == n - 1), None)

    def give_back(self, buffer: DeviceSegment | RowSegment | NcclBuffer, slots: list[int]) -> None:
        """A lease's end (abandoned: `buffer` retired, the slots never handed out again)."""
        self._held[buffer] -= len(slots)
        if buffer is self.buffer:
            self._free = sorted(self._free + slots)
        elif not self._held[buffer]:
            self._close(buffer)  # retired, and its last lease is back

    def retire(self, buffer: DeviceSegment | RowSegment | NcclBuffer | None) -> None:
        """No more leases from `buffer`; it is closed once the leases it has are given back."""
        if buffer is not None and buffer is self.buffer:
            self.buffer, self._free = None, []
            if not self._held[buffer]:
                self._close(buffer)

    def close(self) -> None:
        """The link ended: retire the buffer; leases in flight keep theirs until they end."""
        self._closed = True
        self.retire(self.buffer)

    def _close(self, buffer: DeviceSegment | RowSegment | NcclBuffer) -> None:
        del self._held[buffer]
        self._counters["handoff_staging_live_buffers"] -= 1
        buffer.close()


def row_checksums(rows: torch.Tensor) -> list[int]:
    """crc32 of each row of uint8 [n, nbytes] (host memory)."""
    data = rows.numpy()
    return [zlib.crc32(data[i]) for i in range(rows.shape[0])]


def blocks_to_wire(hid: int, indices: Sequence[int], hashes: Sequence[BlockHash], rows: torch.Tensor,
                   carrier: str) -> list[dict]:
    """kv_blocks messages for rows uint8 [n, nbytes] of table entries `indices`. carrier
    "device": the rows are already in the decode node's device segment (one message, no
    checksums); "nccl": they are being sent over the link's communicator (one message, no
    checksums); "segment": already in its shared-memory segment (one message, with their
    checksums); "frames": the rows travel in messages of at most ROWS_FRAME_BYTES of rows each
    (at least one row)."""
    n, nbytes = rows.shape
    if carrier in ("device", "nccl"):
        return [{"type": "kv_blocks", "hid": hid, "indices": list(indices), "hashes": list(hashes), "crcs": [],
                 f"in_{carrier}": True}]
    crcs = row_checksums(rows)
    if carrier == "segment":
        return [{"type": "kv_blocks", "hid": hid, "indices": list(indices), "hashes": list(hashes), "crcs": crcs,
                 "in_segment": True}]
    per = max(1, ROWS_FRAME_BYTES // max(nbytes, 1))
    return [{"type": "kv_blocks", "hid": hid, "indices": list(indices[a:a + per]), "hashes": list(hashes[a:a + per]),
             "crcs": crcs[a:a + per], "rows": rows[a:a + per].numpy().tobytes()} for a in range(0, n, per)]


def blocks_from_wire(msg: dict, want: dict[int, BlockHash], fmt: BlockFormat, lease: Lease | None = None
                     ) -> tuple[list[int], torch.Tensor, list[int]]:
    """Check a kv_blocks message against the blocks asked for -> (indices, rows uint8 [m,
    nbytes], slots: block indices[k] is rows[slots[k]]): the message's rows, or the rows of the
    lease's staging buffer (host or device memory). CorruptBlockError for a checksum, hash or
    size that does not match, a block not asked for (or sent twice), or rows said to be in a
    buffer of another kind than the lease's."""
    try:
        indices, hashes, crcs = [int(i) for i in msg["indices"]], list(msg["hashes"]), list(msg["crcs"])
        in_nccl = bool(msg.get("in_nccl"))
        in_device, in_segment = bool(msg.get("in_device")) or in_nccl, bool(msg.get("in_segment"))
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
        kind = "nccl" if in_nccl else "device" if in_device else "segment"
        if lease is None or lease.staging.kind != kind:
            raise errors.CorruptBlockError(f"kv_blocks: rows said to be in a {kind} staging buffer, but none "
                                           "was offered")
        rows, slots = lease.buffer.rows, [lease.slot_of[i] for i in indices]
        if in_device:
            return indices, rows, slots  # went from device to device: nothing to check
        data = rows.numpy()
        got = [zlib.crc32(data[k]) for k in slots]
    elif isinstance(data, bytes) and len(data) == n * fmt.nbytes:
        rows = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(n, fmt.nbytes) if n else \
            torch.empty((0, fmt.nbytes), dtype=torch.uint8)
        slots, got = list(range(n)), row_checksums(rows)
    else:
        raise errors.CorruptBlockError(f"kv_blocks: {len(data) if isinstance(data, bytes) else '?'} bytes of rows "
                                       f"for {n} blocks of {fmt.nbytes} bytes")
    for i, crc, c in zip(indices, crcs, got):
        if crc != c:
            raise errors.CorruptBlockError(f"kv_blocks: block {i} failed its checksum ({c:#x}, sent {crc:#x})")
    return indices, rows, slots


TERMINAL = ("prefill_done", "prefill_failed", "prefill_cancelled")  # a transfer's last message


class PrefillLinks:
    """A decode node's links to the prefill nodes: routing, the transfers in flight and the
    row slots each link keeps (Staging).

    Owns (loop thread only): `_clients` (one control connection per prefill node, None until
    first used or after it was lost), `_queued` (prompt tokens this node has in flight on each
    prefill node: the routing load), `_queues` (hand-off id -> (node, the queue its messages
    go to), from a transfer's start to its end), `_carrier` (per node, the carrier it took on
    this connection: None until its first ack), `_nccl` (per node, the link's communicator
    when the carrier is nccl: NcclLink, None until offered or after it failed), `_stagings` (per node, (kind, row bytes) -> its
    Staging), `_draining` (hand-off id -> (node, leases) of transfers that ended here before
    the prefill node's terminal message: their slots wait for it), `_processes` (per node, the
    prefill process of its connection, learned from its first device ack: PrefillProcess, None
    until then or when it cannot be told; `_untold`: nodes whose process could not be told on
    this connection), `_watchers` (the tasks watching connections, settling unanswered device
    offers and reaping the buffers of exited prefill processes; none started once closing)."""

    def __init__(self, d: DeploymentConfig, name: str, counters: Counter[str] | None = None):
        """counters: where staging allocations are counted ("handoff_staging_buffers": the
        KV manager's, so that metrics show them)."""
        self._d = d
        self._name = name
        self._counters: Counter[str] = Counter() if counters is None else counters
        self._clients: list[ControlClient | None] = [None] * d.prefill_nodes
        self._connecting = [asyncio.Lock() for _ in range(d.prefill_nodes)]
        self._probing = [asyncio.Lock() for _ in range(d.prefill_nodes)]
        self._queued = [0] * d.prefill_nodes
        self._queues: dict[int, tuple[int, asyncio.Queue]] = {}
        self._carrier: list[str | None] = [None] * d.prefill_nodes
        self._stagings: list[dict[tuple[str, int], Staging]] = [{} for _ in range(d.prefill_nodes)]
        self._draining: dict[int, tuple[int, list[Lease]]] = {}
        self._nccl: list[NcclLink | None] = [None] * d.prefill_nodes
        self._linking = [asyncio.Lock() for _ in range(d.prefill_nodes)]  # one communicator made at a time
        self._nccl_leases: dict[int, Lease] = {}  # hand-off id -> its nccl lease, while in _queues
        self._processes: list[PrefillProcess | None] = [None] * d.prefill_nodes
        self._untold: set[int] = set()
        self._hids = itertools.count()
        self._watchers: set[asyncio.Task] = set()
        self._store = None
        self._first = [True] * d.prefill_nodes
        self._closing = False
        self.num_retries = 0  # transfers continued on another prefill node

    async def aclose(self) -> None:
        """Close the links. Offers still unsettled then stay unsettled: their buffers stay
        allocated until this process ends (a prefill node may still hold them open)."""
        self._closing = True
        for c in self._clients:
            if c is not None:
                await c.aclose()
        for j in range(self._d.prefill_nodes):
            self._drop_link(j)
        for w in list(self._watchers):
            w.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    def stagings(self, j: int) -> list[Staging]:
        """Prefill node j's stagings (tests and benchmarks read their allocations)."""
        return list(self._stagings[j].values())

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
            self._drop_link(j)  # what a lost connection's prefill node held open is not reused
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

    def _drop_link(self, j: int) -> None:
        """Forget prefill node j's carrier and stagings (its connection ended): their buffers
        are closed when their last lease ends (and a device buffer freed when the prefill node's
        handle lets it go, its offer is settled, or its process exited holding it: `_reap`)."""
        self._carrier[j] = None
        self._untold.discard(j)
        process, self._processes[j] = self._processes[j], None
        if process is not None:
            if self._closing:
                process.close()  # (this process ends: what it allocated goes with it)
            else:
                self._spawn(self._reap(j, process), f"afkv-reap prefill{j}")
        self._drop_nccl(j)
        for staging in self._stagings[j].values():
            staging.close()
        self._stagings[j] = {}
        for hid, (node, leases) in list(self._draining.items()):
            if node == j:
                del self._draining[hid]  # no prefill_cancelled will come: the writer is unknown
                for lease in leases:
                    lease.abandon()

    def _settle(self, client: ControlClient, seg: DeviceSegment) -> None:
        """DeviceSegment.close of a buffer whose offer (on `client`'s connection) was never
        answered: find out who releases its count (a task)."""
        if self._closing:
            return
        if seg.opened is None:
            self._spawn(self._settle_offer(client, seg), f"afkv-settle {seg.offer['id']}")
            return
        if seg.holder is not None:
            seg.holder.closed_here(seg)

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _opened_by(self, j: int, client: ControlClient, wire: object, seg: DeviceSegment) -> None:
        """Prefill node j acked `seg` opened, on `client`'s connection, its process named by
        `wire` (process_identity): that process holds it now."""
        if self._clients[j] is not client or client.state is not ConnState.OPEN:
            return  # ended meanwhile (its end was handled): who holds it stays unknown, as below
        process = self._processes[j]
        if process is None and j not in self._untold:
            process = self._processes[j] = PrefillProcess.learn(wire)
            if process is None:
                self._untold.add(j)
                log.warning("cannot tell prefill node %d's process apart (%r: no pidfd or /proc here, or another "
                            "pid namespace): a device staging buffer it holds when it dies stays allocated until "
                            "this process ends", j, wire)
        if process is not None:
            process.acked(seg)

    def _let_go(self, conn, wire: object) -> None:
        """The prefill node at `conn` closes, having let go of the device buffers `wire` (their
        ids): they are not its to release any more."""
        j = next((j for j, c in enumerate(self._clients) if c is not None and c.peer is conn.peer), None)
        process = None if j is None else self._processes[j]
        if process is not None and isinstance(wire, list):
            process.held = {seg for seg in process.held if seg.offer["id"] not in wire}

    async def _reap(self, j: int, process: PrefillProcess) -> None:
        """Prefill node j's connection ended. A process that exits within EXIT_GRACE_S (a killed
        one closes its sockets a moment before it counts as exited) never let go of the device
        buffers it held: their counts are released here, on its behalf, each once (nothing
        writes into them any more). A process alive then lets go of them itself as it sees its
        connection end (PrefillServer._let_go): nothing is released here, then or later, for
        whether it let go before a later death cannot be told, and a second release would leave
        the count below zero (the buffer allocated for good, as if never released)."""
        try:
            if process.held and await process.wait_exited(EXIT_GRACE_S):
                for seg in sorted(process.held, key=lambda seg: seg.offer["id"]):
                    log.warning("prefill node %d (pid %d) exited holding device staging buffer %d: its CUDA IPC count "
                                "released here on its behalf", j, process.pid, seg.offer["id"])
                    seg.holder = None
                    seg.decline()
                    self._counters["handoff_released_for_exited_prefill"] += 1
                process.held.clear()
        finally:
            process.close()

    async def _settle_offer(self, client: ControlClient, seg: DeviceSegment) -> None:
        """Ask the prefill node whether it ever opened `seg` (a `release` request: handled after
        every request that named it, since no lease holds it and it is never offered again;
        it lets go of it if it holds it); it answers for the offer's count. A connection that
        ended first cannot answer: after prefill_timeout_s (a live prefill node lets go of what
        it opened when its side closes, and writes no more) the count is released here, on the
        prefill node's behalf (a process that died holding the handle never releases it). The
        one case this gets wrong, a live prefill node that had opened it and whose connection
        broke before its ack, leaves the buffer allocated (the count never reaches 0), never
        freed under a writer."""
        self._counters["handoff_unsettled_offers"] += 1
        try:
            if client.state is ConnState.OPEN:
                try:
                    msg = {"type": "release", "hid": next(self._hids), "buffer": seg.offer["id"]}
                    reply = await client.request(msg, timeout_s=self._d.prefill_timeout_s)
                    seg.answered(reply.get("opened") is True)
                    return
                except errors.AfkvError as exc:
                    log.warning("cannot settle the offer of device staging buffer %d (%s): released here after "
                                "%.0f s", seg.offer["id"], exc, self._d.prefill_timeout_s)
            await asyncio.sleep(self._d.prefill_timeout_s)
            seg.answered(False)
        finally:
            self._counters["handoff_unsettled_offers"] -= 1

    def _drop_nccl(self, j: int, link: NcclLink | None = None) -> None:
        """Abort prefill node j's communicator (`link`, when it is still the link's; default
        the link's): lost, failed, or out of step; receives posted on it end with PeerLostError.
        The next transfer negotiates the carrier again (a new communicator, or another carrier
        when the prefill node cannot join one)."""
        link = link or self._nccl[j]
        if link is None:
            return
        link.abort()
        if self._nccl[j] is link:
            self._nccl[j] = None
            if self._carrier[j] == "nccl":
                self._carrier[j] = None

    def _post_recv(self, j: int, lease: Lease | None, msg: dict) -> Future | None:
        """A kv_blocks message whose rows come over NCCL: post their receive into the lease's
        slots now, in message order (the order the prefill node sends in), on the communicator
        the transfer was acked on -> its Future, which the lease waits for before its slots go
        back. None when no receive can match the send (no nccl lease, a block not asked for):
        that communicator is out of step and dropped; the transfer fails on the message's checks."""
        link = None if lease is None else lease.link
        try:
            slots = [lease.slot_of[int(i)] for i in msg["indices"]]
        except (AttributeError, KeyError, TypeError, ValueError):
            slots = None
        if link is None or slots is None:
            self._drop_nccl(j, link)
            return None
        rows = lease.buffer.rows  # [num_rows, nbytes]
        recv = link.move(False, [rows[s:s + n] for _, s, n in runs(slots)])
        lease.imported(recv)
        return recv

    async def _watch(self, j: int, client: ControlClient) -> None:
        """When the connection to prefill node j ends, end every transfer it was serving."""
        await client.wait_closed()
        for node, q in list(self._queues.values()):
            if node == j:
                q.put_nowait(errors.PeerLostError(f"prefill node {j} lost: {client.closed_reason}"))
        if self._clients[j] is client:
            self._drop_link(j)

    async def _on_message(self, conn, msg: dict) -> None:
        if msg.get("type") == "let_go":  # a request: the prefill node closes once this is answered
            self._let_go(conn, msg.get("buffers"))
            return None
        hid = msg.get("hid")
        if not isinstance(hid, int) or isinstance(hid, bool):
            return None
        entry = self._queues.get(hid)
        kind = msg.get("type")
        if kind == "nccl_joining":  # the prefill node joins the communicator offered: join too
            link = None if entry is None else self._nccl[entry[0]]
            if link is not None and link.uid == msg.get("comm"):
                link.start()
            return None
        if kind == "prefill_failed" and hid in self._nccl_leases and \
                isinstance(errors.error_from_wire(msg.get("error")), errors.PeerLostError):
            lease = self._nccl_leases[hid]  # its sends failed there: that communicator is gone
            self._drop_nccl(entry[0], lease.link)  # (its receives posted here end now, not at their timeout)
        if kind == "kv_blocks" and msg.get("in_nccl"):
            if entry is not None:
                msg["recv"] = self._post_recv(entry[0], self._nccl_leases.get(hid), msg)
            elif hid in self._draining:  # cancelled here: the prefill node's send still needs its receive
                j, leases = self._draining[hid]
                self._post_recv(j, next((lease for lease in leases if lease.staging.kind == "nccl"), None), msg)
            return None if entry is None else entry[1].put_nowait(msg)
        if entry is not None:
            entry[1].put_nowait(msg)
        elif hid in self._draining and msg.get("type") in TERMINAL:
            for lease in self._draining.pop(hid)[1]:
                lease.writer_done()
        return None

    async def fetch(self, token_ids: Sequence[int], want: dict[int, BlockHash], fmt: BlockFormat,
                    device: torch.device, receive: Callable[[list[int], torch.Tensor, list[int]], Future | None],
                    acked: Callable[[], None] | None = None) -> None:
        """Hand the blocks `want` ({table index: hash}) of the prompt `token_ids` (whole blocks)
        over from the prefill nodes: each batch, checked, goes to `receive(indices, rows uint8
        [m, fmt.nbytes], slots)` (block indices[k] is rows[slots[k]]: a frame's rows in host
        memory, or the staging buffer's, host or on `device`, this node's KV device, through CUDA
        IPC), which returns the Future of its copy out of them (the slots are reused once it is
        done) or None (copied already). `acked()` is called when a prefill node acknowledges the
        transfer (its carrier open: what follows is the copy). A node that fails hands the blocks
        still awaited to the next; PrefillUnavailableError when every node failed (the causes in
        its message)."""
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
                await self._fetch_from(j, token_ids, want, fmt, device, receive, acked)
            except (errors.PeerLostError, errors.CorruptBlockError, errors.FrameError) as exc:
                causes.append(f"prefill node {j}: {exc}")
                if want:
                    self.num_retries += 1
                    log.warning("KV hand-off from prefill node %d failed (%s); %d block(s) still awaited", j,
                                str(exc), len(want))  # (a record keeps no traceback: its frames hold leases)

    async def _leases(self, j: int, client: ControlClient, kinds: Sequence[str], n: int, fmt: BlockFormat,
                      device: torch.device, leases: dict[str, Lease]) -> None:
        """n slots of each carrier in `kinds` that this node can offer prefill node j (on
        `client`'s connection) -> `leases` (filled as they are made: the caller gives back
        whatever is there, even when this is cancelled)."""
        settle = functools.partial(self._settle, client)
        makers = {"device": lambda rows: DeviceSegment(rows, fmt.nbytes, device, settle),
                  "nccl": lambda rows: NcclBuffer(rows, fmt.nbytes, device),
                  "segment": lambda rows: RowSegment(rows, fmt.nbytes)}
        for kind in kinds:
            if kind == "device" and not DeviceSegment.available(device) or \
                    kind == "segment" and not RowSegment.available() or kind == "nccl" and NCCL.gpu(device) is None:
                continue
            staging = self._stagings[j].get((kind, fmt.nbytes))
            if staging is None:
                staging = self._stagings[j][kind, fmt.nbytes] = Staging(kind, makers[kind], self._counters)
            try:
                leases[kind] = await staging.lease(n)
            except (RuntimeError, OSError) as exc:  # no room for the slots, no CUDA IPC, shared memory full
                log.warning("no %s staging for a KV hand-off (%s): rows take the next carrier", kind, exc)

    async def _fetch_from(self, j: int, token_ids: Sequence[int], want: dict[int, BlockHash], fmt: BlockFormat,
                          device: torch.device, receive: Callable[[list[int], torch.Tensor, list[int]], Future | None],
                          acked: Callable[[], None] | None) -> None:
        client = await self._client(j)
        probe, probing = self._probing[j], False
        if self._carrier[j] is None:
            await probe.acquire()  # one transfer finds the carrier; the others wait for its ack
            probing = self._carrier[j] is None
            if not probing:
                probe.release()
        negotiating = self._carrier[j] is None
        kinds = ("device", "nccl", "segment") if negotiating else (self._carrier[j],)
        hid = next(self._hids)
        leases: dict[str, Lease] = {}
        q: asyncio.Queue = asyncio.Queue()
        self._queues[hid] = (j, q)
        self._queued[j] += len(token_ids)
        ended = False
        timeout_s = self._d.prefill_timeout_s
        try:
            await self._leases(j, client, kinds, len(want), fmt, device, leases)
            for lease in leases.values():
                lease.slot_of = dict(zip(sorted(want), lease.slots))
            offers = {kind: {**lease.buffer.offer, "slots": lease.slots} for kind, lease in leases.items()}
            link = None
            if "nccl" in leases:
                async with self._linking[j]:
                    link = self._nccl[j]
                    if link is None:  # the link's communicator: its id travels in this offer, joined once
                        uid = await asyncio.to_thread(NCCL.new_id)
                        link = self._nccl[j] = NcclLink(NCCL, uid, 0, device, timeout_s)
                leases["nccl"].link = link
                self._nccl_leases[hid] = leases["nccl"]
                offers["nccl"] |= {"id": link.uid, "gpu": NCCL.gpu(device)}
            try:
                ack = await client.request({"type": "prefill", "hid": hid, "token_ids": list(token_ids),
                                            "want": [[i, want[i]] for i in sorted(want)], "format": fmt.name,
                                            "digest": fmt.digest, "segment": offers.get("segment"),
                                            "device_segment": offers.get("device"), "nccl": offers.get("nccl")},
                                           timeout_s=timeout_s)
            except errors.AfkvError:
                if link is not None:  # whether the prefill node holds that communicator is unknown now
                    self._drop_nccl(j, link)
                raise
            carrier = ack.get("carrier")
            if link is not None and carrier != "nccl":
                self._nccl_leases.pop(hid, None)
                self._drop_nccl(j, link)  # not joined there (another carrier, or its creation failed)
            if carrier == "device" and "device" in leases:
                self._opened_by(j, client, ack.get("process"), leases["device"].buffer)
            for kind, lease in list(leases.items()):
                lease.buffer.answered(kind == carrier)
                if kind != carrier:
                    lease.staging.retire(lease.buffer)  # the prefill node did not open it: not offered again
                    lease.writer_done()  # never written
                    del leases[kind]
            if negotiating and self._carrier[j] is None and carrier in ("device", "nccl", "segment", "frames"):
                self._carrier[j] = carrier  # the link's stagings of other kinds are not offered again
                for key in [key for key in self._stagings[j] if key[0] != carrier]:
                    self._stagings[j].pop(key).close()
            if probing:
                probing = False
                probe.release()
            if acked is not None:
                acked()
            lease = next(iter(leases.values()), None)
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
                    indices, rows, slots = blocks_from_wire(msg, want, fmt, lease)
                    if msg.get("in_nccl"):
                        await self._received(j, lease.link, msg.get("recv"), len(indices))
                    future = receive(indices, rows, slots)
                    if lease is not None:
                        lease.imported(future)
                    for i in indices:
                        del want[i]
                elif kind in TERMINAL:
                    ended = True
                    if kind == "prefill_failed":
                        raise errors.error_from_wire(msg.get("error"))
                    if kind == "prefill_cancelled":
                        raise errors.PeerLostError(f"prefill node {j} cancelled the transfer (closing)")
                    if want:
                        raise errors.CorruptBlockError(f"prefill node {j} ended without blocks {sorted(want)}")
                    return
                else:
                    raise errors.FrameError(f"prefill node {j}: unexpected message {kind!r:.50}")
        finally:
            if probing:
                probe.release()  # the probe failed: the next transfer tries
            for lease in leases.values():
                if lease.buffer.kind == "device" and lease.buffer.opened is None:
                    lease.staging.retire(lease.buffer)  # offered, never answered: not offered again
            self._queues.pop(hid, None)
            self._nccl_leases.pop(hid, None)
            self._queued[j] -= len(token_ids)
            await self._end(j, client, hid, list(leases.values()), ended)

    async def _received(self, j: int, link: NcclLink, recv: Future | None, num_blocks: int) -> None:
        """Wait for a kv_blocks message's NCCL receive (its rows then are in the slots): a
        failure (the communicator aborted, the prefill node silent past the timeout, no receive
        posted) drops the link's communicator and is this transfer's PeerLostError."""
        try:
            if recv is None:
                raise errors.PeerLostError("no NCCL receive could be posted for its rows")
            await moved(recv)
        except errors.TransportError as exc:
            self._drop_nccl(j, link)
            raise errors.PeerLostError(f"prefill node {j}: NCCL hand-off failed: {exc}") from exc
        self._counters["handoff_received_nccl_blocks"] += num_blocks

    async def _end(self, j: int, client: ControlClient, hid: int, leases: list[Lease], ended: bool) -> None:
        """A transfer's end on this side: its slots go back when the prefill node has ended it
        (now, or at its answer to the cancel sent here; a prefill node that cannot be told
        keeps them: its buffer is retired) and this node's copies out of them are done."""
        if ended:
            for lease in leases:
                lease.writer_done()
            return
        if client.state is ConnState.OPEN:
            try:
                self._draining[hid] = (j, leases)
                await client.send({"type": "cancel", "hid": hid})  # answered by prefill_cancelled
                return
            except errors.TransportError:
                self._draining.pop(hid, None)  # gone meanwhile: the prefill node aborts what it cannot send
        for lease in leases:
            lease.abandon()
