"""PrefillServer: a prefill node's Engine serving KV hand-offs to decode nodes.

The protocol, checks and faults are afkv.nodes.handoff's (its module docstring). Per message:

    prefill   start a stream task: Engine.export_prefill over the prompt, its worker writing
              the rows straight into the slots named of the decode node's staging buffer: its
              device buffer (CUDA IPC, when this process is on the same GPU) or shared-memory
              segment (when this host has it), opened once per buffer and kept open for the
              connection; or, on another GPU, into a device buffer of this node's, sent over the
              link's NCCL communicator (joined once per connection: nccl_joining, then the
              join, before the ack; a failed join acks the next carrier) into the decode node's
              slots, each kv_blocks message after its send is enqueued (a lock keeps sends and
              messages in one order); else the rows it yields go in the kv_blocks messages; then
              prefill_done (or prefill_failed with the error, which keeps its class). A request
              refused (an error reply) leaves no buffer of its offers newly opened here.
    cancel    cancel that stream: the engine aborts the prefill and frees its blocks; once no
              write into the slots is in flight any more, prefill_cancelled (at once for a
              stream already ended or never started): the decode node then reuses the slots
    release   {"buffer": id}: the decode node settles a device buffer whose offer it saw no answer to
              (afkv.nodes.handoff.DeviceSegment): let go of it if held -> {"opened": whether
              this connection ever opened it (its count is then released here, else there)}

A device ack names this process (`process`: pid and start time), so that a decode node whose
connection ends with this process gone releases the counts of the buffers it held (a killed
process never lets go). Closing (aclose), the server ends its streams, lets go of the device
buffers opened and tells each decode node which (a let_go request, answered before the
connection closes): its exit then releases nothing twice.

The NCCL send buffer is the link's (a Staging of this node's device rows, as the decode node's
slots are): a transfer leases slots of it for its rows, and gives them back once its export is
done (export_prefill returns only when no write is in flight) and every send out of them has
completed (the link's thread waits for the send's CUDA event before its Future completes, so a
later export never overwrites rows a send still reads); it is freed with the link (its
connection closed, its communicator aborted, or replaced).

A decode node that goes away takes its streams with it (their sends fail; the engine aborts),
and what its connection held here (the buffers opened, the NCCL link and its send buffer) is
let go when the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import torch

from afkv import errors
from afkv.engine.engine import Engine
from afkv.kv.formats import FORMAT_NAMES, BlockFormat, make_format
from afkv.nodes import handoff
from afkv.nodes.handoff import (
    MAX_FRAME_BYTES,
    Lease,
    NcclBuffer,
    NcclLink,
    Staging,
    blocks_to_wire,
    moved,
    open_device_segment,
    open_segment,
    runs,
)
from afkv.serve.streams import StreamServer
from afkv.transport.control import ConnState, ControlConnection, ControlLimits

log = logging.getLogger("afkv.serve")
HEARTBEAT_INTERVAL_S = 1.0
LET_GO_TIMEOUT_S = 5.0  # closing: how long a decode node may take to hear which buffers were let go


class NcclSend:
    """A connection's NCCL link to its decode node (the carrier nccl): the communicator, the
    lock that keeps its sends in the order of their kv_blocks messages, and its send buffers
    (per row size, a Staging of this node's device rows; a lease is one run of slots, so a
    batch's rows are a view of the buffer: export_rows gathers scattered slots after the event
    the send waits for). `close` aborts the communicator and frees the buffers (each once the
    transfers leasing it have ended)."""

    def __init__(self, link: NcclLink, counters):
        self.link, self.in_order = link, asyncio.Lock()
        self._counters = counters
        self.stagings: dict[int, Staging] = {}

    async def lease(self, n: int, nbytes: int, device: torch.device) -> Lease:
        staging = self.stagings.get(nbytes)
        if staging is None:
            staging = self.stagings[nbytes] = Staging("nccl", lambda rows: NcclBuffer(rows, nbytes, device),
                                                      self._counters, runs_only=True)
        return await staging.lease(n)

    def close(self) -> None:
        self.link.abort()
        for staging in self.stagings.values():
            staging.close()


class PrefillServer(StreamServer):
    """Serves KV hand-offs: each prefill message is a stream (StreamServer) of the prompt's rows;
    cancel cancels it."""

    KEY, FAILED, PEER, WHAT, WHERE = "hid", "prefill_failed", "decode node", "hand-off", "the prefill node"

    def __init__(self, engine: Engine, host: str, port: int = 0, token: str | None = None,
                 client_timeout_s: float = 60.0):
        self.engine = engine
        prompt_bytes = 16 * engine.max_model_len + 64 * 2**10  # token ids and wanted hashes, msgpack
        limits = ControlLimits(max_frame_bytes=MAX_FRAME_BYTES, max_inbound_bytes=4 * prompt_bytes,
                               idle_timeout_s=client_timeout_s, frame_timeout_s=client_timeout_s,
                               heartbeat_interval_s=HEARTBEAT_INTERVAL_S, message_bytes={"prefill": prompt_bytes},
                               default_message_bytes=64 * 2**10)
        super().__init__(host, port, token, limits)
        self.carriers = {"device": 0, "nccl": 0, "segment": 0, "frames": 0}  # hand-offs started per carrier
        self.num_opened = 0  # staging buffers opened (a decode node's link opens one, until it grows it)
        self.process = handoff.process_identity()  # named in device acks: who holds the buffers opened here
        # per connection, carrier -> (the decode node's id of its staging buffer, its rows open
        # here): kept open while the connection lasts, so a transfer opens nothing
        self._opened: dict[ControlConnection, dict[str, tuple[object, torch.Tensor]]] = {}
        # per connection, the ids of the device buffers ever opened (what `release` answers)
        self._opened_ids: dict[ControlConnection, set[int]] = {}
        # per connection, the NCCL link to its decode node (the carrier nccl)
        self._links: dict[ControlConnection, NcclSend] = {}
        self._watchers: dict[ControlConnection, asyncio.Task] = {}  # each lets go of what its connection held
        self._answers: set[asyncio.Task] = set()  # prefill_cancelled of streams that never started, being sent
        self._client_timeout_s = client_timeout_s

    async def aclose(self) -> None:
        await self._end_streams()  # (their writes done) then let go of the device buffers opened, and say so:
        opened = {conn: sorted(ids) for conn, ids in self._opened_ids.items() if ids}
        self._opened.clear()  # a decode node then releases nothing for them when this process exits
        await asyncio.gather(*(self._said_let_go(conn, ids) for conn, ids in opened.items()))
        await super().aclose()
        for task in self._watchers.values():
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)
        self._watchers.clear()
        self._opened.clear()
        self._opened_ids.clear()
        for nccl in self._links.values():
            nccl.close()
        self._links.clear()

    async def _said_let_go(self, conn: ControlConnection, buffer_ids: list[int]) -> None:
        with contextlib.suppress(errors.AfkvError):  # (gone, or not answering: it decides by this process's exit)
            await conn.request({"type": "let_go", "buffers": buffer_ids}, timeout_s=LET_GO_TIMEOUT_S)

    def _watch(self, conn: ControlConnection) -> None:
        if conn not in self._watchers:
            self._watchers[conn] = asyncio.create_task(self._let_go(conn), name="afkv-prefill-conn")

    async def _let_go(self, conn: ControlConnection) -> None:
        """When `conn` closes: let go of the buffers it opened and of its NCCL link (transfers
        still running keep theirs until they end)."""
        await conn.wait_closed()
        self._opened.pop(conn, None)
        self._opened_ids.pop(conn, None)
        nccl = self._links.pop(conn, None)
        if nccl is not None:
            nccl.close()
        self._watchers.pop(conn, None)

    async def _handle(self, conn: ControlConnection, msg: dict) -> dict | None:
        kind = msg["type"]
        hid = self._stream_id(msg)
        if kind == "prefill":
            want = _want_from_wire(msg.get("want"))
            token_ids = msg.get("token_ids")
            if not isinstance(token_ids, list):
                raise errors.FrameError("a prefill message needs a list 'token_ids'")
            name = msg.get("format")
            if name not in FORMAT_NAMES:
                raise errors.FrameError(f"a prefill message needs 'format' among {', '.join(FORMAT_NAMES)}, "
                                        f"got {name!r:.20}")
            fmt = make_format(name, self.engine.kv_manager.layout)
            if msg.get("digest") != fmt.digest:
                raise errors.ConfigError("the decode node asks for KV rows of another geometry than this prefill "
                                         "node's (model, dtype or block_size differ)", key="kv")
            into, slots, carrier = await self._open_carrier(conn, msg, hid, len(want), fmt)
            nccl, lease = None, None
            if carrier == "nccl":  # this transfer's link, whatever comes later, and its slots of the send buffer
                nccl = self._links[conn]
                try:
                    lease = await nccl.lease(len(want), fmt.nbytes, self.engine.kv_manager.kv.device)
                except (RuntimeError, OSError) as exc:  # the link closed meanwhile, or no room on the device
                    raise errors.PeerLostError(f"no NCCL send buffer on the prefill node: {exc}") from exc
                into = lease.buffer.rows  # [rows, nbytes]: this node's
            started = False

            async def body() -> None:
                nonlocal started
                started = True
                await self._hand_off(conn, hid, token_ids, want, fmt, into, slots, carrier, nccl, lease)

            try:
                task = self._start(conn, hid, body, f"afkv-prefill {hid}")
            except BaseException:
                if lease is not None:
                    lease.writer_done()  # never written
                raise
            task.add_done_callback(lambda _: started or self._never_started(conn, hid, lease))
            return {"type": "ack", "carrier": carrier} | ({"process": self.process} if carrier == "device" else {})
        if kind == "cancel":
            if self._streams.get(conn, {}).get(hid) is None:  # refused, or ended: its last message is sent
                await conn.send({"type": "prefill_cancelled", "hid": hid})
            self._cancel(conn, hid)  # the stream answers once its writes are done
            return None
        if kind == "release":
            seg_id = msg.get("buffer")
            held = self._opened.get(conn, {}).get("device")
            if held is not None and held[0] == seg_id:
                del self._opened[conn]["device"]  # transfers still writing keep their rows until they end
            return {"type": "released", "opened": seg_id in self._opened_ids.get(conn, set())}
        raise errors.FrameError(f"prefill node: unknown message type {kind!r}")

    async def _open_carrier(self, conn: ControlConnection, msg: dict, hid: int, num_rows: int, fmt: BlockFormat
                            ) -> tuple[torch.Tensor | None, list[int] | None, str]:
        """The first of the decode node's device buffer, its NCCL communicator, its shared-memory
        segment, the frames, that this process can open (afkv.nodes.handoff), kept open for the
        connection under the decode node's id -> (its rows or None, the slots of this transfer,
        its name). For nccl: a device buffer of this node's for the rows, and the decode node's
        slots (where the sends go)."""
        self._watch(conn)
        opened = self._opened.setdefault(conn, {})
        for carrier in ("device", "nccl", "segment"):
            offer = msg.get({"device": "device_segment"}.get(carrier, carrier))
            if offer is None:
                continue
            if not isinstance(offer, dict):
                raise errors.FrameError(f"a prefill message's {carrier} offer is not a map")
            rows = offer.get("rows")
            if not isinstance(rows, int) or isinstance(rows, bool):
                raise errors.FrameError(f"a prefill message's {carrier} offer needs an int 'rows', got {rows!r:.20}")
            slots = _slots_from_wire(offer.get("slots"), num_rows, rows)  # before anything is opened
            if carrier == "nccl":
                if not await self._join(conn, offer, hid):
                    continue
                return None, slots, "nccl"  # rows: in the link's send buffer
            key = offer.get("id" if carrier == "device" else "name")
            if carrier not in opened or opened[carrier][0] != key:
                opened.pop(carrier, None)  # an older buffer of this link: let go (transfers in flight keep theirs)
                if carrier == "device":
                    got = await asyncio.to_thread(open_device_segment, offer, fmt.nbytes,
                                                  self.engine.kv_manager.kv.device)
                    into = None if got is None else got[1]
                else:
                    into = open_segment(offer, fmt.nbytes)
                if into is None:
                    continue
                opened[carrier] = (key, into)
                if carrier == "device":
                    self._opened_ids.setdefault(conn, set()).add(key)
                self.num_opened += 1
            return opened[carrier][1], slots, carrier
        return None, None, "frames"

    async def _join(self, conn: ControlConnection, offer: dict, hid: int) -> bool:
        """The connection's NCCL link for the offer's communicator id: kept when joined already;
        else (on another GPU than the decode node's, with NCCL here) tell the decode node
        (nccl_joining: it joins too) and join within the timeout -> whether the link is up."""
        uid, device = offer.get("id"), self.engine.kv_manager.kv.device
        held = self._links.get(conn)
        if held is not None and held.link.uid == uid:
            return not held.link.aborted
        if held is not None:
            self._links.pop(conn).close()  # the decode node dropped that one
        gpu = await asyncio.to_thread(handoff.NCCL.gpu, device)
        if not isinstance(uid, str) or gpu is None or offer.get("gpu") in (None, gpu):
            return False  # no NCCL here, or the same GPU (NCCL refuses two ranks on one GPU)
        link = NcclLink(handoff.NCCL, uid, 1, device, self._client_timeout_s)
        await conn.send({"type": "nccl_joining", "hid": hid, "comm": uid})
        link.start()
        try:
            await asyncio.wait_for(asyncio.wrap_future(link.joined), self._client_timeout_s)
        except (TimeoutError, errors.AfkvError, RuntimeError, OSError) as exc:
            log.warning("cannot join the decode node's NCCL communicator (%s): rows take the next carrier", exc)
            link.abort()
            return False
        except asyncio.CancelledError:  # the connection or the server closes
            link.abort()
            raise
        self._links[conn] = NcclSend(link, self.engine.kv_manager.metrics.counters)
        return True

    def _never_started(self, conn: ControlConnection, hid: int, lease: Lease | None) -> None:
        """A stream cancelled before its first step (a cancel right behind its prefill message):
        nothing was written; answer the cancel as its stream would have."""
        if lease is not None:
            lease.writer_done()
        task = asyncio.create_task(self._send_quietly(conn, {"type": "prefill_cancelled", "hid": hid}),
                                   name=f"afkv-prefill-cancelled {hid}")
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    @staticmethod
    async def _send_quietly(conn: ControlConnection, msg: dict) -> None:
        with contextlib.suppress(errors.TransportError):
            await conn.send(msg)

    async def _hand_off(self, conn: ControlConnection, hid: int, token_ids: list, want: dict, fmt: BlockFormat,
                        into: torch.Tensor | None, slots: list[int] | None, carrier: str,
                        nccl: NcclSend | None = None, lease: Lease | None = None) -> None:
        """`into`: the decode node's staging rows that `carrier` names (block k asked for, in
        table order, goes to its row slots[k]), or None: rows go in the frames; for nccl, the
        link's send buffer (block k in its row lease.slots[k]) sent over `nccl` into the
        decode node's slots[k], the lease given back when the export and the sends are done.
        Ends with prefill_done, prefill_failed (StreamServer) or, cancelled, prefill_cancelled
        once no write into `into` is in flight any more (the decode node then reuses the slots)."""
        self.carriers[carrier] += 1
        slot_of = dict(zip(sorted(want), slots)) if nccl is not None else {}
        sends = []  # NCCL: the sends enqueued, one per batch (rows in this node's `into`)
        try:
            async with contextlib.aclosing(self.engine.export_prefill(token_ids, want, fmt, into,
                                                                      lease.slots if lease else slots)) as batches:
                async for batch in batches:
                    frames = blocks_to_wire(hid, batch.indices, batch.hashes, batch.rows, carrier)
                    if nccl is None:
                        for frame in frames:
                            await conn.send(frame)
                        continue
                    rows = batch.rows  # [n, nbytes]: the batch's slots of `into` (a view, or their gather)
                    async with nccl.in_order:  # the decode node posts receives in message order
                        sends.append(nccl.link.move(True, [rows[k:k + n] for k, _, n in
                                                           runs([slot_of[i] for i in batch.indices])]))
                        lease.imported(sends[-1])  # its slots go back once this send has read them
                        await conn.send(frames[0])
            for send in sends:
                await moved(send)
            await conn.send({"type": "prefill_done", "hid": hid})
        except asyncio.CancelledError:  # (even during prefill_done's send: one more end message does no harm)
            await _settled(sends)  # the decode node reuses its slots at prefill_cancelled
            with contextlib.suppress(errors.TransportError):
                await conn.send({"type": "prefill_cancelled", "hid": hid})
            raise
        except errors.PeerLostError as exc:
            if nccl is None or conn.state is ConnState.CLOSED:
                raise
            await _settled(sends)
            if self._links.get(conn) is nccl:
                self._links.pop(conn).close()  # the link aborted itself: the decode node offers a new one
            await self._fail(conn, hid, exc)  # the decode node is there: tell it
        finally:
            if lease is not None:
                lease.writer_done()  # the export wrote its last row (aclosing): back once the sends are done


async def _settled(futures: list) -> None:
    """Wait until every future is done, whatever its outcome."""
    pending = [asyncio.wrap_future(f) for f in futures if not f.done()]
    if pending:
        await asyncio.wait(pending)


def _slots_from_wire(wire: object, num_blocks: int, num_rows: int) -> list[int]:
    if not isinstance(wire, list) or len(wire) != num_blocks or len(set(wire)) != num_blocks or \
            not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < num_rows for k in wire):
        raise errors.FrameError(f"a prefill message's staging needs 'slots': {num_blocks} distinct rows of "
                                f"{num_rows}, got {wire!r:.80}")
    return wire


def _want_from_wire(wire: object) -> dict[int, bytes]:
    try:
        want = {int(i): bytes(h) for i, h in wire}
    except (TypeError, ValueError) as exc:
        raise errors.FrameError(f"a prefill message needs 'want' as [[index, hash], ...]: {exc}") from exc
    if not want or any(len(h) != 16 for h in want.values()):
        raise errors.FrameError("a prefill message needs at least one [index, 16-byte hash] in 'want'")
    return want
