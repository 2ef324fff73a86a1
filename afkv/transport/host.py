"""The host peer of the fixed-buffer data plane: NcclPeer's calls over one TCP connection.

The attention node's RemoteFFN and the expert node's step loop send and receive whole
fixed-capacity buffers through a Peer (afkv.transport.peer). Between two GPUs that is NCCL;
on machines without GPUs, and between two processes on one GPU (which NCCL refuses),
HostPeer carries the same calls through host memory, so the same code runs in tests and CI:

- `new_host_id(host)` opens a listening socket and names it "host:port:nonce"; the id goes
  through the rendezvous store like an NCCL unique id. Rank 0 accepts on it, rank 1
  connects and presents the nonce; a connection without it is closed.
- `send` copies the bytes at once and a sender thread writes them (NCCL's send is
  asynchronous too, and a blocking write could deadlock two nodes sending to each other).
- `recv` blocks until the bytes arrive, at most `timeout_s` (then PeerLostError).
- Every buffer travels with its byte count: a receiver expecting another size (the two
  ends disagree on a capacity) raises TransportError instead of reading garbage.
"""

from __future__ import annotations

import hmac
import queue
import secrets
import socket
import struct
import threading
import time
from contextlib import nullcontext

import torch

from afkv.errors import PeerLostError, TransportError

_HEADER = struct.Struct("<Q")
_BUFFER_BYTES = 8 * 2**20
_listeners: dict[str, socket.socket] = {}  # id -> listening socket, until rank 0 accepts on it
_listeners_lock = threading.Lock()


def new_host_id(host: str = "127.0.0.1") -> str:
    """A fresh id "host:port:nonce" with a socket listening behind it (rank 0 accepts there)."""
    sock = socket.create_server((host, 0))
    uid = f"{host}:{sock.getsockname()[1]}:{secrets.token_hex(16)}"
    with _listeners_lock:
        _listeners[uid] = sock
    return uid


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER_BYTES)


class HostPeer:
    """This process's end of a two-rank connection with one peer (afkv.transport.peer.Peer)."""

    graph_safe = False  # every call is host work: never inside a CUDA graph

    def __init__(self, unique_id: str, rank: int, device: torch.device, timeout_s: float = 30.0):
        self.device, self.timeout_s = device, timeout_s
        host, port, nonce = unique_id.rsplit(":", 2)
        self._error: BaseException | None = None
        self._sock = self._accept(unique_id, nonce) if rank == 0 else self._connect(host, int(port), nonce)
        self._sock.settimeout(timeout_s)
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="afkv-host-peer-send", daemon=True)
        self._sender.start()

    def _accept(self, uid: str, nonce: str) -> socket.socket:
        with _listeners_lock:
            listener = _listeners.pop(uid, None)
        if listener is None:
            raise TransportError(f"no listening socket for data-plane id {uid!r} in this process")
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                listener.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    conn, _ = listener.accept()
                except TimeoutError as exc:
                    raise PeerLostError(f"the data-plane peer did not connect within {self.timeout_s:.0f} s") from exc
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    got = conn.recv(len(nonce), socket.MSG_WAITALL).decode(errors="replace")
                except OSError:
                    got = ""
                if hmac.compare_digest(got, nonce):
                    _tune(conn)
                    return conn
                conn.close()  # not our peer: keep waiting for it
        finally:
            listener.close()

    def _connect(self, host: str, port: int, nonce: str) -> socket.socket:
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout_s)
        except OSError as exc:
            raise PeerLostError(f"data-plane peer {host}:{port} unreachable: {exc}") from exc
        _tune(sock)
        sock.sendall(nonce.encode())
        return sock

    def _send_loop(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._error = exc
                return

    def _failed(self, what: str, exc: BaseException) -> PeerLostError:
        self._error = self._error or exc
        return PeerLostError(f"data-plane peer lost during {what}: {exc}")

    def send(self, t: torch.Tensor, stream=None) -> None:
        """Queue t's bytes (copied now) for sending."""
        if self._error is not None:
            raise self._failed("send", self._error)
        if t.device.type == "cuda":  # the stream's writes to t must be done before the copy
            stream.synchronize()
        data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        self._outbox.put(_HEADER.pack(len(data)) + data)

    def recv(self, t: torch.Tensor, stream=None, timeout_s: float | None = None) -> None:
        """Fill t (contiguous) with the peer's next buffer; waits at most timeout_s (the
        peer's own when None) for each piece of it."""
        if self._error is not None:
            raise self._failed("recv", self._error)
        nbytes = t.numel() * t.element_size()
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        if timeout_s is not None:
            self._sock.settimeout(timeout_s)
        try:
            (sent,) = _HEADER.unpack(self._read(_HEADER.size))
            if sent != nbytes:
                raise TransportError(f"data-plane buffer of {sent} bytes where {nbytes} were expected: the two "
                                     "ends disagree on a capacity or shape")
            host = t if t.device.type == "cpu" else torch.empty(t.shape, dtype=t.dtype)
            self._read_into(memoryview(host.view(torch.uint8).numpy()).cast("B"))
        except TimeoutError as exc:
            raise self._failed("recv", TimeoutError(f"no data within {wait_s:.1f} s")) from exc
        except OSError as exc:
            raise self._failed("recv", exc) from exc
        finally:
            if timeout_s is not None and self._error is None:
                self._sock.settimeout(self.timeout_s)
        if host is not t:
            with torch.cuda.stream(stream):
                t.copy_(host)

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        self._read_into(memoryview(buf))
        return bytes(buf)

    def _read_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            k = self._sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError("connection closed by the peer")
            got += k

    def abort(self) -> None:
        """Close the connection: a receive waiting on it returns with an error."""
        self._error = self._error or ConnectionAbortedError("aborted")
        self._outbox.put(None)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    close = abort

    def group(self):
        """Calls inside a group are made one by one (sends never block here)."""
        return nullcontext()
