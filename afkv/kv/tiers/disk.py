"""DiskTier: KV blocks in files of a private directory, one file per block, keyed by hash.

Directory (mode 0700, files 0600), claimed by one engine at a time: an flock on `lock`, and
on Linux an abstract Unix socket named after the directory's real path, which no removal and
re-creation of the directory releases (it goes with the process that holds it):

    <hash hex>.kvb     one block: a 64-byte header, then the block's bytes in the tier's format
    index.msgpack      {"version", "format" (digest), "entries": [[hash, crc32], ...] oldest first}
    lock               held (flock) while an engine uses the directory

Start-up refuses, with a TierError naming it, an entry of ours (`*.kvb`, `*.tmp`,
index.msgpack, lock) that is not a regular file: a directory, a FIFO (never opened: that
would block), a socket or a link. An index that cannot be saved at close raises TierError.

Block file header (little-endian): magic b"AFKVBLK1", format digest (16 bytes), block hash
(16 bytes), payload nbytes (u64), crc32 of the payload (u32), zero padding to 64 bytes.
A file is written to `<name>.tmp` and renamed, so a complete name is a complete write.

Reads check everything (size, magic, format, hash, length, checksum against the index):
any mismatch raises CorruptBlockError and the block is recomputed, never used. A restarted
engine reuses the files through the index; files the index does not list (written after
its last save) are adopted from their headers.

The DiskTier object is the loop thread's bookkeeping; the module functions at the bottom do
the blocking file I/O and run on I/O threads (never on the event loop).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import stat
import struct
import sys
import zlib
from pathlib import Path

import msgpack
import numpy as np

from afkv.errors import CorruptBlockError, TierError
from afkv.kv.block_pool import BlockHash
from afkv.kv.checks import accounted
from afkv.kv.formats import BlockFormat
from afkv.kv.tiers.fileio import FileIO
from afkv.kv.tiers.policy import PinCounts, make_order

log = logging.getLogger("afkv.kv.disk")

MAGIC = b"AFKVBLK1"
HEADER_NBYTES = 64
_HEADER = struct.Struct("<8s16s16sQI")  # magic, format digest, block hash, payload nbytes, crc32
INDEX_NAME = "index.msgpack"
INDEX_VERSION = 1
SUFFIX = ".kvb"


def block_file_name(block_hash: BlockHash) -> str:
    return block_hash.hex() + SUFFIX


class DiskTier:
    """Owner of these fields (loop thread only; I/O threads touch only files):

    _checksums   hash -> crc32 of the block's bytes, for every readable file
    _writing     hashes whose file is being written (they count against the capacity)
    _order       eviction order of the readable files
    _pins        hash -> number of reads in flight (not evictable while > 0)
    index_dirty  the index file is older than _checksums
    """

    def __init__(self, path: Path, fmt: BlockFormat, num_blocks: int, policy: str, lock_fd: int,
                 entries: list[tuple[BlockHash, int]], claim: socket.socket | None = None):
        assert num_blocks > 0  # validated by the config
        self.path, self.format, self.num_blocks = path, fmt, num_blocks
        self._lock_fd: int | None = lock_fd
        self._claim = claim  # the path's abstract socket (Linux), released by close()
        self._checksums: dict[BlockHash, int] = {}
        self._writing: set[BlockHash] = set()
        self._order = make_order(policy)
        self._pins = PinCounts()
        for block_hash, crc in entries:
            self._checksums[block_hash] = crc
            self._order.insert(block_hash)
        self.index_dirty = False

    # ---- start-up -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, fmt: BlockFormat, num_blocks: int, policy: str, capacity_key: str) -> "DiskTier":
        """Claim `path` (created 0700 if missing) and load what a previous engine left there.
        Blocking: call at start-up, off the event loop. TierError when the directory cannot
        be used (not a directory, another user's, in use, unwritable, too little free space)."""
        file_nbytes = HEADER_NBYTES + fmt.nbytes
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = path.stat()
            if not stat.S_ISDIR(st.st_mode):
                raise TierError(f"disk tier path {path} is not a directory")
            if st.st_uid != os.geteuid():
                raise TierError(f"disk tier directory {path} belongs to another user (uid {st.st_uid})")
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(path, 0o700)
            _check_entries(path)
        except OSError as exc:
            raise TierError(f"disk tier directory {path} cannot be used: {exc}") from exc
        claim = _claim(path)
        try:
            lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            _release(claim)
            raise TierError(f"disk tier directory {path} cannot be used: {exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(lock_fd)
            _release(claim)
            raise TierError(f"disk tier directory {path} is in use by another engine") from exc
        try:
            _probe_write(path, file_nbytes)
            entries = _load_entries(path, fmt)
            used = len(entries) * file_nbytes
            free = shutil.disk_usage(path).free
            if free + used < num_blocks * file_nbytes:
                raise TierError(
                    f"disk tier needs {num_blocks * file_nbytes / 2**20:.1f} MiB ({num_blocks} blocks) but {path} "
                    f"has {(free + used) / 2**20:.1f} MiB free; lower key kv.{capacity_key}"
                )
        except OSError as exc:
            os.close(lock_fd)
            _release(claim)
            raise TierError(f"disk tier directory {path} is not writable: {exc}") from exc
        except TierError:
            os.close(lock_fd)
            _release(claim)
            raise
        tier = cls(path, fmt, num_blocks, policy, lock_fd, entries, claim)
        for block_hash in tier.evict_over_capacity():
            (path / block_file_name(block_hash)).unlink(missing_ok=True)
        log.info("disk tier %s: %d blocks reused, capacity %d blocks", path, len(tier._checksums), num_blocks)
        return tier

    # ---- lookups --------------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        return len(self._checksums) + len(self._writing)

    @property
    def file_nbytes(self) -> int:
        return HEADER_NBYTES + self.format.nbytes

    def __contains__(self, block_hash: BlockHash) -> bool:
        """Readable or being written."""
        return block_hash in self._checksums or block_hash in self._writing

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The checksum of a readable block, or None."""
        return self._checksums.get(block_hash)

    def touch(self, block_hash: BlockHash) -> None:
        self._order.touch(block_hash)

    # ---- changes --------------------------------------------------------------------------
    def reserve(self, block_hash: BlockHash) -> list[BlockHash] | None:
        """Room for a new file, evicting the oldest unpinned files when full. -> the evicted
        hashes (their files are the caller's to delete); None when full of pinned or
        in-flight files (then nothing changes)."""
        accounted(block_hash not in self, f"disk entry {block_hash.hex()} is reserved twice")
        need = self.num_used + 1 - self.num_blocks
        victims = []
        if need > 0:
            victims = [h for h in self._order.oldest_first() if h not in self._pins][:need]
            if len(victims) < need:
                return None
            for h in victims:
                self.remove(h)
        self._writing.add(block_hash)
        return victims

    def finish_write(self, block_hash: BlockHash, crc: int | None) -> None:
        """A write ended: readable with checksum `crc`, or (None) failed and forgotten."""
        self._writing.remove(block_hash)
        if crc is not None:
            self._checksums[block_hash] = crc
            self._order.insert(block_hash)
            self.index_dirty = True

    def remove(self, block_hash: BlockHash) -> None:
        """Forget a readable block (evicted, or its file is bad); the caller deletes the file."""
        accounted(block_hash not in self._pins, f"removing disk entry {block_hash.hex()} while a read uses it")
        del self._checksums[block_hash]
        self._order.remove(block_hash)
        self.index_dirty = True

    def pin(self, block_hash: BlockHash) -> None:
        accounted(block_hash in self._checksums, f"pinning disk entry {block_hash.hex()}, which is not readable")
        self._pins.pin(block_hash)

    def unpin(self, block_hash: BlockHash) -> None:
        self._pins.unpin(block_hash)

    def lower_capacity(self) -> None:
        """The file system is full: keep the capacity at what is stored now."""
        self.num_blocks = max(1, len(self._checksums))

    def evict_over_capacity(self) -> list[BlockHash]:
        victims = [h for h in self._order.oldest_first() if h not in self._pins]
        victims = victims[: max(0, self.num_used - self.num_blocks)]
        for h in victims:
            self.remove(h)
        return victims

    def index_bytes(self) -> bytes:
        """The index as it should be on disk now (clears index_dirty)."""
        self.index_dirty = False
        entries = [[h, self._checksums[h]] for h in self._order.oldest_first()]
        return msgpack.packb({"version": INDEX_VERSION, "format": self.format.digest, "entries": entries})

    def close(self) -> None:
        """Release the directory (the index is the caller's to write first)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None
        _release(self._claim)
        self._claim = None

    def check_invariants(self) -> None:
        accounted(self.num_used <= self.num_blocks, "disk tier over capacity")
        accounted(not (set(self._checksums) & self._writing), "a disk entry is readable while being written")
        accounted(len(self._order) == len(self._checksums) and all(h in self._order for h in self._checksums),
                  "disk eviction order differs from entries")
        accounted(set(self._pins) <= set(self._checksums), "a disk pin without an entry")


# ---- blocking file I/O (I/O threads, or start-up) -------------------------------------------
def write_block(path: Path, fmt_digest: bytes, block_hash: BlockHash, payload: np.ndarray, fileio: FileIO) -> int:
    """Write one block file (via a .tmp name, mode 0600) -> crc32 of the payload."""
    crc = zlib.crc32(payload)
    header = _HEADER.pack(MAGIC, fmt_digest, block_hash, payload.nbytes, crc).ljust(HEADER_NBYTES, b"\0")
    final = path / block_file_name(block_hash)
    tmp = final.with_name(final.name + ".tmp")
    try:
        fileio.write(tmp, header, payload)
        os.replace(tmp, final)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return crc


def read_block(path: Path, fmt_digest: bytes, block_hash: BlockHash, crc: int, out: np.ndarray, fileio: FileIO) -> None:
    """Read one block's bytes into `out` (uint8 [nbytes]) and verify them.
    CorruptBlockError on any mismatch; FileNotFoundError when the file is gone."""
    name = check_header(path, fmt_digest, block_hash, crc, out.nbytes)
    got = fileio.read_into(name, HEADER_NBYTES, out)
    if got != out.nbytes:
        raise CorruptBlockError(f"{name}: truncated ({got} of {out.nbytes} bytes read)")
    if zlib.crc32(out) != crc:
        raise CorruptBlockError(f"{name}: checksum mismatch")


def check_header(path: Path, fmt_digest: bytes, block_hash: BlockHash, crc: int, payload_nbytes: int) -> Path:
    """The block file's header against what was written (read_block's checks before the
    payload) -> the file's name. CorruptBlockError on any mismatch; FileNotFoundError when
    the file is gone. A reader of sections (afkv.kv.stream) checks zlib.crc32 of the payload,
    accumulated section by section in file order, against `crc` at the end."""
    name = path / block_file_name(block_hash)
    magic, digest, stored_hash, nbytes, stored_crc = _read_header(name, payload_nbytes)
    if digest != fmt_digest or stored_hash != block_hash:
        raise CorruptBlockError(f"{name}: holds another block or format")
    if stored_crc != crc:
        raise CorruptBlockError(f"{name}: checksum in the header differs from the index")
    return name


def delete_block(path: Path, block_hash: BlockHash) -> None:
    """Delete one block file; a file already gone is not an error (the goal is reached)."""
    (path / block_file_name(block_hash)).unlink(missing_ok=True)


def write_index(path: Path, data: bytes) -> None:
    """Replace the index file (via a .tmp name). OSError when it cannot be written (the file
    system is full or read-only, the directory was removed, ...): the periodic saves log it
    and go on; the save at close raises `index_error(...)` instead."""
    tmp = path / (INDEX_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path / INDEX_NAME)  # a .tmp left behind by a failure is deleted at the next start


def index_error(path: Path, exc: OSError) -> TierError:
    """The error of an index that could not be saved at close."""
    return TierError(f"disk tier {path}: cannot write its index ({exc}); the blocks written since the last index "
                     "save are adopted from their headers at the next start")


def _read_header(name: Path, payload_nbytes: int) -> tuple:
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)  # a FIFO must not block us
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CorruptBlockError(f"{name}: not a regular file")
        if st.st_size != HEADER_NBYTES + payload_nbytes:
            raise CorruptBlockError(f"{name}: {st.st_size} bytes, expected {HEADER_NBYTES + payload_nbytes}")
        raw = f.read(HEADER_NBYTES)
    fields = _HEADER.unpack_from(raw)
    if fields[0] != MAGIC or fields[3] != payload_nbytes:
        raise CorruptBlockError(f"{name}: not a KV block file of this size")
    return fields


def _probe_write(path: Path, nbytes: int) -> None:
    """Write and delete one block's worth of bytes: unwritable or full shows up now."""
    probe = path / "probe.tmp"
    probe.unlink(missing_ok=True)  # a regular file (_check_entries refused anything else)
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        _write_all(fd, bytes(nbytes))
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        if n == 0:
            raise OSError(errno.ENOSPC, "no progress writing")
        view = view[n:]


def _ours(name: str) -> bool:
    return name.endswith((SUFFIX, ".tmp")) or name in (INDEX_NAME, "lock")


def _check_entries(path: Path) -> None:
    """TierError naming the first of our entries that is not a regular file."""
    for entry in os.scandir(path):
        if _ours(entry.name) and not entry.is_file(follow_symlinks=False):
            kind = ("a directory" if entry.is_dir(follow_symlinks=False) else "a link" if entry.is_symlink()
                    else "a FIFO, socket or device")
            raise TierError(f"disk tier directory {path} holds {entry.name!r}, which is {kind}, not a regular file: "
                            "remove it, or use another kv.disk_path")


def _claim(path: Path) -> socket.socket | None:
    """Claim the directory's real path for this process (Linux: an abstract Unix socket, which
    outlives a removal of the directory and dies with the process). TierError if taken."""
    if not sys.platform.startswith("linux"):
        return None  # elsewhere the flock alone claims it
    name = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:40]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0afkv-disk-tier-{name}")
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TierError(f"disk tier directory {path} is in use by another engine") from exc
        raise TierError(f"disk tier directory {path} cannot be claimed: {exc}") from exc
    return sock


def _release(claim: socket.socket | None) -> None:
    if claim is not None:
        claim.close()


def _load_entries(path: Path, fmt: BlockFormat) -> list[tuple[BlockHash, int]]:
    """(hash, crc32) of the usable block files in `path`, oldest first: the index's entries
    whose files are there with the right size, then files the index misses (from their
    headers). Leftover .tmp files and files of another format are deleted."""
    file_nbytes = HEADER_NBYTES + fmt.nbytes
    files = {}
    for entry in os.scandir(path):
        if not entry.is_file(follow_symlinks=False):
            continue  # not ours (_check_entries refused ours at start-up)
        if entry.name.endswith(".tmp"):
            os.unlink(entry.path)
        elif entry.name.endswith(SUFFIX):
            files[entry.name] = entry.stat(follow_symlinks=False).st_size
    entries: list[tuple[BlockHash, int]] = []
    seen = set()
    for block_hash, crc in _read_index(path, fmt):
        name = block_file_name(block_hash)
        if files.get(name) == file_nbytes and block_hash not in seen:
            entries.append((block_hash, crc))
            seen.add(block_hash)
    adopted = []
    for name, size in sorted(files.items()):
        block_hash = bytes.fromhex(name[: -len(SUFFIX)]) if _is_hex(name[: -len(SUFFIX)]) else None
        if block_hash in seen:
            continue
        try:
            _, digest, stored_hash, _, crc = _read_header(path / name, fmt.nbytes)
        except CorruptBlockError:
            digest = stored_hash = None
        if digest == fmt.digest and stored_hash == block_hash:
            adopted.append((block_hash, crc))
        else:
            os.unlink(path / name)
    return adopted + entries  # adopted files have no known use time: evict them first


def _read_index(path: Path, fmt: BlockFormat) -> list[tuple[BlockHash, int]]:
    try:
        fd = os.open(path / INDEX_NAME, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    with open(fd, "rb") as f:
        data = f.read()
    try:
        index = msgpack.unpackb(data)
        if index["version"] != INDEX_VERSION or index["format"] != fmt.digest:
            return []
        return [(bytes(h), int(crc)) for h, crc in index["entries"]]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        log.warning("disk tier %s: index unreadable (%s); rebuilding it from the block files", path, exc)
        return []


def _is_hex(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)
