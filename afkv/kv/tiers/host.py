"""HostTier: KV blocks in host memory (pinned when CUDA is available), keyed by block hash."""

from __future__ import annotations

import torch

from afkv.kv.block_pool import BlockHash
from afkv.kv.checks import accounted
from afkv.kv.formats import BlockFormat
from afkv.kv.tiers.copier import Fence
from afkv.kv.tiers.policy import PinCounts, make_order


class HostTier:
    """`num_blocks` slots of one encoded block each in one buffer, buf uint8 [num_blocks, nbytes].

    Owner of these fields (loop thread only):
    _slot_of   hash -> slot, for every entry (ready or loading)
    _hash_of   slot -> hash, or None for a free slot
    _free      free slots
    _order     eviction order of the entries
    _loading   entries whose bytes are still being read from disk (not readable, not evictable)
    _pins      hash -> number of I/O jobs using the entry's slot (not evictable while > 0)
    _fences    slot -> fence of the last copy batch that read or wrote the slot

    The bytes of `buf` are written by the model worker (copy batches) and by I/O threads; a
    slot's fence orders them: an I/O job waits for its slot's fence before touching the slot,
    and a slot is never reused while an I/O job holds a pin on it.
    """

    def __init__(self, fmt: BlockFormat, num_blocks: int, policy: str, pin_memory: bool):
        assert num_blocks > 0  # validated by the config
        self.format = fmt
        self.num_blocks = num_blocks
        self.buf = torch.empty((num_blocks, fmt.nbytes), dtype=torch.uint8, pin_memory=pin_memory)
        self._slot_of: dict[BlockHash, int] = {}
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._order = make_order(policy)
        self._loading: set[BlockHash] = set()
        self._pins = PinCounts()
        self._fences: list[Fence | None] = [None] * num_blocks

    @property
    def capacity_nbytes(self) -> int:
        return self.num_blocks * self.format.nbytes

    @property
    def num_used(self) -> int:
        return len(self._slot_of)

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._slot_of

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The slot of a readable entry, or None."""
        if block_hash in self._loading:
            return None
        return self._slot_of.get(block_hash)

    def is_loading(self, block_hash: BlockHash) -> bool:
        return block_hash in self._loading

    def touch(self, block_hash: BlockHash) -> None:
        self._order.touch(block_hash)

    def reserve(self, block_hash: BlockHash, *, loading: bool) -> tuple[int, BlockHash | None] | None:
        """A slot for a new entry, evicting the oldest evictable entry when none is free.
        -> (slot, evicted hash or None); None when every entry is pinned or loading (then
        nothing changes)."""
        accounted(block_hash not in self._slot_of, f"host entry {block_hash.hex()} is reserved twice")
        evicted = None
        if not self._free:
            evicted = next((h for h in self._order.oldest_first() if self._evictable(h)), None)
            if evicted is None:
                return None
            self._remove(evicted)
        slot = self._free.pop()
        self._slot_of[block_hash] = slot
        self._hash_of[slot] = block_hash
        self._order.insert(block_hash)
        if loading:
            self._loading.add(block_hash)
        return slot, evicted

    def finish_loading(self, block_hash: BlockHash, ok: bool) -> None:
        """A disk read into the entry ended: it becomes readable, or (failed) it is removed."""
        self._loading.remove(block_hash)
        if not ok:
            self._remove(block_hash)

    def pin(self, block_hash: BlockHash) -> None:
        accounted(block_hash in self._slot_of, f"pinning host entry {block_hash.hex()}, which is not there")
        self._pins.pin(block_hash)

    def unpin(self, block_hash: BlockHash) -> None:
        self._pins.unpin(block_hash)

    def fence(self, slot: int) -> Fence | None:
        return self._fences[slot]

    def set_fence(self, slot: int, fence: Fence) -> None:
        self._fences[slot] = fence

    def _evictable(self, block_hash: BlockHash) -> bool:
        return block_hash not in self._pins and block_hash not in self._loading

    def _remove(self, block_hash: BlockHash) -> None:
        accounted(block_hash not in self._pins, f"removing host entry {block_hash.hex()} while I/O uses it")
        slot = self._slot_of.pop(block_hash)
        self._hash_of[slot] = None
        self._order.remove(block_hash)
        self._free.append(slot)

    def check_invariants(self) -> None:
        """Accounting invariants (used by tests)."""
        accounted(len(self._slot_of) + len(self._free) == self.num_blocks, "host slot leaked")
        accounted(len(set(self._free)) == len(self._free), "a host slot is free twice")
        for h, slot in self._slot_of.items():
            accounted(self._hash_of[slot] == h, f"host slot {slot} holds another entry")
        accounted(sum(h is not None for h in self._hash_of) == len(self._slot_of), "host slots differ from entries")
        accounted(len(self._order) == len(self._slot_of), "host eviction order differs from entries")
        accounted(self._loading <= set(self._slot_of), "a host entry loads without a slot")
        accounted(set(self._pins) <= set(self._slot_of) and all(n > 0 for n in self._pins.values()),
                  "a host pin without an entry")
