"""GPU data plane: NCCL point-to-point through CuPy (`cupy.cuda.nccl`).

One two-rank communicator per (attention node, expert node) pair: rank 0 is the
attention node, rank 1 the expert node. The attention node makes the unique id and
publishes it in the rendezvous store; creating the communicator blocks until both ranks
join, so it runs on the worker thread (never the event loop), with the node's device
current. Sends and receives are enqueued on a dedicated CUDA stream and ordered with
compute by CUDA events: no host synchronisation. Tensors move as raw bytes.
"""

from __future__ import annotations

import ctypes
import functools
from contextlib import contextmanager

import torch

from afkv.errors import TransportError


def nccl_module():
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        raise TransportError("the GPU data plane needs CuPy with NCCL: pip install 'afkv[gpu]'") from exc
    return nccl


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_ubyte * 128)]  # not c_char: its field reads stop at the first NUL


_NCCL_UINT8 = 1  # ncclDataType_t


@functools.cache
def _lib() -> ctypes.CDLL:
    """The NCCL library CuPy loaded, called through ctypes: every call releases the GIL, so the
    communicators of a lost peer can be aborted from several threads at once (CuPy's abort
    holds the GIL, and one abort can wait on another communicator's kernels)."""
    nccl_module()  # loads libnccl.so.2; dlopen by soname then returns that same library
    try:
        lib = ctypes.CDLL("libnccl.so.2")
    except OSError as exc:
        raise TransportError(f"libnccl.so.2 is not loadable through ctypes: {exc}") from exc
    vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    for name, args in (("ncclGetUniqueId", [ctypes.POINTER(_UniqueId)]),
                       ("ncclCommInitRank", [ctypes.POINTER(vp), i, _UniqueId, i]),
                       ("ncclSend", [vp, sz, i, i, vp, vp]), ("ncclRecv", [vp, sz, i, i, vp, vp]),
                       ("ncclCommAbort", [vp]), ("ncclCommDestroy", [vp]),
                       ("ncclGroupStart", []), ("ncclGroupEnd", []), ("ncclGetErrorString", [i])):
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_char_p if name == "ncclGetErrorString" else i
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise TransportError(f"{what} failed: NCCL error {status} ({_lib().ncclGetErrorString(status).decode()})")


def new_unique_id() -> str:
    uid = _UniqueId()
    _check(_lib().ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    return bytes(uid.internal).hex()


class NcclPeer:
    """This process's end of a two-rank communicator with one peer (afkv.transport.peer.Peer)."""

    graph_safe = True  # sends and receives are GPU work: a CUDA graph can capture them

    def __init__(self, unique_id: str, rank: int, device: torch.device):
        self.device = device
        self.peer = 1 - rank
        uid = _UniqueId.from_buffer_copy(bytes.fromhex(unique_id))
        self._comm = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(_lib().ncclCommInitRank(ctypes.byref(self._comm), 2, uid, rank), "ncclCommInitRank")

    def send(self, t: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """Enqueue a send of t's bytes on `stream` (t must stay alive until the stream passes)."""
        assert t.is_contiguous() and t.device == self.device
        _check(_lib().ncclSend(t.data_ptr(), t.numel() * t.element_size(), _NCCL_UINT8, self.peer, self._comm,
                               stream.cuda_stream), "ncclSend")

    def recv(self, t: torch.Tensor, stream: torch.cuda.Stream, timeout_s: float | None = None) -> None:
        """Enqueue a receive into t on `stream` (`timeout_s` does not apply: the host never
        waits here; a receive that never completes is ended by `abort`)."""
        assert t.is_contiguous() and t.device == self.device
        _check(_lib().ncclRecv(t.data_ptr(), t.numel() * t.element_size(), _NCCL_UINT8, self.peer, self._comm,
                               stream.cuda_stream), "ncclRecv")

    def abort(self) -> None:
        """Abort the communicator: its pending operations return (used when the peer is lost)."""
        comm, self._comm = self._comm, ctypes.c_void_p()
        if comm.value:
            _lib().ncclCommAbort(comm)

    def close(self) -> None:
        comm, self._comm = self._comm, ctypes.c_void_p()
        if comm.value:
            _lib().ncclCommDestroy(comm)

    @contextmanager
    def group(self):
        """NCCL group: the calls inside are issued together."""
        _check(_lib().ncclGroupStart(), "ncclGroupStart")
        try:
            yield
        finally:
            _check(_lib().ncclGroupEnd(), "ncclGroupEnd")

