"""Block file I/O of the disk tier, run on I/O threads.

    PosixFileIO    os.write / readinto (CPU machines; the default)
    KvikioFileIO   kvikio.CuFile (GPUDirect Storage where present, else kvikio's POSIX
                   compat mode); only when CUDA is available, since kvikio's file I/O needs
                   libcuda
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch


class FileIO(Protocol):
    name: str

    def write(self, path: Path, header: bytes, payload: np.ndarray) -> None:
        """Create `path` (mode 0600, truncated) holding header then payload."""

    def read_into(self, path: Path, offset: int, out: np.ndarray) -> int:
        """Read up to out.nbytes bytes at `offset` into out -> bytes read."""


class PosixFileIO:
    name = "posix"

    def write(self, path: Path, header: bytes, payload: np.ndarray) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for part in (memoryview(header), memoryview(payload).cast("B")):
                while part:
                    part = part[os.write(fd, part):]
        finally:
            os.close(fd)

    def read_into(self, path: Path, offset: int, out: np.ndarray) -> int:
        view = memoryview(out).cast("B")
        total = 0
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            while total < len(view):
                n = f.readinto(view[total:])
                if not n:
                    break
                total += n
        return total


class KvikioFileIO:
    name = "kvikio"

    def __init__(self) -> None:
        import kvikio

        self._kvikio = kvikio

    def write(self, path: Path, header: bytes, payload: np.ndarray) -> None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))  # the file's mode
        with self._kvikio.CuFile(path, "w") as f:
            f.write(np.frombuffer(header, dtype=np.uint8))
            f.write(payload, file_offset=len(header))

    def read_into(self, path: Path, offset: int, out: np.ndarray) -> int:
        with self._kvikio.CuFile(path, "r") as f:
            return f.read(out, file_offset=offset)


def default_fileio() -> FileIO:
    """kvikio when CUDA is available and kvikio imports; POSIX otherwise."""
    if torch.cuda.is_available() and importlib.util.find_spec("kvikio") is not None:
        return KvikioFileIO()
    return PosixFileIO()  # kvikio is optional (the `gpu` extra)
