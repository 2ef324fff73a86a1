"""Control plane: framing, handshake/auth, request/reply, heartbeats, lifecycle.
Loopback only; every wait is bounded by asyncio.timeout."""

from __future__ import annotations

import asyncio
import logging

import msgpack
import pytest
import uvloop

from afkv.errors import AuthError, ConfigError, FrameError, FrameTooLargeError, PeerLostError, TransportError
from afkv.transport.control import (
    HEADER,
    MAGIC,
    SCHEMA_VERSION,
    ConnState,
    ControlClient,
    ControlConnection,
    ControlLimits,
    ControlServer,
    ServerState,
    decode_payload,
    encode_frame,
    make_hello,
    read_frame,
    write_frame,
)

BOUND_S = 5.0  # no single test step may take longer than this
SMALL = ControlLimits(max_frame_bytes=4096, handshake_timeout_s=0.5, send_timeout_s=1.0)


async def echo(conn: ControlConnection, msg: dict) -> dict:
    return {"type": "echo", "body": msg, "from": conn.peer.node_id}


def frame_of(payload: bytes, *, magic: bytes = MAGIC, version: int = SCHEMA_VERSION) -> bytes:
    return HEADER.pack(magic, version, len(payload)) + payload


def fed_reader(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def raw_session(port: int, token: str | None = None, node_id: str = "raw"):
    """A hand-driven peer past the handshake."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    challenge = await read_frame(reader, timeout_s=BOUND_S)
    hello, _ = make_hello(challenge, token, "test", node_id, "server")
    await write_frame(writer, hello)
    assert (await read_frame(reader, timeout_s=BOUND_S))["type"] == "welcome"
    return reader, writer


async def frames_until_closed(reader: asyncio.StreamReader) -> list[dict]:
    """Every frame the peer sends until it closes (EOF or reset)."""
    frames = []
    try:
        while (msg := await read_frame(reader, timeout_s=BOUND_S)) is not None:
            frames.append(msg)
    except PeerLostError as exc:
        assert "broken" in str(exc), exc  # a reset is fine; a timeout is a hang
    return frames


# ---------------------------------------------------------------- frames


async def test_frame_round_trip():
    msg = {"type": "step", "step": 7, "ids": [1, 2, 3], "blob": b"\x00\xff", "nested": {"a": None, "b": 1.5}}
    frame = encode_frame(msg)
    assert frame[:4] == MAGIC and HEADER.unpack(frame[: HEADER.size])[2] == len(frame) - HEADER.size
    assert await read_frame(fed_reader(frame + frame)) == msg
    assert decode_payload(frame[HEADER.size :]) == msg


async def test_read_frame_end_of_stream():
    assert await read_frame(fed_reader(b"")) is None
    with pytest.raises(PeerLostError, match="inside a frame"):
        await read_frame(fed_reader(MAGIC[:2]))
    with pytest.raises(PeerLostError, match="inside a frame"):
        await read_frame(fed_reader(encode_frame({"type": "x", "pad": "y" * 50})[:-5]))
    with pytest.raises(PeerLostError, match="within 0.05 s"):
        await read_frame(fed_reader(b"", eof=False), timeout_s=0.05)


@pytest.mark.parametrize(
    "data, error, match",
    [
        (frame_of(msgpack.packb({"type": "x"}), magic=b"HTTP"), FrameError, "magic"),
        (frame_of(msgpack.packb({"type": "x"}), version=SCHEMA_VERSION + 1), FrameError, "schema version"),
        (frame_of(b"\xc1\xc1\xc1"), FrameError, "undecodable"),
        (frame_of(b""), FrameError, "undecodable"),
        (frame_of(msgpack.packb({"type": "x"}) + b"\x01"), FrameError, "undecodable"),  # trailing bytes
        (frame_of(msgpack.packb([1, 2, 3])), FrameError, "must be a map"),
        (frame_of(msgpack.packb({"kind": "x"})), FrameError, "'type'"),
        (frame_of(msgpack.packb({"type": 3})), FrameError, "'type'"),
        (frame_of(msgpack.packb({1: "x"})), FrameError, "undecodable"),  # non-str map key
        (frame_of(msgpack.packb({"type": msgpack.ExtType(5, b"ab")})), FrameError, "undecodable"),
        (frame_of(msgpack.packb({"type": "x", "t": msgpack.Timestamp(1, 0)})), FrameError, "undecodable"),
        (frame_of(b"\x91" * 5000 + b"\x01"), FrameError, "undecodable"),  # nested too deep
    ],
)
async def test_read_frame_rejects(data, error, match):
    with pytest.raises(error, match=match):
        await read_frame(fed_reader(data), timeout_s=BOUND_S)


async def test_oversize_refused_before_reading_payload():
    # Only the header is there and the stream stays open: a reader that tried to
    # read the payload would time out instead.
    reader = fed_reader(HEADER.pack(MAGIC, SCHEMA_VERSION, 1025), eof=False)
    with pytest.raises(FrameTooLargeError, match="1025"):
        await read_frame(reader, max_bytes=1024, timeout_s=BOUND_S)
    frame = encode_frame({"type": "x", "pad": "y" * 2000})
    with pytest.raises(FrameTooLargeError):
        await read_frame(fed_reader(frame), max_bytes=1024)
    assert await read_frame(fed_reader(frame), max_bytes=len(frame)) is not None


def test_encode_frame_rejects():
    with pytest.raises(FrameError, match="map"):
        encode_frame(["type", "x"])  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="'type'"):
        encode_frame({"kind": "x"})
    with pytest.raises(FrameError, match="cannot encode"):
        encode_frame({"type": "x", "value": object()})
    with pytest.raises(FrameTooLargeError):
        encode_frame({"type": "x", "pad": b"y" * 100}, max_bytes=64)


def test_limits_validated():
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        ControlLimits(max_frame_bytes=0)
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        ControlLimits(max_frame_bytes=2**32)
    with pytest.raises(ConfigError, match="send_timeout_s"):
        ControlLimits(send_timeout_s=-1.0)


# ---------------------------------------------------------------- request / reply


async def test_request_reply_round_trip():
    seen = []

    async def handler(conn, msg):
        seen.append((conn.peer.role, conn.peer.node_id, msg))
        return {"type": "registered", "slot": 3}

    async with asyncio.timeout(BOUND_S), ControlServer(handler) as srv:
        assert srv.state is ServerState.SERVING
        async with await ControlClient.connect("127.0.0.1", srv.port, role="attention", node_id="a0") as client:
            reply = await client.request({"type": "register", "gpus": [0, 1]}, timeout_s=BOUND_S)
            assert reply == {"type": "registered", "slot": 3}
            assert seen == [("attention", "a0", {"type": "register", "gpus": [0, 1]})]
            assert [conn.peer.node_id for conn in srv.peers()] == ["a0"]
            assert client._conn._pending == {}


async def test_concurrent_requests_get_their_own_replies():
    async def handler(conn, msg):
        await asyncio.sleep(0.001 * (msg["n"] % 3))
        return {"type": "square", "n": msg["n"] * msg["n"]}

    async with asyncio.timeout(BOUND_S), ControlServer(handler) as srv:
        clients = [
            await ControlClient.connect("127.0.0.1", srv.port, role="expert", node_id=f"e{i}") for i in range(3)
        ]
        requests = [c.request({"type": "square", "n": n}, timeout_s=BOUND_S) for n in range(40) for c in clients]
        replies = await asyncio.gather(*requests)
        assert [r["n"] for r in replies] == [n * n for n in range(40) for _ in clients]
        for client in clients:
            assert client._conn._pending == {}
            await client.aclose()


async def test_replies_matched_by_id_when_out_of_order():
    async def reversing_server(reader, writer):
        await write_frame(writer, {"type": "challenge", "nonce": bytes(32)})
        await read_frame(reader)  # hello
        await write_frame(writer, {"type": "welcome"})
        requests = [await read_frame(reader) for _ in range(3)]
        for req in reversed(requests):
            await write_frame(writer, {"type": "reply", "n": req["n"], "re": req["id"]})
        await write_frame(writer, {"type": "reply", "re": 999})  # unknown id: dropped
        await read_frame(reader)  # until the client leaves
        writer.close()

    server = await asyncio.start_server(reversing_server, "127.0.0.1", 0)
    async with asyncio.timeout(BOUND_S), server:
        port = server.sockets[0].getsockname()[1]
        async with await ControlClient.connect("127.0.0.1", port, role="a", node_id="a0") as client:
            requests = [client.request({"type": "q", "n": n}, timeout_s=BOUND_S) for n in range(3)]
            replies = await asyncio.gather(*requests)
            assert [r["n"] for r in replies] == [0, 1, 2]


async def test_notifications_ack_and_handler_errors():
    got = asyncio.Queue()

    async def handler(conn, msg):
        if msg["type"] == "boom":
            raise ValueError("no such expert")
        await got.put(msg)
        return None

    async with asyncio.timeout(BOUND_S), ControlServer(handler) as srv:
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0") as client:
            await client.send({"type": "step", "step": 1})
            assert await got.get() == {"type": "step", "step": 1}
            assert await client.request({"type": "placement"}, timeout_s=BOUND_S) == {"type": "ack"}
            with pytest.raises(TransportError, match="no such expert"):
                await client.request({"type": "boom"}, timeout_s=BOUND_S)
            assert await client.request({"type": "placement"}, timeout_s=BOUND_S) == {"type": "ack"}
            for reserved in ("id", "re"):
                with pytest.raises(FrameError, match="reserved"):
                    await client.send({"type": "step", reserved: 1})


async def test_request_timeout_names_the_peer():
    release = asyncio.Event()

    async def handler(conn, msg):
        if msg["type"] == "slow":
            await release.wait()
        return {"type": "done"}

    async with asyncio.timeout(BOUND_S), ControlServer(handler) as srv:
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0") as client:
            with pytest.raises(PeerLostError, match=r"server .* did not answer 'slow' within 0.1 s"):
                await client.request({"type": "slow"}, timeout_s=0.1)
            assert client._conn._pending == {}
            release.set()  # its late reply is dropped; the connection stays usable
            assert await client.request({"type": "fast"}, timeout_s=BOUND_S) == {"type": "done"}


async def test_cancelled_request_propagates_and_leaves_no_pending():
    async def handler(conn, msg):
        await asyncio.Event().wait()

    async with asyncio.timeout(BOUND_S), ControlServer(handler) as srv:
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0") as client:
            task = asyncio.create_task(client.request({"type": "never"}, timeout_s=BOUND_S))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert client._conn._pending == {}


async def test_server_can_request_a_client():
    async def client_handler(conn, msg):
        return {"type": "pong", "seq": msg["seq"]}

    async with asyncio.timeout(BOUND_S), ControlServer(echo) as srv:
        async with await ControlClient.connect(
            "127.0.0.1", srv.port, role="expert", node_id="e0", handler=client_handler
        ):
            [conn] = srv.peers()
            assert await conn.request({"type": "ping", "seq": 5}, timeout_s=BOUND_S) == {"type": "pong", "seq": 5}
        async with await ControlClient.connect("127.0.0.1", srv.port, role="expert", node_id="e1"):
            [conn] = srv.peers()
            with pytest.raises(TransportError, match="no handler"):
                await conn.request({"type": "ping"}, timeout_s=BOUND_S)


# ---------------------------------------------------------------- malformed peers


BAD_FRAMES = {
    "bad_magic": frame_of(msgpack.packb({"type": "x"}), magic=b"GET "),
    "bad_version": frame_of(msgpack.packb({"type": "x"}), version=SCHEMA_VERSION + 1),
    "garbage_msgpack": frame_of(b"\xc1\xc1\xc1"),
    "non_dict": frame_of(msgpack.packb(["type", "x"])),
    "missing_type": frame_of(msgpack.packb({"kind": "x"})),
    "ext_type": frame_of(msgpack.packb({"type": "x", "e": msgpack.ExtType(1, b"\x00")})),
    "oversize_header": HEADER.pack(MAGIC, SCHEMA_VERSION, SMALL.max_frame_bytes + 1),  # no payload follows
}


@pytest.mark.parametrize("kind", sorted(BAD_FRAMES))
async def test_malformed_frame_closes_only_that_peer(kind, caplog):
    caplog.set_level(logging.WARNING, logger="afkv.transport.control")
    async with asyncio.timeout(BOUND_S), ControlServer(echo, limits=SMALL) as srv:
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="good", limits=SMALL) as good:
            reader, writer = await raw_session(srv.port)
            assert {c.peer.node_id for c in srv.peers()} == {"good", "raw"}
            writer.write(BAD_FRAMES[kind])
            frames = await frames_until_closed(reader)
            assert frames[0]["type"] == "error" and frames[0]["code"] == "bad_frame", frames
            writer.close()
            assert "closing the control connection" in caplog.text
            while len(srv.peers()) > 1:
                await asyncio.sleep(0.01)
            assert [c.peer.node_id for c in srv.peers()] == ["good"]
            # The server and the other connection carry on.
            assert (await good.request({"type": "still_there"}, timeout_s=BOUND_S))["type"] == "echo"
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="later") as later:
            assert (await later.request({"type": "hi"}, timeout_s=BOUND_S))["from"] == "later"


@pytest.mark.parametrize(
    "first_bytes, code",
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad_frame"),
        (encode_frame({"type": "register"}), "protocol"),
        (encode_frame({"type": "hello", "role": 1, "node_id": "x"}), "protocol"),
        (HEADER.pack(MAGIC, SCHEMA_VERSION, 10**6), "bad_frame"),  # above the hello limit
    ],
)
async def test_bad_handshake_is_refused(first_bytes, code):
    async with asyncio.timeout(BOUND_S), ControlServer(echo) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(first_bytes)
        frames = await frames_until_closed(reader)
        assert frames[0]["type"] == "challenge"
        assert [f.get("code") for f in frames[1:]] == [code]
        writer.close()
        assert srv.peers() == []
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0") as client:
            assert (await client.request({"type": "hi"}, timeout_s=BOUND_S))["type"] == "echo"


async def test_silent_connection_dropped_after_handshake_timeout():
    async with asyncio.timeout(BOUND_S), ControlServer(echo, limits=SMALL) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        frames = await frames_until_closed(reader)  # closed after 0.5 s, without a hello
        assert [f["type"] for f in frames] == ["challenge"]
        writer.close()


async def test_truncated_frame_ends_that_peer():
    async with asyncio.timeout(BOUND_S), ControlServer(echo) as srv:
        reader, writer = await raw_session(srv.port)
        writer.write(encode_frame({"type": "x", "pad": "y" * 100})[:-10])
        writer.write_eof()
        assert await frames_until_closed(reader) == []
        writer.close()
        while srv.peers():
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------- auth


async def test_token_required_when_set():
    async with asyncio.timeout(BOUND_S), ControlServer(echo, token="s3cret") as srv:
        for token in ("wrong", None, ""):
            with pytest.raises(AuthError, match="wrong or missing token"):
                await ControlClient.connect("127.0.0.1", srv.port, token=token, role="a", node_id="intruder")
        assert srv.peers() == []
        async with await ControlClient.connect(
            "127.0.0.1", srv.port, token="s3cret", role="a", node_id="a0"
        ) as client:
            assert (await client.request({"type": "hi"}, timeout_s=BOUND_S))["from"] == "a0"


async def test_duplicate_node_id_refused():
    async with asyncio.timeout(BOUND_S), ControlServer(echo) as srv:
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0"):
            with pytest.raises(TransportError, match="already connected") as info:
                await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0")
            assert not isinstance(info.value, AuthError)
        while srv.peers():
            await asyncio.sleep(0.01)
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0"):
            pass


async def test_on_lost_names_each_peer_that_left_but_not_at_server_close():
    lost: list[str] = []
    async with asyncio.timeout(BOUND_S):
        srv = ControlServer(echo, on_lost=lost.append)
        await srv.start()
        a = await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0")
        b = await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a1")
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)  # never says hello
        writer.close()
        await a.aclose()
        while not lost:
            await asyncio.sleep(0.01)
        assert lost == ["a0"]  # told once, after its connection ended; the silent socket is nobody
        await srv.aclose()  # b's connection ends with the server: not a lost peer
        await b.aclose()
        assert lost == ["a0"]


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "10.1.2.3", "node7.cluster"])
def test_non_loopback_bind_needs_token(host):
    with pytest.raises(ConfigError, match="binding elsewhere requires a shared token"):
        ControlServer(echo, host=host)
    ControlServer(echo, host=host, token="s3cret")  # constructed only: never bound in tests


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_bind_without_token(host):
    assert ControlServer(echo, host=host).state is ServerState.CREATED


def test_empty_token_refused():
    with pytest.raises(ConfigError, match="token"):
        ControlServer(echo, token="")


async def test_unreachable_server():
    async with asyncio.timeout(BOUND_S), ControlServer(echo) as srv:
        port = srv.port
    with pytest.raises(PeerLostError, match="cannot reach"):
        await ControlClient.connect("127.0.0.1", port, role="a", node_id="a0", timeout_s=1.0)


# ---------------------------------------------------------------- heartbeats


async def test_idle_peer_dropped_heartbeating_peer_kept():
    """idle_timeout_s: a peer that sends nothing (heartbeats count) is lost; both sides can
    send heartbeats (the server's keep its idle clients' deadlines from firing)."""
    limits = ControlLimits(idle_timeout_s=3.0, heartbeat_interval_s=0.05)
    async with asyncio.timeout(BOUND_S), ControlServer(echo, limits=limits) as srv:
        unsolicited = []

        async def client_handler(conn, msg):
            unsolicited.append(msg)

        beating = await ControlClient.connect("127.0.0.1", srv.port, role="expert", node_id="beating")
        silent = await ControlClient.connect(
            "127.0.0.1", srv.port, role="expert", node_id="silent", handler=client_handler,
            limits=ControlLimits(idle_timeout_s=3.0))  # hears the server's heartbeats: stays open on its side
        beating.start_heartbeat(0.05)
        with pytest.raises(TransportError, match="already running"):
            beating.start_heartbeat(0.05)
        await silent.wait_closed()  # the server dropped it
        assert isinstance(silent.closed_reason, PeerLostError)
        assert [c.peer.node_id for c in srv.peers()] == ["beating"]
        assert beating.state is ConnState.OPEN
        assert unsolicited == []  # heartbeats never reach a handler
        await beating.aclose()


async def test_slow_frame_dropped():
    """frame_timeout_s: a peer that starts a frame and feeds it slowly is lost."""
    limits = ControlLimits(frame_timeout_s=0.5)
    async with asyncio.timeout(BOUND_S), ControlServer(echo, limits=limits) as srv:
        reader, writer = await raw_session(srv.port)
        frame = encode_frame({"type": "x", "pad": "y" * 100})
        writer.write(frame[:10])  # and nothing more
        assert [f.get("code") for f in await frames_until_closed(reader)] == []
        writer.close()
        assert srv.peers() == []


async def test_message_over_its_type_limit_is_refused_alone():
    limits = ControlLimits(message_bytes={"big": 4000}, default_message_bytes=200, max_inbound_bytes=5000)
    async with asyncio.timeout(BOUND_S), ControlServer(echo, limits=limits) as srv:
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0") as client:
            assert (await client.request({"type": "big", "pad": "y" * 3000}, timeout_s=BOUND_S))["type"] == "echo"
            with pytest.raises(FrameTooLargeError, match="'small' message may hold 200 bytes"):
                await client.request({"type": "small", "pad": "y" * 300}, timeout_s=BOUND_S)
            assert (await client.request({"type": "small"}, timeout_s=BOUND_S))["type"] == "echo"
        # above the inbound limit: closed before the payload is read
        reader, writer = await raw_session(srv.port, node_id="raw2")
        writer.write(HEADER.pack(MAGIC, SCHEMA_VERSION, 6000))
        assert [f.get("code") for f in await frames_until_closed(reader)] == ["bad_frame"]
        writer.close()


async def test_handler_failures_are_logged_once_per_peer_and_kind(caplog):
    async def failing(conn, msg):
        raise FrameError("malformed")

    async with asyncio.timeout(BOUND_S), ControlServer(failing) as srv:
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0") as client:
            with caplog.at_level(logging.WARNING):
                for _ in range(50):
                    with pytest.raises(FrameError, match="malformed"):
                        await client.request({"type": "ffn"}, timeout_s=BOUND_S)
    assert len([r for r in caplog.records if "handler failed" in r.getMessage()]) == 1


# ---------------------------------------------------------------- lifecycle


async def test_server_close_while_clients_wait():
    entered = asyncio.Event()

    async def handler(conn, msg):
        entered.set()
        await asyncio.Event().wait()  # never answers

    async with asyncio.timeout(BOUND_S):
        srv = ControlServer(handler)
        await srv.start()
        client = await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0")
        client.start_heartbeat(0.05)
        waiting = asyncio.create_task(client.request({"type": "step"}, timeout_s=60.0))
        await entered.wait()
        await srv.aclose()
        assert srv.state is ServerState.CLOSED and srv.peers() == [] and srv._tasks == set()
        with pytest.raises(PeerLostError, match="closed the connection"):
            await waiting
        assert client.state is ConnState.CLOSED
        with pytest.raises(PeerLostError):
            await client.request({"type": "step"}, timeout_s=60.0)
        await client.aclose()
        await srv.aclose()  # idempotent
        with pytest.raises(TransportError, match="closed"):
            await srv.start()


async def test_client_close_fails_its_pending_requests():
    async def handler(conn, msg):
        await asyncio.Event().wait()

    async with asyncio.timeout(BOUND_S), ControlServer(handler) as srv:
        client = await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0")
        waiting = asyncio.create_task(client.request({"type": "step"}, timeout_s=60.0))
        await asyncio.sleep(0.05)
        await client.aclose()
        with pytest.raises(TransportError, match="closed by this side"):
            await waiting
        with pytest.raises(TransportError, match="closed by this side"):
            await client.send({"type": "step"})
        await client.aclose()  # idempotent
        while srv.peers():
            await asyncio.sleep(0.01)


async def test_handler_can_close_its_connection():
    async def handler(conn, msg):
        await conn.aclose()

    async with asyncio.timeout(BOUND_S), ControlServer(handler) as srv:
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0") as client:
            with pytest.raises(PeerLostError, match="closed the connection"):
                await client.request({"type": "bye"}, timeout_s=BOUND_S)
        while srv.peers():
            await asyncio.sleep(0.01)


def test_under_uvloop():
    async def scenario():
        async with asyncio.timeout(BOUND_S), ControlServer(echo) as srv:
            client = await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0")
            requests = [client.request({"type": "q", "n": n}, timeout_s=BOUND_S) for n in range(20)]
            replies = await asyncio.gather(*requests)
            assert [r["body"]["n"] for r in replies] == list(range(20))
            reader, writer = await raw_session(srv.port)
            writer.write(BAD_FRAMES["bad_magic"])
            assert (await frames_until_closed(reader))[0]["code"] == "bad_frame"
            writer.close()
            await srv.aclose()
            with pytest.raises(PeerLostError):
                await client.request({"type": "q", "n": 0}, timeout_s=BOUND_S)
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_peer_leaving_still_has_its_last_messages_handled():
    handled = []
    release = asyncio.Event()

    async def handler(conn, msg):
        if msg["type"] == "slow":
            await release.wait()
        handled.append(msg["type"])

    async with asyncio.timeout(BOUND_S), ControlServer(handler) as srv:
        client = await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0")
        await client.send({"type": "slow"})
        await client.send({"type": "goodbye"})
        await client.aclose()
        while srv.peers():  # gone from peers() at once, though its handler is busy
            await asyncio.sleep(0.01)
        assert handled == []
        release.set()
        while len(handled) < 2:
            await asyncio.sleep(0.01)
        assert handled == ["slow", "goodbye"]


async def test_server_side_close_cancels_handler_and_fails_client_request():
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(conn, msg):
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with asyncio.timeout(BOUND_S), ControlServer(handler) as srv:
        async with await ControlClient.connect("127.0.0.1", srv.port, role="a", node_id="a0") as client:
            waiting = asyncio.create_task(client.request({"type": "step"}, timeout_s=60.0))
            await entered.wait()
            [conn] = srv.peers()
            await conn.aclose()  # e.g. the launcher dropping a dead peer
            assert cancelled.is_set() and conn.state is ConnState.CLOSED and srv.peers() == []
            with pytest.raises(PeerLostError, match="closed the connection"):
                await waiting
            assert client.state is ConnState.CLOSED


def test_nccl_unique_id_survives_text_round_trip():
    """NCCL ids hold NUL bytes: the hex text the store carries must keep all 128 of them."""
    from afkv.transport.nccl import _UniqueId

    raw = bytes([0, 1, 2, 0, 255] + [7] * 123)
    text = bytes(_UniqueId.from_buffer_copy(raw).internal).hex()
    assert bytes.fromhex(text) == raw
