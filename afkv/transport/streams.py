"""Streams and events of one device: CUDA's, or host stand-ins with the same calls.

The fixed-buffer data plane (afkv.nodes.nccl_ffn, the expert node's step loop) orders its
sends, receives and compute with streams and events. On a CPU the same code runs with
host streams: torch work there is synchronous, so every wait is already satisfied, an
event only notes the time it was recorded (for timings), and the transport's calls do
their work when they are made (afkv.transport.host).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch


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
        return torch.cuda.Stream(self.device) if self.cuda else HostStream()

    def event(self, enable_timing: bool = False):
        return torch.cuda.Event(enable_timing=enable_timing) if self.cuda else HostEvent(enable_timing)

    def current(self):
        return torch.cuda.current_stream(self.device) if self.cuda else _HOST

    def use(self, stream):
        """Context: make `stream` current (CUDA); nothing to do on the host."""
        return torch.cuda.stream(stream) if self.cuda else nullcontext()
