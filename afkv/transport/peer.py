"""Peer: one end of a two-rank data-plane connection, and the one rule choosing its kind.

The fixed-buffer data plane (afkv.nodes.remote_ffn on an attention node, afkv.nodes.expert_plane
on an expert node) moves whole buffers through peers. Two implementations:

    NcclPeer  (afkv.transport.nccl)  NCCL point-to-point between two GPUs, enqueued on CUDA streams
    HostPeer  (afkv.transport.host)  a TCP connection through host memory (CPUs, or two
                                     processes on one GPU, which NCCL refuses)

`peer_kind(mine, theirs)` is the rule, called on both ends with the two ends' identities
(`gpu_identity`): NCCL when both ends are on GPUs and not on the same one, the host peer
otherwise. The rank 0 end (the attention node) makes the ids (`new_peer_id`), they travel
through the rendezvous, and both ends open their peer with `open_peer`.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import AbstractContextManager
from typing import Literal, Protocol

import torch

PeerKind = Literal["nccl", "host"]


class Peer(Protocol):
    """This process's end of a two-rank connection with one peer. Buffers are whole
    contiguous tensors; both ends call send/recv of matching sizes in the same order."""

    graph_safe: bool  # its calls can be captured in a CUDA graph (no host work per call)

    def send(self, t: torch.Tensor, stream) -> None:
        """Send t's bytes, ordered after the work already on `stream` (t stays alive until it passes)."""
        ...

    def recv(self, t: torch.Tensor, stream, timeout_s: float | None = None) -> None:
        """Fill t with the peer's next buffer, ordered on `stream`; a host peer waits at most
        `timeout_s` (its own timeout when None) before PeerLostError."""
        ...

    def group(self) -> AbstractContextManager:
        """Calls inside are issued together (NCCL group) or one by one."""
        ...

    def abort(self) -> None:
        """Give up the connection: pending calls return (used when the peer is lost)."""
        ...

    def close(self) -> None: ...


def gpu_identity(device: torch.device) -> str:
    """host + GPU UUID (index where torch gives none); "" off GPUs. Two ranks of one NCCL
    communicator must not share a GPU."""
    if device.type != "cuda":
        return ""
    props = torch.cuda.get_device_properties(device)
    return f"{socket.gethostname()}/{getattr(props, 'uuid', device.index)}"


def peer_kind(mine: str, theirs: str) -> PeerKind:
    """The peer between two ends of these `gpu_identity`s (symmetric)."""
    return "nccl" if mine and theirs and mine != theirs else "host"


def new_peer_id(kind: PeerKind, host: str) -> str:
    """A fresh id for rank 0 of a peer of `kind` (host peers listen on `host`)."""
    if kind == "nccl":
        from afkv.transport.nccl import new_unique_id

        return new_unique_id()
    from afkv.transport.host import new_host_id

    return new_host_id(host)


def open_peer(kind: PeerKind, unique_id: str, rank: int, device: torch.device, timeout_s: float) -> Peer:
    """Join the peer of `unique_id` as `rank`; blocks until the other end joins (NCCL), or at
    most timeout_s (host; also each host receive's limit)."""
    if kind == "nccl":
        from afkv.transport.nccl import NcclPeer

        return NcclPeer(unique_id, rank, device)
    from afkv.transport.host import HostPeer

    return HostPeer(unique_id, rank, device, timeout_s)


def abort_all(peers: list[Peer], timeout_s: float) -> bool:
    """Abort peers concurrently, one thread each (an NCCL abort frees device memory, which
    waits for every kernel on the device, including those of the communicators not yet
    aborted). -> whether all returned within timeout_s."""
    threads = [threading.Thread(target=p.abort, name="afkv-peer-abort", daemon=True) for p in peers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)
