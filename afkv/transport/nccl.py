"""GPU data plane: NCCL point-to-point through CuPy (`cupy.cuda.nccl`).

One two-rank communicator per (attention node, expert node) pair: rank 0 is the
attention node, rank 1 the expert node. The attention node makes the unique id and
publishes it in the rendezvous store; creating the communicator blocks until both ranks
join, so it runs on the worker thread (never the event loop), with the node's device
current. Sends and receives are enqueued on a dedicated CUDA stream and ordered with
compute by CUDA events: no host synchronisation. Tensors move as raw bytes.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch

from afkv.errors import TransportError


def nccl_module():
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        raise TransportError("the GPU data plane needs CuPy with NCCL: pip install 'afkv[gpu]'") from exc
    return nccl


def new_unique_id() -> str:
    return json.dumps(list(nccl_module().get_unique_id()))


class NcclPeer:
    """This process's end of a two-rank communicator with one peer."""

    def __init__(self, unique_id: str, rank: int, device: torch.device):
        nccl = nccl_module()
        import cupy

        self.device = device
        self.peer = 1 - rank
        with cupy.cuda.Device(device.index):
            comm_id = bytes(b & 0xFF for b in json.loads(unique_id))  # NCCL's 128-byte id
            self.comm = nccl.NcclCommunicator(2, comm_id, rank)
        self._u8 = getattr(nccl, "NCCL_UINT8", None) or nccl.NCCL_INT8
        self._nccl = nccl

    def send(self, t: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """Enqueue a send of t's bytes on `stream` (t must stay alive until the stream passes)."""
        assert t.is_contiguous() and t.device == self.device
        self.comm.send(t.data_ptr(), t.numel() * t.element_size(), self._u8, self.peer, stream.cuda_stream)

    def recv(self, t: torch.Tensor, stream: torch.cuda.Stream) -> None:
        assert t.is_contiguous() and t.device == self.device
        self.comm.recv(t.data_ptr(), t.numel() * t.element_size(), self._u8, self.peer, stream.cuda_stream)

    def abort(self) -> None:
        """Abort the communicator: its pending operations return (used when the peer is lost)."""
        self.comm.abort()

    @contextmanager
    def group(self):
        """NCCL group: the calls inside are issued together."""
        self._nccl.groupStart()
        try:
            yield
        finally:
            self._nccl.groupEnd()
