"""Control plane: msgpack frames over asyncio streams.

Nodes (attention nodes, expert nodes, the launcher) exchange small control
messages here: registration, heartbeats, step metadata, placement updates,
shutdown. Hidden states never travel this way: they take the data plane's peers
(afkv.transport.peer). Expert weights copied between expert nodes may, in bounded frames
(afkv.nodes.transfer).

Frame on the wire:

    +---------+-------------+-------------------+--------------------------+
    | magic   | schema      | payload length    | payload: msgpack map     |
    | b"AFKC" | u16, BE     | u32, BE (nbytes)  | with a str "type" key    |
    +---------+-------------+-------------------+--------------------------+

A reader checks magic and schema, refuses a length above its limit before
reading the payload, and decodes with raw=False, no ext types and msgpack's
length limits bounded by the payload size. Any frame error desynchronises
the stream, so the connection is closed after one. A whole message of a
type above its own limit (ControlLimits.message_bytes) is refused alone.

Session (the whole handshake within handshake_timeout_s, frames of at most
HELLO_MAX_BYTES):

    server -> client   {"type": "challenge", "nonce": sn}        32 random bytes
    client -> server   {"type": "hello", "role", "node_id", "nonce": cn, "proof": client_proof(...)}
    server -> client   {"type": "welcome", "proof": server_proof(...)}
                       or {"type": "error", "code", "message"}, then close
    then either side, any number of times:
      request          {..., "type": t, "id": n}  -> one reply {..., "re": n}
      notification     {..., "type": t}              no reply
      heartbeat        {"type": "heartbeat"}         only resets the idle deadline
      error            {"type": "error", "code", "message"[, "error", "re": n]}

Authentication: with a shared token, each side proves it holds the token with
an HMAC-SHA256 over both nonces (and the client's role and node_id); the
token itself never crosses the wire. A server without a token (loopback
only) sends no proof and accepts any hello; a client with a token refuses a
server that cannot prove it holds the same token. Nothing is encrypted: the
token keeps out processes that lack it, not an eavesdropper on the path.

Deadlines after the handshake (ControlLimits): a peer that sends no frame
(heartbeats count) for idle_timeout_s, or takes over frame_timeout_s to send
one whole frame once its first byte arrived, is lost. A side that sets
heartbeat_interval_s sends heartbeats, so that its idle peer stays alive.

"id" and "re" are reserved keys: request() sets "id", the answering side sets
"re". A handler returning None to a request answers {"type": "ack"}; a
handler raising answers {"type": "error", "code": "handler", "error":
afkv.errors.error_to_wire(exc)}, which request() raises as the same error
class (error_from_wire); what a handler returns for a notification is
dropped. Handler failures are logged once per (peer, message type) and
then at most once a minute. Messages from one peer reach the handler one at a
time, in arrival order; replies and heartbeats are read meanwhile (until
max_queued_messages wait for the handler), so a slow handler neither blocks
replies nor makes its peer look dead.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
import itertools
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack

from afkv.errors import (
    AfkvError,
    AuthError,
    ConfigError,
    FrameError,
    FrameTooLargeError,
    PeerLostError,
    TransportError,
    error_from_wire,
    error_to_wire,
)

log = logging.getLogger(__name__)

MAGIC = b"AFKC"
SCHEMA_VERSION = 2  # 2: challenge-response handshake
HEADER = struct.Struct(">4sHI")  # magic, schema version, payload nbytes
MAX_FRAME_BYTES = 16 * 1024 * 1024
HELLO_MAX_BYTES = 64 * 1024  # an unauthenticated peer may not make us buffer more
MAX_ERROR_MESSAGE_CHARS = 1000
SERVER_NODE_ID = "control-server"  # how a client names the server it talks to
NONCE_BYTES = 32
LOG_EVERY_S = 60.0  # a repeated failure of one kind is logged at most this often

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
    reader: asyncio.StreamReader,
    max_bytes: int = MAX_FRAME_BYTES,
    *,
    timeout_s: float | None = None,
    idle_timeout_s: float | None = None,
) -> Message | None:
    """Read one frame. None at a clean end of stream (EOF before any header byte).

    Raises FrameTooLargeError before reading a payload above `max_bytes`,
    FrameError for bad magic, schema version or payload, and PeerLostError on
    EOF inside a frame, a reset, no first byte within `idle_timeout_s`, or no
    whole frame within `timeout_s` (counted from its first byte when
    `idle_timeout_s` is given, else from the call). After a FrameError the
    stream is desynchronised: the caller must close it.
    """
    payload = await _read_payload(reader, max_bytes, timeout_s, idle_timeout_s)
    return None if payload is None else decode_payload(payload)


async def _read_payload(
    reader: asyncio.StreamReader, max_bytes: int, timeout_s: float | None, idle_timeout_s: float | None
) -> bytes | None:
    """The payload of the next frame (see read_frame), or None at a clean end of stream."""
    first = b""
    try:
        if idle_timeout_s is not None:
            try:
                async with asyncio.timeout(idle_timeout_s):
                    first = await reader.read(1)
            except TimeoutError as exc:
                raise PeerLostError(f"no frame for {idle_timeout_s} s") from exc
            if not first:
                return None
        async with asyncio.timeout(timeout_s):
            try:
                header = first + await reader.readexactly(HEADER.size - len(first))
            except asyncio.IncompleteReadError as exc:
                if not first and not exc.partial:
                    return None
                raise
            magic, version, nbytes = HEADER.unpack(header)
            if magic != MAGIC:
                raise FrameError(f"bad magic {magic!r}, expected {MAGIC!r}")
            if version != SCHEMA_VERSION:
                raise FrameError(f"schema version {version}, expected {SCHEMA_VERSION}")
            if nbytes > max_bytes:
                raise FrameTooLargeError(f"frame of {nbytes} bytes announced, above the limit of {max_bytes}")
            return await reader.readexactly(nbytes)
    except asyncio.IncompleteReadError as exc:
        raise PeerLostError(f"end of stream inside a frame ({len(exc.partial)} of {exc.expected} bytes)") from exc
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        raise PeerLostError(f"no whole frame within {timeout_s} s") from exc
    except OSError as exc:
        raise PeerLostError(f"connection broken while reading: {exc!r}") from exc


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


# ---------------------------------------------------------------- authentication


def client_proof(token: str, server_nonce: bytes, client_nonce: bytes, role: str, node_id: str) -> bytes:
    """What a client sends to prove it holds `token` (bound to both nonces and its identity)."""
    return _mac(token, [b"afkv-client", server_nonce, client_nonce, role, node_id])


def server_proof(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """What a server sends back to prove it holds `token` too."""
    return _mac(token, [b"afkv-server", server_nonce, client_nonce])


def _mac(token: str, parts: list) -> bytes:
    return hmac.new(token.encode(), msgpack.packb(parts, use_bin_type=True), hashlib.sha256).digest()


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def check_hello(hello: Message, token: str | None, server_nonce: bytes) -> tuple[str, str, bytes] | tuple[str, str]:
    """Validate a hello against the challenge: (role, node_id, client nonce), or (code,
    message) of the refusal."""
    if hello["type"] != "hello":
        return "protocol", f"the first message must be a hello, got {hello['type']!r}"
    role, node_id, nonce = hello.get("role"), hello.get("node_id"), hello.get("nonce")
    if not (isinstance(role, str) and role and isinstance(node_id, str) and node_id):
        return "protocol", "a hello needs a non-empty str role and node_id"
    if not (isinstance(nonce, bytes) and len(nonce) == NONCE_BYTES):
        return "protocol", f"a hello needs a {NONCE_BYTES}-byte nonce"
    if token is not None:
        proof = hello.get("proof")
        expected = client_proof(token, server_nonce, nonce, role, node_id)
        if not (isinstance(proof, bytes) and hmac.compare_digest(proof, expected)):
            return "auth", "wrong or missing token"
    return role, node_id, nonce


def make_hello(challenge: Message, token: str | None, role: str, node_id: str, peer: object) -> tuple[Message, bytes]:
    """A client's hello answering `challenge` -> (hello, the server proof to expect)."""
    if challenge["type"] == "error":
        raise _refusal(challenge, f"{peer} refused {role} {node_id!r}")
    server_nonce = challenge.get("nonce")
    if challenge["type"] != "challenge" or not (isinstance(server_nonce, bytes) and len(server_nonce) == NONCE_BYTES):
        raise FrameError(f"{peer} opened with {challenge['type']!r}, expected a challenge")
    nonce = new_nonce()
    proof = None if token is None else client_proof(token, server_nonce, nonce, role, node_id)
    hello = {"type": "hello", "role": role, "node_id": node_id, "nonce": nonce, "proof": proof}
    return hello, b"" if token is None else server_proof(token, server_nonce, nonce)


def check_welcome(answer: Message | None, expected_proof: bytes, role: str, node_id: str, peer: object) -> None:
    """Raise unless `answer` welcomes us and (with a token) proves the server holds it."""
    if answer is None:
        raise PeerLostError(f"{peer} closed the connection during the handshake")
    if answer["type"] == "error":
        raise _refusal(answer, f"{peer} refused {role} {node_id!r}")
    if answer["type"] != "welcome":
        raise FrameError(f"{peer} answered the hello with {answer['type']!r}, expected 'welcome'")
    proof = answer.get("proof")
    if expected_proof and not (isinstance(proof, bytes) and hmac.compare_digest(proof, expected_proof)):
        raise AuthError(f"{peer} did not prove it holds the shared token: not a node of this deployment")


def _refusal(answer: Message, what: str) -> TransportError:
    refusal = f"{what}: {answer.get('message')!r}"
    return AuthError(refusal) if answer.get("code") == "auth" else TransportError(refusal)


class RateLimitedLog:
    """Logs a failure the first time its key (e.g. peer and message type) shows up, then at
    most once every `every_s` with the number of failures left out meanwhile: a peer that
    keeps failing cannot flood the log. Owned by one event loop (or one thread)."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S, max_keys: int = 4096):
        self._log, self._every_s, self._max_keys = logger, every_s, max_keys
        self._seen: dict[object, list] = {}  # key -> [last logged (monotonic s), failures not logged since]

    def __call__(self, key: object, level: int, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._every_s:
            seen[1] += 1
            return
        if seen is not None and seen[1]:
            msg += f" ({seen[1]} more like it in the last {now - seen[0]:.0f} s not logged)"
        if len(self._seen) >= self._max_keys and key not in self._seen:
            self._seen.clear()  # bounded memory: forgetting only costs one more log line per key
        self._seen[key] = [now, 0]
        self._log.log(level, msg, *args, exc_info=exc_info)


# ---------------------------------------------------------------- peers and connections


@dataclass(frozen=True)
class ControlLimits:
    """Per-connection limits, validated once here. None: no such deadline."""

    max_frame_bytes: int = MAX_FRAME_BYTES  # no frame above this is written, nor read (the connection closes)
    max_inbound_bytes: int | None = None  # a lower limit for frames read; None: max_frame_bytes
    handshake_timeout_s: float = 10.0
    send_timeout_s: float = 10.0  # a peer that takes no frame for this long is lost
    max_queued_messages: int = 256  # read-ahead for the handler; reading pauses beyond
    idle_timeout_s: float | None = None  # a peer that sends no frame for this long is lost
    frame_timeout_s: float | None = None  # ... or that takes this long to send one whole frame
    heartbeat_interval_s: float | None = None  # this side sends heartbeats this often
    max_connections: int = 1024  # a server refuses connections beyond this many
    # message type -> its largest payload (bytes); other types: default_message_bytes. A
    # message above its limit is refused alone (FrameTooLargeError), the connection stays.
    message_bytes: Mapping[str, int] = field(default_factory=dict)
    default_message_bytes: int | None = None  # None: the inbound limit

    def __post_init__(self) -> None:
        object.__setattr__(self, "message_bytes", MappingProxyType(dict(self.message_bytes)))
        for key in ("max_frame_bytes", "handshake_timeout_s", "send_timeout_s", "max_queued_messages",
                    "max_connections"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"must be > 0, got {getattr(self, key)!r}", key=key)
        for key in ("idle_timeout_s", "frame_timeout_s", "heartbeat_interval_s", "default_message_bytes",
                    "max_inbound_bytes"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(f"must be None or > 0, got {getattr(self, key)!r}", key=key)
        if self.max_frame_bytes > 2**32 - 1:
            raise ConfigError("the frame header holds at most a u32 length", key="max_frame_bytes")
        if any(not 0 < n <= self.inbound_bytes for n in self.message_bytes.values()):
            raise ConfigError(f"message limits must be in (0, max_inbound_bytes], got {dict(self.message_bytes)}",
                              key="message_bytes")

    @property
    def inbound_bytes(self) -> int:
        """The largest frame read (a larger one closes the connection before it is read)."""
        return min(self.max_inbound_bytes or self.max_frame_bytes, self.max_frame_bytes)

    def message_limit(self, kind: str) -> int:
        """The largest payload a message of type `kind` may have."""
        return self.message_bytes.get(kind, self.default_message_bytes or self.inbound_bytes)


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
    resets the idle deadline, queues other messages) and the dispatcher (calls
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
        failures: RateLimitedLog | None = None,
    ) -> None:
        self.peer = peer
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._limits = limits
        self._failures = failures or RateLimitedLog(log)  # a server shares one among its connections
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._state = ConnState.OPEN
        self._closed_reason: TransportError | None = None
        self._peer_error: str | None = None  # last unsolicited error the peer sent
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
    def closed_reason(self) -> TransportError | None:
        """Why the connection closed (None while open)."""
        return self._closed_reason

    async def send(self, msg: Message) -> None:
        """Send a notification (no reply)."""
        self._check_open()
        _check_outgoing(msg)
        await self._write(encode_frame(msg, self._limits.max_frame_bytes))

    async def request(self, msg: Message, timeout_s: float) -> Message:
        """Send `msg` as a request and return the peer's reply (without "re").

        PeerLostError if the peer does not answer within `timeout_s` or goes
        away first; the error its handler raised (same class, message and
        fields; see afkv.errors.error_from_wire) if it answers with one; else
        TransportError for another error reply.
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
            if "error" in reply:
                exc = error_from_wire(reply["error"])
                exc.add_note(f"raised by {self.peer} answering {msg['type']!r}")
                raise exc
            raise TransportError(f"{self.peer} answered {msg['type']!r} with an error: {reply.get('message')!r}")
        return reply

    def start_heartbeat(self, interval_s: float) -> None:
        """Send a heartbeat every `interval_s` until the connection closes."""
        if not interval_s > 0:
            raise ConfigError(f"must be > 0, got {interval_s!r}", key="interval_s")
        if self._heartbeat_task is not None:
            raise TransportError("heartbeats are already running on this connection")
        self._check_open()
        self._heartbeat_task = asyncio.create_task(self._heartbeat(interval_s), name=f"afkv-heartbeat {self.peer}")

    async def _heartbeat(self, interval_s: float) -> None:
        try:
            while True:
                await self.send({"type": "heartbeat"})
                await asyncio.sleep(interval_s)
        except TransportError as exc:  # the connection closed: requests report it; heartbeats just stop
            log.debug("heartbeats to %s stopped: %s", self.peer, exc)

    async def wait_closed(self) -> None:
        """Return once the connection is closed and its tasks have ended."""
        if self._task is not None:
            await asyncio.wait([self._task])

    async def aclose(self) -> None:
        """Close the connection: pending requests fail, the tasks stop. Idempotent.
        From inside a handler of this connection it returns at once, and the
        handler is cancelled at its next await."""
        self._shutdown(TransportError(f"connection to {self.peer} was closed by this side"))
        beating = self._heartbeat_task
        if beating is not None and not beating.done() and beating is not asyncio.current_task():
            beating.cancel()
            await asyncio.wait([beating])
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
        limits = self._limits
        while True:
            try:
                payload = await _read_payload(self._reader, limits.inbound_bytes, limits.frame_timeout_s,
                                              limits.idle_timeout_s)
                msg = None if payload is None else decode_payload(payload)
            except PeerLostError as exc:
                raise PeerLostError(f"lost {self.peer}: {exc}") from exc
            except FrameError as exc:
                self._failures((self.peer.node_id, "bad_frame"), logging.WARNING,
                               "closing the control connection to %s: %s", self.peer, exc)
                await self._tell_peer_best_effort("bad_frame", str(exc))
                raise
            if msg is None:
                self._shutdown(self._peer_closed(), cancel=False)  # the dispatcher still drains the inbox
                await self._inbox.put(None)
                return
            kind = msg["type"]
            if "re" in msg:
                self._resolve(msg)
                continue
            if len(payload) > limits.message_limit(kind):
                await self._refuse_message(msg, FrameTooLargeError(
                    f"a {kind!r} message may hold {limits.message_limit(kind)} bytes, got {len(payload)}"))
            elif kind == "heartbeat":
                continue
            elif kind == "error":
                self._peer_error = str(msg.get("message"))[:MAX_ERROR_MESSAGE_CHARS]
                self._failures((self.peer.node_id, "peer_error"), logging.WARNING, "%s reports an error: %s",
                               self.peer, self._peer_error)
            else:
                await self._inbox.put(msg)

    async def _refuse_message(self, msg: Message, exc: AfkvError) -> None:
        """Answer a message that will not be handled with `exc` (its request gets it as the reply)."""
        self._failures((self.peer.node_id, msg["type"], type(exc).__name__), logging.WARNING,
                       "refused %r from %s: %s", msg["type"], self.peer, exc)
        error: Message = {"type": "error", "code": "refused", "message": str(exc)[:MAX_ERROR_MESSAGE_CHARS],
                          "error": _error_wire(exc)}
        request_id = msg.get("id")
        if isinstance(request_id, int):
            error["re"] = request_id
        await self._write(encode_frame(error, self._limits.max_frame_bytes))

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
            expected = isinstance(exc, AfkvError)  # a typed refusal: no traceback
            self._failures((self.peer.node_id, msg["type"], type(exc).__name__),
                           logging.WARNING if expected else logging.ERROR, "control handler failed on %r from %s: %s",
                           msg["type"], self.peer, exc, exc_info=None if expected else exc)
            if request_id is None:
                return
            message = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_MESSAGE_CHARS]
            error: Message = {"type": "error", "code": "handler", "message": message, "error": _error_wire(exc),
                              "re": request_id}
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
        beating = self._heartbeat_task
        if beating is not None and not beating.done() and beating is not asyncio.current_task():
            beating.cancel()


def _error_wire(exc: BaseException) -> Message:
    wire = error_to_wire(exc)
    wire["message"] = wire["message"][: 4 * MAX_ERROR_MESSAGE_CHARS]
    return wire


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


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class ControlServer:
    """Accepts control connections and hands each message to `handler`.

        async with ControlServer(handler, host="127.0.0.1", port=0, token=None) as srv:
            srv.port, srv.peers()

    Owns the listening socket, the peer map (node_id -> connection) and every
    connection task. A bad frame, a failed handshake or a lost peer ends that
    peer's connection only; `on_lost(node_id)` (event loop, must not block) is then
    told, for peers that completed the handshake, unless the server itself is
    closing. CREATED -> SERVING -> CLOSED; a closed server cannot be started again.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        limits: ControlLimits = ControlLimits(),
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError("the shared token must be a non-empty str", key="token")
        if token is None and not is_loopback(host):
            raise ConfigError(
                f"binding elsewhere requires a shared token (host {host!r} is not a loopback address)", key="token"
            )
        self._handler = handler
        self._on_lost = on_lost
        self._host = host
        self._port = port
        self._token = token
        self._limits = limits
        self._failures = RateLimitedLog(log)  # handler failures, refusals and bad frames, per peer and kind
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
        if len(self._tasks) >= self._limits.max_connections:
            self._failures("max_connections", logging.WARNING, "refusing a control connection: %d are open",
                           len(self._tasks))
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
            try:
                async with asyncio.timeout(self._limits.handshake_timeout_s):
                    welcomed = await self._handshake(reader, writer, address)
            except TimeoutError:
                self._failures(("handshake_timeout", address[0]), logging.INFO,
                               "control connection from %s:%d: no handshake within %s s", *address,
                               self._limits.handshake_timeout_s)
                return
            if welcomed is None:
                return
            peer, welcome = welcomed
            conn = ControlConnection(reader, writer, peer, self._handler, self._limits, self._failures)
            self._conns[peer.node_id] = conn  # no await since the duplicate check in _handshake
            await conn._write(encode_frame(welcome, self._limits.max_frame_bytes))
            log.info("control peer joined: %s", peer)
            if self._limits.heartbeat_interval_s is not None:
                conn.start_heartbeat(self._limits.heartbeat_interval_s)
            await conn._serve()
        except PeerLostError as exc:
            log.info("control peer at %s:%d left: %s", *address, exc)
        finally:
            if conn is not None and self._conns.get(conn.peer.node_id) is conn:
                del self._conns[conn.peer.node_id]
                if self._on_lost is not None and self._state is ServerState.SERVING:
                    self._on_lost(conn.peer.node_id)  # a failure ends this task only (logged by _forget_task)
            if conn is None:
                writer.close()
            else:
                conn._shutdown(TransportError(f"connection to {conn.peer} ended"))

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: tuple[str, int]
    ) -> tuple[PeerInfo, Message] | None:
        """(the peer's identity, the welcome to send) once its hello passes, else None
        (refusal sent). The caller bounds it with handshake_timeout_s."""
        nonce = new_nonce()
        try:
            await write_frame(writer, {"type": "challenge", "nonce": nonce}, HELLO_MAX_BYTES)
            hello = await read_frame(reader, HELLO_MAX_BYTES)
        except FrameError as exc:
            await self._refuse(writer, address, "bad_frame", str(exc))
            return None
        if hello is None:
            return None
        checked = check_hello(hello, self._token, nonce)
        if len(checked) == 2:
            await self._refuse(writer, address, *checked)
            return None
        role, node_id, client_nonce = checked
        if node_id in self._conns and self._conns[node_id].state is ConnState.OPEN:
            await self._refuse(writer, address, "duplicate_node_id", f"node {node_id!r} is already connected")
            return None
        proof = None if self._token is None else server_proof(self._token, nonce, client_nonce)
        return PeerInfo(node_id=node_id, role=role, address=address), {"type": "welcome", "proof": proof}

    async def _refuse(self, writer: asyncio.StreamWriter, address: tuple[str, int], code: str, message: str) -> None:
        self._failures(("refused", address[0], code), logging.WARNING, "refusing control connection from %s:%d: %s",
                       *address, message)
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
            async with asyncio.timeout(timeout_s):
                challenge = await read_frame(reader, HELLO_MAX_BYTES)
                if challenge is None:
                    raise PeerLostError(f"{peer} closed the connection during the handshake")
                hello, expected_proof = make_hello(challenge, token, role, node_id, peer)
                await write_frame(writer, hello, HELLO_MAX_BYTES)
                answer = await read_frame(reader, HELLO_MAX_BYTES)
                check_welcome(answer, expected_proof, role, node_id, peer)
        except TimeoutError as exc:
            writer.transport.abort()
            raise PeerLostError(f"{peer} did not complete the handshake within {timeout_s} s") from exc
        except BaseException:
            writer.transport.abort()
            raise
        client = cls(ControlConnection(reader, writer, peer, handler, limits))
        if limits.heartbeat_interval_s is not None:
            client.start_heartbeat(limits.heartbeat_interval_s)
        return client

    @property
    def peer(self) -> PeerInfo:
        return self._conn.peer

    @property
    def state(self) -> ConnState:
        return self._conn.state

    @property
    def closed_reason(self) -> TransportError | None:
        return self._conn.closed_reason

    async def send(self, msg: Message) -> None:
        await self._conn.send(msg)

    async def request(self, msg: Message, timeout_s: float) -> Message:
        return await self._conn.request(msg, timeout_s)

    def start_heartbeat(self, interval_s: float) -> None:
        """Send a heartbeat every `interval_s` until the connection closes."""
        self._conn.start_heartbeat(interval_s)

    async def wait_closed(self) -> None:
        """Return once the connection is closed (by either side, or a deadline)."""
        await self._conn.wait_closed()

    async def aclose(self) -> None:
        """Stop heartbeats and close the connection; pending requests fail. Idempotent."""
        await self._conn.aclose()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
