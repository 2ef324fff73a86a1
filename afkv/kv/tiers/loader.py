"""Loading a sequence's matched prefix from the tiers below the device, and settling it.

    TierLoader  the tiers below the device (a TierStack) as the KV manager uses them: bring a
                matched block up into a device block (host: copied before the next step;
                disk: read by an I/O thread, then copied, while the sequence is *loading*),
                prefetch waiting prompts' disk blocks, collect finished reads, drain, close
    NoTiers     a device-only cache: the same calls, with nothing below (a block not on the
                device is not found; nothing is ever in flight)

A block that fails its checks on the way up ends the usable prefix there: `take_failed` says
where, and the manager cuts the table (the sequence computes the rest from its tokens).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future

from afkv.kv.block_pool import BlockHash, BlockPool
from afkv.kv.checks import owned
from afkv.kv.metrics import KVMetrics, TierUsage
from afkv.kv.tiers.stack import TierStack, Where


class TierLoader:
    """Owner of these fields (loop thread only):

    _pending   sequence id -> {index: hash} of its table's blocks still being read from disk
    _failed    sequence id -> lowest index of a block whose read failed
    _waiters   hash -> [(sequence id, index, device block id)] of the table entries waiting
               for that read (a pending entry's device block never changes: tables grow only
               after `settle`, and `forget` drops a freed sequence's waiters)
    """

    def __init__(self, stack: TierStack, pool: BlockPool, metrics: KVMetrics):
        self.stack, self.pool, self.metrics = stack, pool, metrics
        self._pending: dict[int, dict[int, BlockHash]] = {}
        self._failed: dict[int, int] = {}
        self._waiters: dict[BlockHash, list[tuple[int, int, int]]] = {}

    @property
    def prefetch_depth(self) -> int:
        """Waiting sequences whose disk blocks the scheduler reads ahead (0 without a disk tier)."""
        return 0 if self.stack.disk is None else self.stack.config.prefetch_depth

    def demote(self, block_id: int, block_hash: BlockHash) -> None:
        """The pool is about to reuse a cached block: keep a copy below."""
        self.stack.demote(block_id, block_hash)

    def bring_up(self, seq_id: int, index: int, block_hash: BlockHash) -> int | None:
        """A device block for table entry `index` holding `block_hash` from a lower tier: filled
        before the next step (host), or once its disk read ends (then the entry is pending);
        None when no tier has it or no device block is free."""
        stack = self.stack
        if stack.locate(block_hash) is None:
            return None
        blocks = self.pool.allocate(1)  # may demote another block, which may evict the hash from host
        if blocks is None:
            return None
        [block_id] = blocks
        where = stack.locate(block_hash)
        if where is Where.HOST:
            stack.promote(block_hash, block_id)
            owned(self.pool.register(block_id, block_hash), f"block {block_hash.hex()} was on no device block a moment ago")
            self.metrics.hit_blocks["host"] += 1
            return block_id
        if where is None or not stack.fetch(block_hash):
            self.pool.release([block_id])
            return None
        self._pending.setdefault(seq_id, {})[index] = block_hash
        self._waiters.setdefault(block_hash, []).append((seq_id, index, block_id))
        self.metrics.hit_blocks["disk"] += 1
        return block_id

    def prefetch(self, hashes: Iterable[BlockHash]) -> int:
        """Start reading from disk the blocks of a known prefix (its chained hashes, in order)
        that are in no faster tier. -> reads started."""
        stack = self.stack
        if stack.disk is None:
            return 0
        started = 0
        for h in hashes:
            if self.pool.lookup(h) is not None:
                continue
            where = stack.locate(h)
            if where is None:
                break
            if where is Where.DISK:
                if not stack.fetch(h, ahead=True):
                    break
                started += 1
        return started

    def is_loading(self, seq_id: int) -> bool:
        return bool(self._pending.get(seq_id))

    def take_failed(self, seq_id: int) -> int | None:
        """The lowest table index of the sequence whose read failed (once), or None."""
        return self._failed.pop(seq_id, None)

    def forget(self, seq_id: int) -> None:
        """A sequence is freed: its entries wait for nothing any more."""
        for index, h in self._pending.pop(seq_id, {}).items():
            waiters = [w for w in self._waiters[h] if w[:2] != (seq_id, index)]
            if waiters:
                self._waiters[h] = waiters
            else:
                del self._waiters[h]
        self._failed.pop(seq_id, None)

    def poll(self) -> None:
        """Collect finished transfers: a block read from disk is copied into the device block
        of every sequence waiting for it (or marks their prefix as ending there)."""
        for h, ok in self.stack.poll():
            for seq_id, index, block_id in self._waiters.pop(h, ()):
                pending = self._pending[seq_id]
                del pending[index]
                if not pending:
                    del self._pending[seq_id]
                if ok:
                    self.stack.promote(h, block_id)
                    self.pool.register(block_id, h)  # False: another block got h first; this one stays private
                else:
                    self._failed[seq_id] = min(index, self._failed.get(seq_id, index))

    def flush(self) -> None:
        self.stack.flush()

    def in_flight(self) -> list[Future]:
        return self.stack.in_flight()

    def close(self) -> None:
        self.stack.close()

    async def aclose(self) -> None:
        await self.stack.aclose()

    def usage(self) -> tuple[TierUsage, ...]:
        return self.stack.usage()

    def check_invariants(self) -> None:
        waiting = {(s, i) for ws in self._waiters.values() for s, i, _ in ws}
        owned(waiting == {(s, i) for s, idx in self._pending.items() for i in idx} and all(self._pending.values()),
              "the entries waiting for disk reads differ from the pending ones")
        self.stack.check_invariants()


class NoTiers:
    """Nothing below the device: no block is found below, nothing is ever in flight."""

    stack = None
    prefetch_depth = 0

    def demote(self, block_id: int, block_hash: BlockHash) -> None:
        pass  # the cached content is dropped with its slot

    def bring_up(self, seq_id: int, index: int, block_hash: BlockHash) -> int | None:
        return None

    def prefetch(self, hashes: Iterable[BlockHash]) -> int:
        return 0

    def is_loading(self, seq_id: int) -> bool:
        return False

    def take_failed(self, seq_id: int) -> int | None:
        return None

    def forget(self, seq_id: int) -> None:
        pass

    def poll(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def in_flight(self) -> list[Future]:
        return []

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def usage(self) -> tuple[TierUsage, ...]:
        return ()

    def check_invariants(self) -> None:
        pass


LowerTiers = TierLoader | NoTiers
