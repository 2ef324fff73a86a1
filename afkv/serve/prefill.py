"""PrefillServer: a prefill node's Engine serving KV hand-offs to decode nodes.

The protocol, checks and faults are afkv.nodes.handoff's (its module docstring). Per message:

    prefill   start a stream task: Engine.export_prefill over the prompt, its worker writing
              the rows straight into the decode node's device segment (CUDA IPC, when this
              process is on the same GPU) or shared-memory segment (when this host has it);
              else the rows it yields go in the kv_blocks messages; then prefill_done (or
              prefill_failed with the error, which keeps its class)
    cancel    cancel that stream: the engine aborts the prefill and frees its blocks

A decode node that goes away takes its streams with it (their sends fail; the engine aborts).
"""

from __future__ import annotations

import asyncio

import torch

from afkv import errors
from afkv.engine.engine import Engine
from afkv.kv.formats import FORMAT_NAMES, BlockFormat, make_format
from afkv.nodes.handoff import MAX_FRAME_BYTES, blocks_to_wire, open_device_segment, open_segment
from afkv.serve.streams import StreamServer
from afkv.transport.control import ControlConnection, ControlLimits


HEARTBEAT_INTERVAL_S = 1.0


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
        self.carriers = {"device": 0, "segment": 0, "frames": 0}  # hand-offs started per carrier

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
            into, carrier = await self._open_carrier(msg, len(want), fmt)
            self._start(conn, hid, lambda: self._hand_off(conn, hid, token_ids, want, fmt, into, carrier),
                        f"afkv-prefill {hid}")
            return {"type": "ack", "carrier": carrier}
        if kind == "cancel":
            self._cancel(conn, hid)
            return None
        raise errors.FrameError(f"prefill node: unknown message type {kind!r}")

    async def _open_carrier(self, msg: dict, num_rows: int, fmt: BlockFormat) -> tuple[torch.Tensor | None, str]:
        """The first of the decode node's device segment, its shared-memory segment, the frames,
        that this process can open (afkv.nodes.handoff) -> (its rows or None, its name)."""
        device = self.engine.kv_manager.kv.device
        if msg.get("device_segment") is not None:
            into = await asyncio.to_thread(open_device_segment, msg["device_segment"], num_rows, fmt.nbytes, device)
            if into is not None:
                return into, "device"
        if msg.get("segment") is not None:
            into = open_segment(msg["segment"], num_rows, fmt.nbytes)
            if into is not None:
                return into, "segment"
        return None, "frames"

    async def _hand_off(self, conn: ControlConnection, hid: int, token_ids: list, want: dict, fmt: BlockFormat,
                        into: torch.Tensor | None, carrier: str) -> None:
        """`into`: the decode node's row slots (one per block asked for, in table order) that
        `carrier` names, or None: rows go in the frames."""
        self.carriers[carrier] += 1
        async for batch in self.engine.export_prefill(token_ids, want, fmt, into):
            for frame in blocks_to_wire(hid, batch.indices, batch.hashes, batch.rows, carrier):
                await conn.send(frame)
        await conn.send({"type": "prefill_done", "hid": hid})


def _want_from_wire(wire: object) -> dict[int, bytes]:
    try:
        want = {int(i): bytes(h) for i, h in wire}
    except (TypeError, ValueError) as exc:
        raise errors.FrameError(f"a prefill message needs 'want' as [[index, hash], ...]: {exc}") from exc
    if not want or any(len(h) != 16 for h in want.values()):
        raise errors.FrameError("a prefill message needs at least one [index, 16-byte hash] in 'want'")
    return want
