"""Rendezvous: a small authenticated key-value service where the nodes of a deployment meet.

Keys: afkv/expert/{j} and afkv/attention/{i} hold "host:port" of each node's server,
afkv/attention_nodes the number of attention nodes; the fixed-buffer data plane puts its
NCCL unique ids and host-peer nonces under afkv/nccl/... .

    RendezvousServer(host, port, token).start()   hosted by `afkv launch` (the launcher), or by
                                                  rank 0 from the torchrun/SLURM environment
    RendezvousClient(host, port, token)           everybody else (blocking: call from a thread)

Both have set / get / wait / check / delete_key (the server's act on its own table). It
speaks the control plane's frames and handshake (afkv.transport.control): the server binds
`host` only (the deployment's address, never every interface) and, with a token, answers
only peers that prove they hold it (HMAC challenge-response: the token never crosses the
wire, and the server proves it holds the token too), so a process without the token can
neither read nor plant an entry. Without a token it serves loopback only.

Each client call is one short connection: handshake, one request, one answer. The server
runs one thread per connection (at most `max_connections`); every read has a deadline, and
a `wait` or `get` holds its connection at most `max_wait_s`.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from datetime import timedelta

from afkv.errors import ConfigError, FrameError, PeerLostError, TransportError
from afkv.transport.control import (
    HEADER,
    HELLO_MAX_BYTES,
    MAGIC,
    MAX_ERROR_MESSAGE_CHARS,
    SCHEMA_VERSION,
    RateLimitedLog,
    check_hello,
    check_welcome,
    decode_payload,
    encode_frame,
    is_loopback,
    make_hello,
    new_nonce,
    server_proof,
)

log = logging.getLogger("afkv.rendezvous")

MAX_KEY_CHARS = 256
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS = 65536
MAX_REQUEST_BYTES = MAX_VALUE_BYTES + 4096


class RendezvousServer:
    """Owns the table (key -> bytes) and its condition; serves it to authenticated clients.
    `start()` binds and serves from background threads; `close()` stops them."""

    def __init__(self, host: str, port: int, token: str | None, *, handshake_timeout_s: float = 10.0,
                 max_wait_s: float = 600.0, max_connections: int = 256):
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError("the shared token must be a non-empty str", key="deployment.token")
        if token is None and not is_loopback(host):
            raise ConfigError(f"a rendezvous on {host!r} (not loopback) requires a shared token", key="deployment.token")
        self.host, self.token = host, token
        self.handshake_timeout_s, self.max_wait_s, self.max_connections = handshake_timeout_s, max_wait_s, max_connections
        self._requested_port = port
        self._table: dict[str, bytes] = {}
        self._changed = threading.Condition()  # guards _table and _num_connections
        self._num_connections = 0
        self._failures = RateLimitedLog(log)
        self._failures_lock = threading.Lock()
        self._server: _TCPServer | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (stays known after close)."""
        if self._port is None:
            raise TransportError("the rendezvous server was never started")
        return self._port

    def start(self) -> "RendezvousServer":
        try:
            self._server = _TCPServer((self.host, self._requested_port), self)
        except OSError as exc:
            raise PeerLostError(f"cannot host the rendezvous at {self.host}:{self._requested_port}: {exc}") from exc
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="afkv-rendezvous", daemon=True)
        self._thread.start()
        log.info("rendezvous serving on %s:%d", self.host, self.port)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "RendezvousServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the table (any thread) ---------------------------------------------------------------
    def set(self, key: str, value: str | bytes) -> None:
        _check_key(key)
        value = value.encode() if isinstance(value, str) else bytes(value)
        if len(value) > MAX_VALUE_BYTES:
            raise FrameError(f"a rendezvous value holds at most {MAX_VALUE_BYTES} bytes, got {len(value)}")
        with self._changed:
            if key not in self._table and len(self._table) >= MAX_KEYS:
                raise FrameError(f"the rendezvous holds at most {MAX_KEYS} keys")
            self._table[key] = value
            self._changed.notify_all()

    def get(self, key: str, timeout_s: float = 0.0) -> bytes:
        """The value of `key`, waiting up to timeout_s for it; PeerLostError if it stays unset."""
        self.wait([key], timeout_s)
        with self._changed:
            return self._table[key]

    def wait(self, keys: list[str], timeout_s: float | timedelta) -> None:
        if isinstance(timeout_s, timedelta):
            timeout_s = timeout_s.total_seconds()
        for key in keys:
            _check_key(key)
        with self._changed:
            if not self._changed.wait_for(lambda: all(k in self._table for k in keys), min(timeout_s, self.max_wait_s)):
                missing = [k for k in keys if k not in self._table]
                raise PeerLostError(f"rendezvous keys {missing[:4]} not set within {timeout_s:.0f} s")

    def check(self, keys: list[str]) -> bool:
        with self._changed:
            return all(k in self._table for k in keys)

    def delete_key(self, key: str) -> None:
        with self._changed:
            self._table.pop(key, None)

    # ---- serving (one thread per connection) ------------------------------------------------
    def _admit(self) -> bool:
        with self._changed:
            if self._num_connections >= self.max_connections:
                return False
            self._num_connections += 1
            return True

    def _leave(self) -> None:
        with self._changed:
            self._num_connections -= 1

    def _log(self, key: object, level: int, msg: str, *args) -> None:
        with self._failures_lock:
            self._failures(key, level, msg, *args)

    def _serve(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """One connection: handshake, one request, its answer (all within deadlines)."""
        deadline = time.monotonic() + self.handshake_timeout_s
        nonce = new_nonce()
        _send(sock, {"type": "challenge", "nonce": nonce}, deadline)
        hello = _recv(sock, HELLO_MAX_BYTES, deadline)
        checked = check_hello(hello, self.token, nonce)
        if len(checked) == 2:
            code, message = checked
            self._log(("refused", address[0], code), logging.WARNING, "rendezvous: refusing %s:%d: %s",
                      *address, message)
            _send(sock, {"type": "error", "code": code, "message": message}, deadline)
            return
        _, node_id, client_nonce = checked
        proof = None if self.token is None else server_proof(self.token, nonce, client_nonce)
        _send(sock, {"type": "welcome", "proof": proof}, deadline)
        request = _recv(sock, MAX_REQUEST_BYTES, time.monotonic() + self.handshake_timeout_s)
        try:
            reply = self._answer(request)
        except (FrameError, PeerLostError) as exc:
            code = "timeout" if isinstance(exc, PeerLostError) else "bad_request"
            reply = {"type": "error", "code": code, "message": str(exc)[:MAX_ERROR_MESSAGE_CHARS]}
        _send(sock, reply, time.monotonic() + self.handshake_timeout_s)

    def _answer(self, msg: dict) -> dict:
        kind = msg["type"]
        try:
            if kind == "set":
                self.set(msg["key"], msg["value"])
                return {"type": "ok"}
            if kind == "get":
                return {"type": "value", "value": self.get(msg["key"], _seconds(msg.get("timeout_s", 0.0)))}
            if kind == "wait":
                self.wait(list(msg["keys"]), _seconds(msg["timeout_s"]))
                return {"type": "ok"}
            if kind == "check":
                return {"type": "check", "present": self.check(list(msg["keys"]))}
            if kind == "delete":
                self.delete_key(msg["key"])
                return {"type": "ok"}
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed rendezvous {kind!r}: {exc!r}") from exc
        raise FrameError(f"unknown rendezvous request {kind!r}")


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: RendezvousServer):
        self.owner = owner
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def verify_request(self, request, client_address) -> bool:
        if self.owner._admit():
            return True
        self.owner._log("max_connections", logging.WARNING, "rendezvous: refusing a connection: %d are open",
                        self.owner.max_connections)
        return False


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        owner: RendezvousServer = self.server.owner
        try:
            owner._serve(self.request, self.client_address[:2])
        except (TransportError, OSError) as exc:
            owner._log(("dropped", self.client_address[0], type(exc).__name__), logging.INFO,
                       "rendezvous: connection from %s dropped: %s", self.client_address[0], exc)
        finally:
            owner._leave()


class RendezvousClient:
    """Blocking client of a RendezvousServer (call from a thread, never the event loop).

    PeerLostError at once when nothing listens (unless `wait_for_server`: then it keeps
    trying until `timeout_s`, as nodes starting before rank 0 do), AuthError when the
    server refuses the token or cannot prove it holds it."""

    def __init__(self, host: str, port: int, token: str | None, timeout_s: float = 60.0, *,
                 wait_for_server: bool = False, node_id: str = "rendezvous-client"):
        self.host, self.port, self.token, self.timeout_s = host, port, token, timeout_s
        self.wait_for_server, self.node_id = wait_for_server, node_id

    def set(self, key: str, value: str | bytes) -> None:
        self._call({"type": "set", "key": key, "value": value.encode() if isinstance(value, str) else bytes(value)})

    def get(self, key: str, timeout_s: float | None = None) -> bytes:
        """The value of `key`, waiting up to timeout_s (default: the client's timeout) for it."""
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        return self._call({"type": "get", "key": key, "timeout_s": wait_s}, wait_s)["value"]

    def wait(self, keys: list[str], timeout_s: float | timedelta) -> None:
        if isinstance(timeout_s, timedelta):
            timeout_s = timeout_s.total_seconds()
        self._call({"type": "wait", "keys": list(keys), "timeout_s": timeout_s}, timeout_s)

    def check(self, keys: list[str]) -> bool:
        return bool(self._call({"type": "check", "keys": list(keys)})["present"])

    def delete_key(self, key: str) -> None:
        self._call({"type": "delete", "key": key})

    def _call(self, msg: dict, wait_s: float = 0.0) -> dict:
        where = f"the rendezvous at {self.host}:{self.port}"
        sock = self._connect(where)
        try:
            deadline = time.monotonic() + self.timeout_s
            challenge = _recv(sock, HELLO_MAX_BYTES, deadline)
            hello, expected = make_hello(challenge, self.token, "rendezvous", self.node_id, where)
            _send(sock, hello, deadline)
            check_welcome(_recv(sock, HELLO_MAX_BYTES, deadline), expected, "rendezvous", self.node_id, where)
            _send(sock, msg, deadline)
            reply = _recv(sock, MAX_REQUEST_BYTES, time.monotonic() + wait_s + self.timeout_s)
        finally:
            sock.close()
        if reply["type"] == "error":
            text = f"{where}: {reply.get('message')!r}"
            raise PeerLostError(text) if reply.get("code") == "timeout" else FrameError(text)
        return reply

    def _connect(self, where: str) -> socket.socket:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            except ConnectionRefusedError as exc:
                if not self.wait_for_server or time.monotonic() > deadline:
                    raise PeerLostError(f"nothing listens at {where} (connection refused)") from exc
            except OSError as exc:
                raise PeerLostError(f"cannot reach {where}: {exc}") from exc
            time.sleep(0.1)  # rank 0 is not up yet: try again until the deadline (as TCPStore does)


def _check_key(key: object) -> None:
    if not (isinstance(key, str) and 0 < len(key) <= MAX_KEY_CHARS):
        raise FrameError(f"a rendezvous key is a str of 1 to {MAX_KEY_CHARS} characters, got {key!r:.80}")


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"a timeout is a number of seconds >= 0, got {value!r:.40}")
    return float(value)


def _send(sock: socket.socket, msg: dict, deadline: float) -> None:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        sock.sendall(encode_frame(msg, MAX_REQUEST_BYTES))
    except TimeoutError as exc:
        raise PeerLostError("the peer took no frame before the deadline") from exc
    except OSError as exc:
        raise PeerLostError(f"connection broken while writing: {exc!r}") from exc


def _recv(sock: socket.socket, max_bytes: int, deadline: float) -> dict:
    header = _recv_exactly(sock, HEADER.size, deadline)
    magic, version, nbytes = HEADER.unpack(header)
    if magic != MAGIC or version != SCHEMA_VERSION:
        raise FrameError(f"not an afkv control frame (magic {magic!r}, schema {version})")
    if nbytes > max_bytes:
        raise FrameError(f"frame of {nbytes} bytes announced, above the limit of {max_bytes}")
    return decode_payload(_recv_exactly(sock, nbytes, deadline))


def _recv_exactly(sock: socket.socket, nbytes: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < nbytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerLostError(f"no whole frame before the deadline ({len(buf)} of {nbytes} bytes)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(nbytes - len(buf), 1 << 20))
        except TimeoutError as exc:
            raise PeerLostError(f"no whole frame before the deadline ({len(buf)} of {nbytes} bytes)") from exc
        except OSError as exc:
            raise PeerLostError(f"connection broken while reading: {exc!r}") from exc
        if not chunk:
            raise PeerLostError(f"the peer closed the connection ({len(buf)} of {nbytes} bytes)")
        buf += chunk
    return bytes(buf)


def open_store(host: str, port: int, is_master: bool, timeout_s: float = 60.0, token: str | None = None):
    """The rendezvous: hosted here (`is_master`: a started RendezvousServer) or reached as a
    client that waits for the host to come up (nodes may start before it)."""
    if is_master:
        return RendezvousServer(host, port, token).start()
    return RendezvousClient(host, port, token, timeout_s, wait_for_server=True)


def publish(store, role: str, index: int, host: str, port: int) -> None:
    store.set(f"afkv/{role}/{index}", f"{host}:{port}")


def unpublish(store, role: str, index: int) -> None:
    """Forget a node's address (before restarting it), so lookups wait for the new one."""
    store.delete_key(f"afkv/{role}/{index}")


def lookup(store, role: str, count: int, timeout_s: float, first: int = 0) -> list[tuple[str, int]]:
    """Addresses of nodes first..count-1 of `role`, waiting up to timeout_s for them to register."""
    keys = [f"afkv/{role}/{i}" for i in range(first, count)]
    try:
        store.wait(keys, timeout_s)
    except PeerLostError as exc:
        raise PeerLostError(f"{role} nodes did not register within {timeout_s:.0f} s: {exc}") from exc
    out = []
    for k in keys:
        host, _, port = store.get(k).decode().rpartition(":")
        out.append((host, int(port)))
    return out
