"""Control plane: msgpack frames over asyncio streams.

Nodes (attention nodes, expert nodes, the launcher) exchange small control
messages here: registration, heartbeats, step metadata, placement updates,
shutdown. Hidden states never travel this way (that is the NCCL data plane).

Frame on the wire:

    +---------+-------------+-------------------+--------------------------+
    | magic   | schema      | payload length    | payload: msgpack map     |
    | b"AFKC" | u16, BE     | u32, BE (nbytes)  | with a str "type" key    |
    +---------+-------------+-------------------+--------------------------+

A reader checks magic and schema, refuses a length above its limit before
reading the payload, and decodes with raw=False, no ext types and msgpack's
length limits bounded by the payload size. Any frame error desynchronises
the stream, so the connection is closed after one.

Session:

    client -> server   {"type": "hello", "token", "role", "node_id"}
                       (at most HELLO_MAX_BYTES, within handshake_timeout_s)
    server -> client   {"type": "welcome"}
                       or {"type": "error", "code", "message"}, then close
    then either side, any number of times:
      request          {..., "type": t, "id": n}  -> one reply {..., "re": n}
      notification     {..., "type": t}              no reply
      heartbeat        {"type": "heartbeat"}         refreshes last_seen_s only
      error            {"type": "error", "code", "message"[, "re": n]}

"id" and "re" are reserved keys: request() sets "id", the answering side sets
"re". A handler returning None to a request answers {"type": "ack"}; a
handler raising answers {"type": "error", "code": "handler"}, which request()
raises as TransportError; what a handler returns for a notification is
dropped. Messages from one peer reach the handler one at a time, in arrival
order; replies and heartbeats are read meanwhile (until max_queued_messages
wait for the handler), so a slow handler neither blocks replies nor makes its
peer look dead.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import ipaddress
import itertools
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from afkv.errors import (
    AuthError,
    ConfigError,
    FrameError,
    FrameTooLargeError,
    PeerLostError,
    TransportError,
)

log = logging.getLogger(__name__)

MAGIC = b"AFKC"
SCHEMA_VERSION = 1
HEADER = struct.Struct(">4sHI")  # magic, schema version, payload nbytes
MAX_FRAME_BYTES = 16 * 1024 * 1024
HELLO_MAX_BYTES = 64 * 1024  # an unauthenticated peer may not make us buffer more
MAX_ERROR_MESSAGE_CHARS = 1000
SERVER_NODE_ID = "control-server"  # how a client names the server it talks to

Message = dict[str, Any]


# ---------------------------------------------------------------- frames


def encode_frame(msg: Message, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Header + msgpack payload of `msg`; FrameError if `msg` is not a map with a
    str "type" or holds a value msgpack cannot encode, FrameTooLargeError above
    `max_bytes`."""
    _check_type_key(msg)
    try:
        payload = msgpack.packb(msg, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"cannot encode {msg['type']!r} message: {exc}") from exc
    if len(payload) > max_bytes:
        raise FrameTooLargeError(f"{msg['type']!r} message is {len(payload)} bytes, above the limit of {max_bytes}")
    return HEADER.pack(MAGIC, SCHEMA_VERSION, len(payload)) + payload


def decode_payload(payload: bytes) -> Message:
    """The message in one frame's payload; FrameError unless it is a msgpack map
    with a str "type" key. Ext types (and so timestamps) are refused; every
    msgpack length limit defaults to len(payload)."""
    try:
        msg = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_ext_len=0, ext_hook=_refuse_ext)
    except (ValueError, TypeError) as exc:  # msgpack's FormatError, StackError, ExtraData are ValueErrors
        raise FrameError(f"undecodable msgpack payload ({len(payload)} bytes): {exc}") from exc
    _check_type_key(msg)
    return msg


async def read_frame(
    reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES, *, timeout_s: float | None = None
) -> Message | None:
    """Read one frame. None at a clean end of stream (EOF before any header byte).

    Raises FrameTooLargeError before reading a payload above `max_bytes`,
    FrameError for bad magic, schema version or payload, and PeerLostError on
    EOF inside a frame, a reset, or no whole frame within `timeout_s`. After a
    FrameError the stream is desynchronised: the caller must close it.
    """
    try:
        async with asyncio.timeout(timeout_s):
            try:
                header = await reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    return None
                raise
            magic, version, nbytes = HEADER.unpack(header)
            if magic != MAGIC:
                raise FrameError(f"bad magic {magic!r}, expected {MAGIC!r}")
            if version != SCHEMA_VERSION:
                raise FrameError(f"schema version {version}, expected {SCHEMA_VERSION}")
            if nbytes > max_bytes:
                raise FrameTooLargeError(f"frame of {nbytes} bytes announced, above the limit of {max_bytes}")
            payload = await reader.readexactly(nbytes)
    except asyncio.IncompleteReadError as exc:
        raise PeerLostError(f"end of stream inside a frame ({len(exc.partial)} of {exc.expected} bytes)") from exc
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        raise PeerLostError(f"no whole frame within {timeout_s} s") from exc
    except OSError as exc:
        raise PeerLostError(f"connection broken while reading: {exc!r}") from exc
    return decode_payload(payload)


async def write_frame(
    writer: asyncio.StreamWriter,
    msg: Message,
    max_bytes: int = MAX_FRAME_BYTES,
    *,
    timeout_s: float | None = None,
) -> None:
    """Encode `msg` (see encode_frame) and write it as one write, then drain.
    PeerLostError if the connection is broken or drain takes over `timeout_s`."""
    await _write_bytes(writer, encode_frame(msg, max_bytes), timeout_s)


async def _write_bytes(writer: asyncio.StreamWriter, frame: bytes, timeout_s: float | None) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(frame)  # one write per frame: concurrent senders never interleave
            await writer.drain()
    except TimeoutError as exc:
        raise PeerLostError(f"peer did not take a {len(frame)}-byte frame within {timeout_s} s") from exc
    except (OSError, RuntimeError) as exc:  # RuntimeError: uvloop's write on a closed transport
        raise PeerLostError(f"connection broken while writing: {exc!r}") from exc


def _check_type_key(msg: object) -> None:
    if not isinstance(msg, dict):
        raise FrameError(f"a control message must be a map, got {type(msg).__name__}")
    if not isinstance(msg.get("type"), str):
        raise FrameError(f"a control message needs a str 'type' key, got keys {sorted(map(repr, msg))[:8]}")


def _refuse_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack ext type {code} is not allowed")


# ---------------------------------------------------------------- peers and connections


@dataclass(frozen=True)
class ControlLimits:
    """Per-connection limits, validated once here."""

    max_frame_bytes: int = MAX_FRAME_BYTES
    handshake_timeout_s: float = 10.0
    send_timeout_s: float = 10.0  # a peer that takes no frame for this long is lost
    max_queued_messages: int = 256  # read-ahead for the handler; reading pauses beyond

    def __post_init__(self) -> None:
        for key in ("max_frame_bytes", "handshake_timeout_s", "send_timeout_s", "max_queued_messages"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"must be > 0, got {getattr(self, key)!r}", key=key)
        if self.max_frame_bytes > 2**32 - 1:
            raise ConfigError("the frame header holds at most a u32 length", key="max_frame_bytes")


@dataclass(frozen=True)
class PeerInfo:
    node_id: str
    role: str
    address: tuple[str, int]  # remote host, port

    def __str__(self) -> str:
        return f"{self.role} {self.node_id!r} at {self.address[0]}:{self.address[1]}"


class ConnState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


Handler = Callable[["ControlConnection", Message], Awaitable[Message | None]]


class ControlConnection:
    """One authenticated, open-after-handshake connection to one peer.

    Owns its stream pair, its pending-request table and its inbox; both sides
    of a session use this class (the server one per peer, a client one to the
    server). Two tasks run while it is open: the reader (resolves replies,
    refreshes last_seen_s, queues other messages) and the dispatcher (calls
    the handler for each queued message, in order, and writes the reply).

    Ending: when the peer closes, the connection is CLOSED at once (pending
    requests fail) but messages it sent before leaving are still handled, their
    replies dropped. When this side closes it (aclose, a broken write, server
    close), the tasks are cancelled, in-flight handlers included.

    Invariants: once CLOSED, it stays closed, `_pending` is empty and every
    send()/request() raises the reason it closed (PeerLostError when the peer
    went away, TransportError when this side closed it).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: PeerInfo,
        handler: Handler | None,
        limits: ControlLimits,
    ) -> None:
        self.peer = peer
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._limits = limits
        self._state = ConnState.OPEN
        self._closed_reason: TransportError | None = None
        self._peer_error: str | None = None  # last unsolicited error the peer sent
        self._last_seen_s = time.monotonic()
        self._request_ids = itertools.count(1)
        # Owned here: request() adds, the reader resolves, _shutdown() fails the rest.
        self._pending: dict[int, asyncio.Future[Message]] = {}
        # None marks the end of the stream.
        self._inbox: asyncio.Queue[Message | None] = asyncio.Queue(limits.max_queued_messages)
        self._task: asyncio.Task[None] | None = None
        self._child_tasks: tuple[asyncio.Task[None], ...] = ()

    @property
    def state(self) -> ConnState:
        return self._state

    @property
    def last_seen_s(self) -> float:
        """time.monotonic() when the last frame from the peer arrived."""
        return self._last_seen_s

    async def send(self, msg: Message) -> None:
        """Send a notification (no reply)."""
        self._check_open()
        _check_outgoing(msg)
        await self._write(encode_frame(msg, self._limits.max_frame_bytes))

    async def request(self, msg: Message, timeout_s: float) -> Message:
        """Send `msg` as a request and return the peer's reply (without "re").

        PeerLostError if the peer does not answer within `timeout_s` or goes
        away first; TransportError if it answers with an error reply.
        """
        self._check_open()
        _check_outgoing(msg)
        request_id = next(self._request_ids)
        frame = encode_frame({**msg, "id": request_id}, self._limits.max_frame_bytes)
        reply_fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply_fut
        try:
            async with asyncio.timeout(timeout_s):
                await self._write(frame)
                reply = await reply_fut
        except TimeoutError as exc:
            raise PeerLostError(f"{self.peer} did not answer {msg['type']!r} within {timeout_s} s") from exc
        finally:
            self._pending.pop(request_id, None)
        if reply["type"] == "error":
            raise TransportError(f"{self.peer} answered {msg['type']!r} with an error: {reply.get('message')!r}")
        return reply

    async def aclose(self) -> None:
        """Close the connection: pending requests fail, the tasks stop. Idempotent.
        From inside a handler of this connection it returns at once, and the
        handler is cancelled at its next await."""
        self._shutdown(TransportError(f"connection to {self.peer} was closed by this side"))
        task = self._task
        if task is None or task.done() or asyncio.current_task() in (task, *self._child_tasks):
            return
        task.cancel()  # again: it may have been closed by the peer and still be running handlers
        await asyncio.wait([task])

    async def _serve(self) -> None:
        """Run the reader and the dispatcher until the connection ends."""
        self._task = asyncio.current_task()
        if self._state is ConnState.CLOSED:
            return
        reason: TransportError | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                self._child_tasks = (
                    tg.create_task(self._read_loop(), name=f"afkv-control-read {self.peer}"),
                    tg.create_task(self._dispatch_loop(), name=f"afkv-control-dispatch {self.peer}"),
                )
        except* FrameError as group:  # logged by the reader
            reason = PeerLostError(f"closed the connection to {self.peer} after a bad frame: {group.exceptions[0]}")
        except* PeerLostError as group:  # raised naming the peer
            reason = group.exceptions[0]
        except* TransportError as group:  # only after this side closed: a write found it closed
            reason = group.exceptions[0]
        finally:
            self._shutdown(reason or self._peer_closed())

    async def _read_loop(self) -> None:
        while True:
            try:
                msg = await read_frame(self._reader, self._limits.max_frame_bytes)
            except PeerLostError as exc:
                raise PeerLostError(f"lost {self.peer}: {exc}") from exc
            except FrameError as exc:
                log.warning("closing the control connection to %s: %s", self.peer, exc)
                await self._tell_peer_best_effort("bad_frame", str(exc))
                raise
            if msg is None:
                self._shutdown(self._peer_closed(), cancel=False)  # the dispatcher still drains the inbox
                await self._inbox.put(None)
                return
            self._last_seen_s = time.monotonic()
            kind = msg["type"]
            if kind == "heartbeat":
                continue
            if "re" in msg:
                self._resolve(msg)
            elif kind == "error":
                self._peer_error = str(msg.get("message"))[:MAX_ERROR_MESSAGE_CHARS]
                log.warning("%s reports an error: %s", self.peer, self._peer_error)
            else:
                await self._inbox.put(msg)

    def _resolve(self, reply: Message) -> None:
        request_id = reply.pop("re")
        reply_fut = self._pending.get(request_id) if isinstance(request_id, int) else None
        if reply_fut is None or reply_fut.done():
            log.debug("dropping a reply from %s to unknown or expired request %r", self.peer, request_id)
            return
        reply_fut.set_result(reply)

    async def _dispatch_loop(self) -> None:
        while (msg := await self._inbox.get()) is not None:
            await self._dispatch(msg)

    async def _dispatch(self, msg: Message) -> None:
        request_id = msg.pop("id", None)
        if self._handler is None:
            log.warning("no handler for %r from %s", msg["type"], self.peer)
            if request_id is None:
                return
            reply: Message = {"type": "error", "code": "no_handler", "message": f"no handler for {msg['type']!r}"}
            frame = encode_frame({**reply, "re": request_id}, self._limits.max_frame_bytes)
            await self._reply(frame, msg)
            return
        try:
            reply = await self._handler(self, msg)
            if request_id is None:  # a notification: nobody waits for an answer
                if reply is not None:
                    log.debug("dropping the handler's answer to notification %r", msg["type"])
                return
            reply = {"type": "ack"} if reply is None else reply
            frame = encode_frame({**reply, "re": request_id}, self._limits.max_frame_bytes)
        except Exception as exc:  # a handler's failure is the answer to its request, not the connection's end
            log.exception("control handler failed on %r from %s", msg["type"], self.peer)
            if request_id is None:
                return
            message = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_MESSAGE_CHARS]
            error: Message = {"type": "error", "code": "handler", "message": message, "re": request_id}
            frame = encode_frame(error, self._limits.max_frame_bytes)
        await self._reply(frame, msg)

    async def _reply(self, frame: bytes, msg: Message) -> None:
        if self._state is ConnState.CLOSED:  # the peer left after asking
            log.debug("dropping the answer to %r: %s", msg["type"], self._closed_reason)
            return
        await self._write(frame)

    async def _write(self, frame: bytes) -> None:
        self._check_open()
        try:
            await _write_bytes(self._writer, frame, self._limits.send_timeout_s)
        except PeerLostError as exc:
            reason = PeerLostError(f"lost {self.peer}: {exc}")
            self._shutdown(reason, abort=True)
            raise reason from exc

    async def _tell_peer_best_effort(self, code: str, message: str) -> None:
        error = {"type": "error", "code": code, "message": message[:MAX_ERROR_MESSAGE_CHARS]}
        try:
            await write_frame(self._writer, error, timeout_s=self._limits.send_timeout_s)
        except PeerLostError:
            log.debug("could not tell %s about %s: it is gone", self.peer, code)

    def _check_open(self) -> None:
        if self._state is ConnState.CLOSED:
            assert self._closed_reason is not None
            raise type(self._closed_reason)(str(self._closed_reason))

    def _peer_closed(self) -> PeerLostError:
        said = f" (it said: {self._peer_error})" if self._peer_error else ""
        return PeerLostError(f"{self.peer} closed the connection{said}")

    def _shutdown(self, reason: TransportError, *, abort: bool = False, cancel: bool = True) -> None:
        """Close once: record why, fail pending requests, close the transport and
        (if `cancel`) cancel the tasks, unless called from the task that is
        ending anyway."""
        if self._state is ConnState.CLOSED:
            return
        self._state = ConnState.CLOSED
        self._closed_reason = reason
        log.info("control connection ended: %s", reason)
        pending, self._pending = self._pending, {}
        for reply_fut in pending.values():
            if not reply_fut.done():
                reply_fut.set_exception(type(reason)(str(reason)))
        if abort:
            self._writer.transport.abort()
        else:
            self._writer.close()
        if cancel and self._task is not None and not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()


def _check_outgoing(msg: Message) -> None:
    _check_type_key(msg)
    for key in ("id", "re"):
        if key in msg:
            raise FrameError(f"{key!r} is reserved for request ids (in a {msg['type']!r} message)")


# ---------------------------------------------------------------- server


class ServerState(enum.Enum):
    CREATED = "created"
    SERVING = "serving"
    CLOSED = "closed"


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class ControlServer:
    """Accepts control connections and hands each message to `handler`.

        async with ControlServer(handler, host="127.0.0.1", port=0, token=None) as srv:
            srv.port, srv.peers(), srv.dead_peers(timeout_s)

    Owns the listening socket, the peer map (node_id -> connection) and every
    connection task. A bad frame, a failed handshake or a lost peer ends that
    peer's connection only. CREATED -> SERVING -> CLOSED; a closed server
    cannot be started again.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        limits: ControlLimits = ControlLimits(),
    ) -> None:
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError("the shared token must be a non-empty str", key="token")
        if token is None and not _is_loopback(host):
            raise ConfigError(
                f"binding elsewhere requires a shared token (host {host!r} is not a loopback address)", key="token"
            )
        self._handler = handler
        self._host = host
        self._port = port
        self._token = token.encode() if token is not None else None
        self._limits = limits
        self._state = ServerState.CREATED
        self._server: asyncio.Server | None = None
        # node_id -> its connection, until its task ends (it may be CLOSED and still
        # draining its handler queue meanwhile); owned here.
        self._conns: dict[str, ControlConnection] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # one per accepted socket, handshaking or serving

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def port(self) -> int:
        """The bound port (of the first socket when the host has several addresses)."""
        if self._server is None or not self._server.sockets:
            raise TransportError("the control server is not serving")
        return self._server.sockets[0].getsockname()[1]

    def peers(self) -> list[ControlConnection]:
        """Connections of the peers that completed the handshake and are still open."""
        return [conn for conn in self._conns.values() if conn.state is ConnState.OPEN]

    def dead_peers(self, timeout_s: float) -> list[ControlConnection]:
        """Open connections whose peer sent nothing (no heartbeat either) for over `timeout_s`."""
        now = time.monotonic()
        return [conn for conn in self.peers() if now - conn.last_seen_s > timeout_s]

    async def start(self) -> None:
        if self._state is not ServerState.CREATED:
            raise TransportError(f"the control server is {self._state.value}; make a new one")
        self._state = ServerState.SERVING
        try:
            self._server = await asyncio.start_server(self._on_connect, self._host, self._port)
        except OSError as exc:
            self._state = ServerState.CLOSED
            raise TransportError(f"cannot listen on {self._host}:{self._port}: {exc}") from exc
        log.info("control server listening on %s:%d", self._host, self.port)

    async def aclose(self) -> None:
        """Stop listening, end every connection (their tasks are cancelled and
        awaited) and drop the peers. Idempotent."""
        if self._state is ServerState.CLOSED:
            return
        self._state = ServerState.CLOSED
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn._shutdown(TransportError("the control server is closing"), abort=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback: the connection runs in a task of ours, not one of asyncio.streams.
        if self._state is not ServerState.SERVING:
            writer.transport.abort()
            return
        task = asyncio.create_task(self._serve_peer(reader, writer), name="afkv-control-peer")
        self._tasks.add(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("control connection task failed", exc_info=exc)

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        address = (str(host), int(port))
        conn: ControlConnection | None = None
        try:
            peer = await self._handshake(reader, writer, address)
            if peer is None:
                return
            conn = ControlConnection(reader, writer, peer, self._handler, self._limits)
            self._conns[peer.node_id] = conn  # no await since the duplicate check in _handshake
            await conn._write(encode_frame({"type": "welcome"}, self._limits.max_frame_bytes))
            log.info("control peer joined: %s", peer)
            await conn._serve()
        except PeerLostError as exc:
            log.info("control peer at %s:%d left: %s", *address, exc)
        finally:
            if conn is not None and self._conns.get(conn.peer.node_id) is conn:
                del self._conns[conn.peer.node_id]
            if conn is None:
                writer.close()
            else:
                conn._shutdown(TransportError(f"connection to {conn.peer} ended"))

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: tuple[str, int]
    ) -> PeerInfo | None:
        """The peer's identity once its hello passes, else None (refusal sent)."""
        try:
            hello = await read_frame(reader, HELLO_MAX_BYTES, timeout_s=self._limits.handshake_timeout_s)
        except FrameError as exc:
            await self._refuse(writer, address, "bad_frame", str(exc))
            return None
        if hello is None:
            return None
        if hello["type"] != "hello":
            await self._refuse(writer, address, "protocol", f"the first message must be a hello, got {hello['type']!r}")
            return None
        if self._token is not None:
            presented = hello.get("token")
            if not (isinstance(presented, str) and hmac.compare_digest(presented.encode(), self._token)):
                await self._refuse(writer, address, "auth", "wrong or missing token")
                return None
        role, node_id = hello.get("role"), hello.get("node_id")
        if not (isinstance(role, str) and role and isinstance(node_id, str) and node_id):
            await self._refuse(writer, address, "protocol", "a hello needs a non-empty str role and node_id")
            return None
        if node_id in self._conns and self._conns[node_id].state is ConnState.OPEN:
            await self._refuse(writer, address, "duplicate_node_id", f"node {node_id!r} is already connected")
            return None
        return PeerInfo(node_id=node_id, role=role, address=address)

    async def _refuse(self, writer: asyncio.StreamWriter, address: tuple[str, int], code: str, message: str) -> None:
        log.warning("refusing control connection from %s:%d: %s", *address, message)
        error = {"type": "error", "code": code, "message": message[:MAX_ERROR_MESSAGE_CHARS]}
        try:
            await write_frame(writer, error, timeout_s=self._limits.handshake_timeout_s)
        except PeerLostError:
            log.debug("%s:%d left before hearing why it was refused", *address)


# ---------------------------------------------------------------- client


class ControlClient:
    """One node's connection to a ControlServer.

        client = await ControlClient.connect(host, port, token=..., role=..., node_id=...)
        reply = await client.request({"type": "register", ...}, timeout_s=5.0)
        await client.send({"type": "step", ...})
        client.start_heartbeat(interval_s=1.0)
        await client.aclose()

    `handler` (optional) answers messages the server sends on its own,
    exactly as a server handler does; without one, server requests get an
    error reply and notifications are dropped with a warning.
    """

    def __init__(self, conn: ControlConnection) -> None:
        """Use connect()."""
        self._conn = conn
        task = asyncio.create_task(conn._serve(), name=f"afkv-control-client {conn.peer}")
        conn._task = task  # _serve sets the same on its first step; set now so an early aclose() can cancel it
        self._heartbeat_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        token: str | None = None,
        role: str,
        node_id: str,
        timeout_s: float = 10.0,
        handler: Handler | None = None,
        limits: ControlLimits = ControlLimits(),
    ) -> ControlClient:
        """Open a connection and pass the handshake within `timeout_s`.

        PeerLostError if the server cannot be reached or does not answer in
        time, AuthError if it refuses the token, TransportError for another
        refusal (e.g. duplicate node_id).
        """
        peer = PeerInfo(node_id=SERVER_NODE_ID, role="server", address=(host, port))
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
        except (TimeoutError, OSError) as exc:
            raise PeerLostError(f"cannot reach {peer}: {exc!r}") from exc
        try:
            hello = {"type": "hello", "token": token, "role": role, "node_id": node_id}
            await write_frame(writer, hello, HELLO_MAX_BYTES, timeout_s=timeout_s)
            answer = await read_frame(reader, limits.max_frame_bytes, timeout_s=timeout_s)
            if answer is None:
                raise PeerLostError(f"{peer} closed the connection during the handshake")
            if answer["type"] == "error":
                refusal = f"{peer} refused {role} {node_id!r}: {answer.get('message')!r}"
                raise AuthError(refusal) if answer.get("code") == "auth" else TransportError(refusal)
            if answer["type"] != "welcome":
                raise FrameError(f"{peer} answered the hello with {answer['type']!r}, expected 'welcome'")
        except BaseException:
            writer.transport.abort()
            raise
        return cls(ControlConnection(reader, writer, peer, handler, limits))

    @property
    def peer(self) -> PeerInfo:
        return self._conn.peer

    @property
    def state(self) -> ConnState:
        return self._conn.state

    async def send(self, msg: Message) -> None:
        await self._conn.send(msg)

    async def request(self, msg: Message, timeout_s: float) -> Message:
        return await self._conn.request(msg, timeout_s)

    def start_heartbeat(self, interval_s: float) -> None:
        """Send a heartbeat every `interval_s` until the connection closes."""
        if not interval_s > 0:
            raise ConfigError(f"must be > 0, got {interval_s!r}", key="interval_s")
        if self._heartbeat_task is not None:
            raise TransportError("heartbeats are already running on this client")
        self._conn._check_open()
        self._heartbeat_task = asyncio.create_task(self._heartbeat(interval_s), name=f"afkv-heartbeat {self.peer}")

    async def _heartbeat(self, interval_s: float) -> None:
        try:
            while True:
                await self._conn.send({"type": "heartbeat"})
                await asyncio.sleep(interval_s)
        except TransportError as exc:  # the connection closed: requests report it; heartbeats just stop
            log.debug("heartbeats to %s stopped: %s", self.peer, exc)

    async def aclose(self) -> None:
        """Stop heartbeats and close the connection; pending requests fail. Idempotent."""
        if self._heartbeat_task is not None and not self._heartbeat_task.done():
            self._heartbeat_task.cancel()
            await asyncio.wait([self._heartbeat_task])
        await self._conn.aclose()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
