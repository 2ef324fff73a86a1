"""BlockPool: fixed-size KV blocks, reference counts and prefix reuse by chained hashes.

A block's identity is the chained hash of the tokens it holds and of every token before
it (blake2b over the parent hash and the token ids), so equal prefixes map to equal
hashes in every process and after restarts. Only full blocks get a hash; a hashed block
is immutable. Freed hashed blocks stay cached (reusable) until their slot is reallocated,
least recently freed first; `on_evict(block_id, hash)` is called just before such a slot
is handed out again (the tier stack copies the content to host memory then).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from afkv.kv.checks import owned

BlockHash = bytes


def chain_hash(parent: BlockHash | None, token_ids: Sequence[int], salt: bytes = b"") -> BlockHash:
    """Hash of one full block given its parent's hash; deterministic across processes."""
    h = hashlib.blake2b(digest_size=16, key=salt[:64])
    h.update(parent or b"\0" * 16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def chain_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int, salt: bytes = b"",
                 known: Sequence[BlockHash] = ()) -> Iterator[BlockHash]:
    """The chained hashes of blocks len(known) .. num_blocks - 1 of token_ids (each a full block
    of block_size tokens), continuing the chain `known` (the hashes of the blocks before). The one
    place block hashes are computed: prefix matching, prefetching and registration all use it."""
    parent = known[-1] if known else None
    for b in range(len(known), num_blocks):
        parent = chain_hash(parent, token_ids[b * block_size : (b + 1) * block_size], salt)
        yield parent


class BlockPool:
    """Owner of (and the only code that touches) these fields:

    _ref_counts   block id -> number of sequences using the block
    _hash_of      block id -> its chained hash, or None while not full / not registered
    _cached       hash -> block id, for every registered block (used or free)
    _free         block ids with ref count 0, least recently freed first
    """

    def __init__(self, num_blocks: int, on_evict: Callable[[int, BlockHash], None] | None = None):
        assert num_blocks > 0  # sized by the config, which refuses 0
        self.num_blocks = num_blocks
        self._on_evict = on_evict
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_held_blocks(self) -> int:
        """Blocks in use or holding cached content."""
        return self.num_blocks - sum(self._hash_of[b] is None for b in self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        """The hash a block is registered under, or None."""
        return self._hash_of[block_id]

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks with ref count 1, or None when fewer than n are free (nothing changes)."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            old = self._hash_of[block_id]
            if old is not None:  # evict the cached content this slot held
                del self._cached[old]
                self._hash_of[block_id] = None
                if self._on_evict is not None:
                    self._on_evict(block_id, old)
            self._ref_counts[block_id] = 1
            out.append(block_id)
        return out

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash)

    def acquire(self, block_id: int) -> None:
        """Take one more reference on a cached block (prefix hit)."""
        owned(self._hash_of[block_id] is not None, f"block {block_id} is shared but not registered")
        if self._ref_counts[block_id] == 0:
            del self._free[block_id]
        self._ref_counts[block_id] += 1

    def release(self, block_ids: Sequence[int]) -> None:
        for block_id in block_ids:
            owned(self._ref_counts[block_id] > 0, f"double free of block {block_id}")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    def register(self, block_id: int, block_hash: BlockHash) -> bool:
        """Record that a full block holds the content `block_hash`. False when another block
        already holds the same content (this one then stays private and is freed as usual)."""
        owned(self._ref_counts[block_id] > 0, f"block {block_id} is registered while free")
        owned(self._hash_of[block_id] is None, f"block {block_id} is registered twice")
        if block_hash in self._cached:
            return False
        self._cached[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        return True

    def check_invariants(self) -> None:
        """Accounting invariants (tests; BlockOwnershipError naming the first that fails)."""
        owned(all(r >= 0 for r in self._ref_counts), "a negative ref count")
        owned(set(self._free) == {b for b, r in enumerate(self._ref_counts) if r == 0},
              "the free list differs from the blocks with ref count 0")
        for h, b in self._cached.items():
            owned(self._hash_of[b] == h, f"block {b} is cached under a hash it does not hold")
        owned(sum(h is not None for h in self._hash_of) == len(self._cached), "registered blocks differ from the cache")
