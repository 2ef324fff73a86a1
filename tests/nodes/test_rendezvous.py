"""The rendezvous is authenticated and binds only the deployment's address: a process without
the token can neither read nor plant entries, and cannot pose as a node to a client."""

import asyncio
import socket
import threading

import pytest

import afkv
from afkv import SamplingParams
from afkv.errors import AuthError, PeerLostError
from afkv.nodes.rendezvous import RendezvousClient, RendezvousServer, lookup, open_store
from afkv.serve.launch import Deployment
from afkv.transport.control import ControlClient, encode_frame
from tests.nodes.test_disaggregated import _write_config

TOKEN = "s3cret-token"


@pytest.fixture
def server():
    with RendezvousServer("127.0.0.1", 0, TOKEN) as srv:
        srv.set("afkv/attention/0", "127.0.0.1:1234")
        yield srv


@pytest.mark.parametrize("token", [None, "wrong"])
def test_no_read_no_write_without_the_token(server, token):
    intruder = RendezvousClient("127.0.0.1", server.port, token, timeout_s=5.0)
    with pytest.raises(AuthError):
        intruder.set("afkv/attention/0", "127.0.0.1:6666")
    with pytest.raises(AuthError):
        intruder.get("afkv/attention/0")
    with pytest.raises(AuthError):
        intruder.delete_key("afkv/attention/0")
    assert server.get("afkv/attention/0") == b"127.0.0.1:1234"
    friend = RendezvousClient("127.0.0.1", server.port, TOKEN, timeout_s=5.0)
    friend.set("afkv/expert/0", "127.0.0.1:99")
    assert lookup(friend, "expert", 1, 5.0) == [("127.0.0.1", 99)]


def test_a_raw_peer_skipping_the_handshake_plants_nothing(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(encode_frame({"type": "set", "key": "afkv/attention/0", "value": b"127.0.0.1:6666"}))
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):  # read until the server closes (challenge, then its refusal)
            pass
    assert server.get("afkv/attention/0") == b"127.0.0.1:1234"


def test_binds_the_given_address_only(server):
    # 127.0.0.2 reaches a socket bound to every interface (TCPStore's), not one bound to 127.0.0.1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", server.port), timeout=5).close()


def test_nothing_listening_fails_at_once():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerLostError, match="nothing listens"):
        RendezvousClient("127.0.0.1", port, TOKEN, timeout_s=60.0).get("afkv/attention_nodes", 0.0)


async def test_a_fake_server_never_learns_the_token():
    """Mutual authentication: a listener without the token cannot pass as a node, and what a
    client sends it does not contain the token."""
    received = bytearray()

    async def fake(reader, writer):
        from afkv.transport.control import write_frame

        await write_frame(writer, {"type": "challenge", "nonce": bytes(32)})
        received.extend(await reader.read(65536))
        await write_frame(writer, {"type": "welcome", "proof": b"\0" * 32})
        await reader.read()
        writer.close()

    server = await asyncio.start_server(fake, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(AuthError, match="did not prove"):
            async with asyncio.timeout(10):
                await ControlClient.connect("127.0.0.1", port, token=TOKEN, role="client", node_id="victim")
        with pytest.raises(AuthError, match="did not prove"):
            await asyncio.to_thread(RendezvousClient("127.0.0.1", port, TOKEN, timeout_s=5.0).get, "k", 0.0)
    assert received and TOKEN.encode() not in bytes(received)


def test_waits_are_bounded_and_concurrent(server):
    friend = RendezvousClient("127.0.0.1", server.port, TOKEN, timeout_s=5.0)
    with pytest.raises(PeerLostError, match="not set"):
        friend.wait(["afkv/expert/7"], 0.2)
    got = []
    waiter = threading.Thread(target=lambda: got.append(friend.get("afkv/expert/8", 30.0)))
    waiter.start()
    friend.set("afkv/expert/8", "x")  # a second connection while the first one waits
    waiter.join(timeout=30)
    assert got == [b"x"]


@pytest.mark.parametrize("configured", [True, False], ids=["token-in-config", "token-made-up"])
async def test_store_poisoning_fails_against_a_deployment(tiny_dir, tmp_path, configured):
    """A process with no credentials tries to overwrite the attention node's address and to
    stop an expert node; the victim's attached client keeps reaching the real node."""
    path = _write_config(tmp_path, 1, 1, extra=f'token = "{TOKEN}"' if configured else "")
    with Deployment(path, tiny_dir["mixtral"]) as dep:
        assert dep.token and (dep.token == TOKEN) == configured
        host, port = dep.address.rsplit(":", 1)
        intruder = open_store(host, int(port), False, timeout_s=5.0)
        with pytest.raises(AuthError):
            await asyncio.to_thread(intruder.set, "afkv/attention/0", "127.0.0.1:1")
        with pytest.raises(AuthError):
            await asyncio.to_thread(intruder.get, "afkv/expert/0")
        [(eh, ep)] = lookup(dep._store, "expert", 1, 5.0)
        with pytest.raises(AuthError):
            await ControlClient.connect(eh, ep, role="attention", node_id="intruder")
        with pytest.raises(AuthError):
            await afkv.attach(dep.address, token="not-" + dep.token)
        async with await afkv.attach(dep.address, token=dep.token) as engine:
            done = await engine.complete([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
            assert len(done.token_ids) == 4
        assert all(p.poll() is None for p in dep.procs.values())  # nobody was stopped
