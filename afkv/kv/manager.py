"""KVManager: per-sequence block tables over a BlockPool, and the device KV tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from afkv.kv.block_pool import BlockHash, BlockPool, chain_hash
from afkv.kv.layout import KVLayout


class KVManager:
    """Owner of `_tables` (sequence id -> block ids) and `_hashes` (sequence id -> chained
    hashes of its full, computed blocks). Asks the pool for blocks; never touches its lists."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device, salt: bytes = b""):
        self.layout = layout
        self.pool = BlockPool(num_blocks)
        self.salt = salt
        self.kv = torch.zeros((num_blocks, *layout.block_shape), dtype=layout.dtype, device=device)
        self._tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[BlockHash]] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.layout.block_size

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def match_prefix(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Start a sequence's table with the cached blocks of its longest known prefix.
        Returns the number of tokens whose KV is already there (a multiple of block_size,
        always less than len(token_ids) so the last prompt token is computed)."""
        assert seq_id not in self._tables
        bs = self.layout.block_size
        table: list[int] = []
        hashes: list[BlockHash] = []
        parent = None
        for b in range((len(token_ids) - 1) // bs):
            h = chain_hash(parent, token_ids[b * bs : (b + 1) * bs], self.salt)
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            self.pool.acquire(block_id)
            table.append(block_id)
            hashes.append(h)
            parent = h
        self._tables[seq_id] = table
        self._hashes[seq_id] = hashes
        return len(table) * bs

    def num_new_blocks(self, seq_id: int, num_tokens: int) -> int:
        return max(0, self.layout.num_blocks_for(num_tokens) - len(self._tables[seq_id]))

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.num_new_blocks(seq_id, num_tokens) <= self.pool.num_free_blocks

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the table to cover num_tokens; False (and no change) when the pool is short."""
        blocks = self.pool.allocate(self.num_new_blocks(seq_id, num_tokens))
        if blocks is None:
            return False
        self._tables[seq_id].extend(blocks)
        return True

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the blocks that became full and computed, so later prompts can share them."""
        bs = self.layout.block_size
        table, hashes = self._tables[seq_id], self._hashes[seq_id]
        while len(hashes) < num_computed // bs:
            b = len(hashes)
            h = chain_hash(hashes[-1] if hashes else None, token_ids[b * bs : (b + 1) * bs], self.salt)
            self.pool.register(table[b], h)
            hashes.append(h)

    def free(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, None)
        self._hashes.pop(seq_id, None)
        if table:
            self.pool.release(table)

    @property
    def num_sequences(self) -> int:
        return len(self._tables)
