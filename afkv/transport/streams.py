"""Streams and events of one device: CUDA's, or host stand-ins with the same calls.

The fixed-buffer data plane (afkv.nodes.remote_ffn, afkv.nodes.expert_plane) orders its
sends, receives and compute with streams and events. On a CPU the same code runs with
host streams: torch work there is synchronous, so every wait is already satisfied, an
event only notes the time it was recorded (for timings), and the transport's calls do
their work when they are made (afkv.transport.host).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext

import torch

log = logging.getLogger("afkv.streams")

_CUDA_STREAM_NON_BLOCKING = 1  # cudaStreamNonBlocking: no implicit sync with the legacy default stream
_KEPT: list[int] = []  # dedicated streams live as long as the process: captured graphs name them


def _create(device: torch.device) -> tuple[torch.cuda.Stream, int | None]:
    """A CUDA stream no other caller gets -> (stream, handle to destroy, None when pooled).

    torch.cuda.Stream() hands out the streams of a pool, 32 per device, round robin: two
    engines or expert links of one process can be given the same stream. NCCL sends and
    receives of different communicators queued on one stream can then wait on each other
    for ever (a send stuck behind a receive whose peer waits for that send). So the streams
    that carry NCCL work, and the streams graphs are captured on, are made here through
    CuPy (a GPU dependency of afkv); without CuPy a pooled stream is returned."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        import cupy

        with cupy.cuda.Device(index):
            handle = cupy.cuda.runtime.streamCreateWithFlags(_CUDA_STREAM_NON_BLOCKING)
    except (ImportError, AttributeError, RuntimeError) as exc:  # CuPy missing or too old; CUDARuntimeError
        log.warning("no stream of its own (%s): a stream from torch's pool is used, which may be shared", exc)
        return torch.cuda.Stream(index), None
    return torch.cuda.ExternalStream(handle, device=torch.device("cuda", index)), handle


def dedicated_stream(device: torch.device) -> torch.cuda.Stream:
    """A CUDA stream of `device` shared with no other caller, kept for the process's life."""
    stream, handle = _create(device)
    if handle is not None:
        _KEPT.append(handle)
    return stream


@contextmanager
def transient_stream(device: torch.device):
    """A CUDA stream shared with no other caller, destroyed on exit (work still queued on it
    completes first: CUDA frees a destroyed stream once it is idle)."""
    stream, handle = _create(device)
    try:
        yield stream
    finally:
        if handle is not None:
            import cupy

            cupy.cuda.runtime.streamDestroy(handle)


class HostEvent:
    def __init__(self, enable_timing: bool = False):
        self._t: float | None = None

    def record(self, stream=None) -> None:
        self._t = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        """Milliseconds from this event to `end`, as CUDA events report it."""
        return ((end._t or 0.0) - (self._t or 0.0)) * 1e3


class HostStream:
    cuda_stream = 0

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_HOST = HostStream()


class DeviceStreams:
    """Stream and event factory of `device` (CUDA streams on GPUs, host stand-ins elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def stream(self):
        """A stream of its own (never one of torch's pooled streams, see dedicated_stream)."""
        return dedicated_stream(self.device) if self.cuda else HostStream()

    def event(self, enable_timing: bool = False):
        return torch.cuda.Event(enable_timing=enable_timing) if self.cuda else HostEvent(enable_timing)

    def current(self):
        return torch.cuda.current_stream(self.device) if self.cuda else _HOST

    def use(self, stream):
        """Context: make `stream` current (CUDA); nothing to do on the host."""
        return torch.cuda.stream(stream) if self.cuda else nullcontext()
