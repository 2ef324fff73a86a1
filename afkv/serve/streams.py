"""StreamServer: a ControlServer whose requests each stream from their own task.

Both node-facing servers work this way: the attention node's API (afkv.serve.api: a client's
generate streams chunks) and a prefill node (afkv.serve.prefill: a decode node's prefill streams
KV rows). Per connection, each stream has an int id the peer chose (KEY in its messages); the
peer can cancel it, and a peer that goes away takes its streams with it (their sends fail).
A stream that fails sends FAILED with the error (class and fields kept, afkv.errors); a bug
still ends the peer's stream, as RequestFailedError, so nothing waits forever.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable

from afkv import errors
from afkv.transport.control import ControlConnection, ControlLimits, ControlServer

log = logging.getLogger("afkv.serve")


class StreamServer(abc.ABC):
    """Owns `_streams`: per connection, stream id -> the task streaming it (added by `_start`,
    removed by the task when it ends). Subclasses name their protocol with the class fields and
    answer messages in `_handle`."""

    KEY = "rid"  # the stream id's key in messages
    FAILED = "failed"  # the message that ends a stream with its error
    PEER = "client"  # for logs and errors: who asked,
    WHAT = "request"  # what a stream is,
    WHERE = "this node"  # and where it ran

    def __init__(self, host: str, port: int, token: str | None, limits: ControlLimits):
        self._server = ControlServer(self._handle, host=host, port=port, token=token, limits=limits)
        self._streams: dict[ControlConnection, dict[int, asyncio.Task]] = {}

    @property
    def port(self) -> int:
        return self._server.port

    async def start(self) -> int:
        await self._server.start()
        return self._server.port

    async def aclose(self) -> None:
        await self._end_streams()
        await self._server.aclose()

    async def _end_streams(self) -> None:
        """Cancel every stream and wait for them to end."""
        tasks = [t for streams in self._streams.values() for t in streams.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @abc.abstractmethod
    async def _handle(self, conn: ControlConnection, msg: dict) -> dict | None:
        """One message of `conn` -> the reply, or None (streams answer on their own)."""

    def _stream_id(self, msg: dict) -> int:
        sid = msg.get(self.KEY)
        if isinstance(sid, bool) or not isinstance(sid, int):
            raise errors.FrameError(f"a {msg['type']!r:.20} message needs an int {self.KEY!r}, got {sid!r:.50}")
        return sid

    def _start(self, conn: ControlConnection, sid: int, body: Callable[[], Awaitable[None]], name: str) -> asyncio.Task:
        """Run body() as stream `sid` of `conn` -> its task (cancelled before its first step,
        it never runs body: its entry then goes when the task ends)."""
        streams = self._streams.setdefault(conn, {})
        if sid in streams:
            raise errors.FrameError(f"{self.KEY} {sid} is already streaming on this connection")
        task = streams[sid] = asyncio.create_task(self._run(conn, sid, body), name=name)
        task.add_done_callback(lambda t: self._ended(conn, sid, t))
        return task

    def _ended(self, conn: ControlConnection, sid: int, task: asyncio.Task | None) -> None:
        streams = self._streams.get(conn)
        if streams is not None and streams.get(sid) is task:
            del streams[sid]
            if not streams:
                del self._streams[conn]

    def _cancel(self, conn: ControlConnection, sid: object) -> None:
        task = self._streams.get(conn, {}).get(sid) if isinstance(sid, int) else None
        if task is not None:
            task.cancel()

    async def _run(self, conn: ControlConnection, sid: int, body: Callable[[], Awaitable[None]]) -> None:
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except errors.TransportError as exc:
            log.info("%s of %s %d is gone: %s", self.PEER, self.WHAT, sid, exc)
        except errors.AfkvError as exc:
            await self._fail(conn, sid, exc)
        except Exception as exc:  # a bug: still end the peer's stream, never leave it waiting
            log.exception("%s %d failed", self.WHAT, sid)
            await self._fail(conn, sid, errors.RequestFailedError(
                f"{self.WHAT} {sid} failed on {self.WHERE}: {type(exc).__name__}: {exc}"))
        finally:
            self._ended(conn, sid, asyncio.current_task())  # before the task ends: a cancel then finds none

    async def _fail(self, conn: ControlConnection, sid: int, exc: errors.AfkvError) -> None:
        try:
            await conn.send({"type": self.FAILED, self.KEY: sid, "error": errors.error_to_wire(exc)})
        except errors.TransportError:
            log.info("%s of %s %d is gone; its error was: %s", self.PEER, self.WHAT, sid, exc)
