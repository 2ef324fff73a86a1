"""Large page-locked host regions of exactly the size asked for.

torch's pinned allocator (`pin_memory=True`) rounds every request up to a power of two and keeps
freed regions cached: a 40 GiB stream store locks 64 GiB, and one of 72 GiB asks for 128 GiB,
all the memory of a 128 GiB host. A `PinnedRegion` is an anonymous mapping of exactly nbytes,
advised to transparent huge pages, whose pages torch's threads fault in (a parallel zero_:
first touch is the cost of pinning, one page fault per 4 KiB page otherwise) before CUDA
registers it (cudaHostRegister: non_blocking copies from it are DMA at the link's rate). On a
CPU-only device it is the same mapping, not registered. `close` unregisters it; the mapping goes
with the last tensor that views it.
"""

from __future__ import annotations

import mmap

import torch

from afkv.errors import TierError


class PinnedRegion:
    """uint8 [nbytes] host memory (`tensor`), page-locked and registered with CUDA when `cuda`.
    Owner of the registration: close() (idempotent) ends it; the caller makes sure no copy
    from or into the region is in flight then (a device synchronisation)."""

    def __init__(self, nbytes: int, cuda: bool):
        assert nbytes > 0
        self._mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._mapping.madvise(mmap.MADV_HUGEPAGE)
        self.tensor = torch.frombuffer(self._mapping, dtype=torch.uint8)  # [nbytes]
        self.tensor.zero_()  # every page faulted in, on torch's intra-op threads
        self.nbytes = nbytes
        self._registered = False
        if cuda:
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise TierError(f"cannot page-lock {nbytes} bytes of host memory (cudaHostRegister error "
                                f"{int(err)}): lower the host share (kv.stream_memory_mib)")
            self._registered = True

    def close(self) -> None:
        if self._registered:
            self._registered = False
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
