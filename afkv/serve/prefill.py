"""PrefillServer: a prefill node's Engine serving KV hand-offs to decode nodes.

The protocol, checks and faults are afkv.nodes.handoff's (its module docstring). Per message:

    prefill   start a stream task: Engine.export_prefill over the prompt, each batch of rows
              it yields written into the decode node's segment (when this host has it) or sent
              in the kv_blocks messages, then prefill_done (or prefill_failed with the error,
              which keeps its class)
    cancel    cancel that stream: the engine aborts the prefill and frees its blocks

A decode node that goes away takes its streams with it (their sends fail; the engine aborts).
"""

from __future__ import annotations

import asyncio
import logging

from afkv import errors
from afkv.engine.engine import Engine
from afkv.kv.formats import FORMAT_NAMES, BlockFormat, make_format
from afkv.nodes.handoff import MAX_FRAME_BYTES, blocks_to_wire, open_segment
from afkv.transport.control import ControlConnection, ControlLimits, ControlServer

log = logging.getLogger("afkv.prefill")

HEARTBEAT_INTERVAL_S = 1.0


class PrefillServer:
    """Owns `_streams`: per connection, hid -> the task streaming that hand-off (added by a
    prefill message, removed by the task when it ends)."""

    def __init__(self, engine: Engine, host: str, port: int = 0, token: str | None = None,
                 client_timeout_s: float = 60.0):
        self.engine = engine
        prompt_bytes = 16 * engine.max_model_len + 64 * 2**10  # token ids and wanted hashes, msgpack
        limits = ControlLimits(max_frame_bytes=MAX_FRAME_BYTES, max_inbound_bytes=4 * prompt_bytes,
                               idle_timeout_s=client_timeout_s, frame_timeout_s=client_timeout_s,
                               heartbeat_interval_s=HEARTBEAT_INTERVAL_S, message_bytes={"prefill": prompt_bytes},
                               default_message_bytes=64 * 2**10)
        self._server = ControlServer(self._handle, host=host, port=port, token=token, limits=limits)
        self._streams: dict[ControlConnection, dict[int, asyncio.Task]] = {}

    @property
    def port(self) -> int:
        return self._server.port

    async def start(self) -> int:
        await self._server.start()
        return self._server.port

    async def aclose(self) -> None:
        tasks = [t for streams in self._streams.values() for t in streams.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.aclose()

    async def _handle(self, conn: ControlConnection, msg: dict) -> dict | None:
        kind = msg["type"]
        hid = msg.get("hid")
        if isinstance(hid, bool) or not isinstance(hid, int):
            raise errors.FrameError(f"a {kind!r:.20} message needs an int 'hid', got {hid!r:.50}")
        streams = self._streams.setdefault(conn, {})
        if kind == "prefill":
            if hid in streams:
                raise errors.FrameError(f"hid {hid} is already handing off on this connection")
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
            segment = None if msg.get("segment") is None else open_segment(msg["segment"], len(want), fmt.nbytes)
            streams[hid] = asyncio.create_task(self._stream(conn, hid, token_ids, want, fmt, segment),
                                               name=f"afkv-prefill {hid}")
            return None
        if kind == "cancel":
            task = streams.get(hid)
            if task is not None:
                task.cancel()
            return None
        raise errors.FrameError(f"prefill node: unknown message type {kind!r}")

    async def _stream(self, conn: ControlConnection, hid: int, token_ids: list, want: dict, fmt: BlockFormat,
                      segment) -> None:
        """`segment`: the decode node's row slots (one per block asked for, in table order), or
        None: rows go in the frames."""
        slot_of = {i: k for k, i in enumerate(sorted(want))}
        try:
            async for batch in self.engine.export_prefill(token_ids, want, fmt):
                for frame in blocks_to_wire(hid, batch.indices, batch.hashes, batch.rows, segment,
                                            [slot_of[i] for i in batch.indices]):
                    await conn.send(frame)
            await conn.send({"type": "prefill_done", "hid": hid})
        except asyncio.CancelledError:
            raise
        except errors.TransportError as exc:
            log.info("decode node of hand-off %d is gone: %s", hid, exc)
        except errors.AfkvError as exc:
            await self._fail(conn, hid, exc)
        except Exception as exc:  # a bug: still end the decode node's transfer, never leave it waiting
            log.exception("hand-off %d failed", hid)
            await self._fail(conn, hid, errors.RequestFailedError(
                f"hand-off {hid} failed on the prefill node: {type(exc).__name__}: {exc}"))
        finally:
            streams = self._streams.get(conn)
            if streams is not None and streams.get(hid) is asyncio.current_task():
                del streams[hid]
                if not streams:
                    del self._streams[conn]

    async def _fail(self, conn: ControlConnection, hid: int, exc: errors.AfkvError) -> None:
        try:
            await conn.send({"type": "prefill_failed", "hid": hid, "error": errors.error_to_wire(exc)})
        except errors.TransportError:
            log.info("decode node of hand-off %d is gone; its error was: %s", hid, exc)


def _want_from_wire(wire: object) -> dict[int, bytes]:
    try:
        want = {int(i): bytes(h) for i, h in wire}
    except (TypeError, ValueError) as exc:
        raise errors.FrameError(f"a prefill message needs 'want' as [[index, hash], ...]: {exc}") from exc
    if not want or any(len(h) != 16 for h in want.values()):
        raise errors.FrameError("a prefill message needs at least one [index, 16-byte hash] in 'want'")
    return want
