"""Property test of the tiered KV cache: random allocate / append / fork / free sequences on
a tiny device pool (so blocks are constantly demoted to host memory and disk and promoted
back), with I/O left in flight, spill files damaged, and the manager restarted on the same
directory. Throughout: accounting is exact (no leak, no double owner, capacities respected),
and every block a sequence is given holds exactly the KV of its tokens (the content is a
function of token and position, checked on the model worker after each promotion)."""

import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from afkv.kv.formats import RawFormat
from afkv.kv.layout import KVLayout
from afkv.kv.manager import KVManager
from afkv.kv.tiers.config import TierConfig

BS = 2
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, block_size=BS, dtype=torch.float32)
NUM_BLOCKS, HOST_BLOCKS, DISK_BLOCKS = 6, 4, 12


RUN_TOTALS: Counter = Counter()  # summed over every example (checked after the test)


def _value(token: int, pos: int) -> float:
    return token * 1000.0 + pos


class TieredKVMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="afkv-tiers-"))
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="test-model")
        self.kv = self._manager()
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0
        self.restarts = 0
        self.counters = Counter()  # metrics of every manager of this run, restarts included

    def _manager(self) -> KVManager:
        tiers = TierConfig(RawFormat(LAYOUT), HOST_BLOCKS, DISK_BLOCKS, self.dir / "spill", io_threads=2,
                           disk_capacity_key="disk_num_blocks")
        return KVManager(LAYOUT, NUM_BLOCKS, torch.device("cpu"), salt=b"m", tiers=tiers, worker=self.worker)

    def teardown(self):
        self.kv.close()
        self.counters.update(self.kv.metrics.counters)
        self.counters.update({f"hit_{k}": v for k, v in self.kv.metrics.hit_blocks.items()})
        RUN_TOTALS.update(self.counters)
        self.worker.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- the engine's moves ---------------------------------------------------------------------
    def _step(self, sid: int, toks: list[int], start: int) -> None:
        """As a model step on the worker, after the copy batch: check the prefix, write the rest."""
        table = list(self.kv.block_table(sid))

        def run():
            kv = self.kv.kv
            for pos in range(len(toks)):
                block, off = table[pos // BS], pos % BS
                if pos < start:
                    assert kv[block, 0, :, off].eq(_value(toks[pos], pos)).all(), f"wrong KV at position {pos}"
                else:
                    kv[block, 0, :, off] = _value(toks[pos], pos)

        self.worker.submit(run).result()

    def _admit(self, sid: int, toks: list[int]) -> bool:
        self.kv.poll()
        self.kv.match_prefix(sid, toks)
        self.kv.flush()
        while self.kv.is_loading(sid):
            self.kv.drain()
        cached = self.kv.settle(sid)
        assert cached % BS == 0 and cached < len(toks)
        if not self.kv.allocate(sid, len(toks)):
            self.kv.free(sid)
            return False
        self.kv.flush()
        self._step(sid, toks, cached)
        self.kv.commit(sid, toks, len(toks))
        self.tokens[sid] = toks
        return True

    @rule(n=st.integers(1, 11), prefix=st.integers(0, 2))
    def new_sequence(self, n, prefix):
        """One of three families of prompts (shared prefixes), of random length."""
        sid = self.next_id
        self.next_id += 1
        self._admit(sid, [(prefix * 5 + i * i) % 7 for i in range(n)])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.integers(1, 3))
    def fork(self, data, extra):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        sid = self.next_id
        self.next_id += 1
        self._admit(sid, self.tokens[parent] + [1] * extra)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), k=st.integers(1, 3))
    def append(self, data, k):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        old = self.tokens[sid]
        toks = old + [0] * k
        self.kv.poll()
        if self.kv.allocate(sid, len(toks)):
            self.kv.flush()
            self._step(sid, toks, len(old))
            self.kv.commit(sid, toks, len(toks))
            self.tokens[sid] = toks

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(sid)
        del self.tokens[sid]

    @rule()
    def pressure(self):
        """A sequence takes every free device block and leaves without registering them (as
        one with prompt logprobs would): every cached block is demoted to host memory."""
        sid = self.next_id
        self.next_id += 1
        self.kv.poll()
        self.kv.match_prefix(sid, [])
        assert self.kv.allocate(sid, self.kv.pool.num_free_blocks * BS)
        self.kv.flush()
        self.kv.free(sid)

    @rule()
    def poll(self):
        """Collect whatever finished, leave the rest in flight."""
        self.kv.poll()
        self.kv.flush()

    @rule()
    def drain(self):
        self.kv.drain()
        files = {p.name for p in (self.dir / "spill").glob("*.kvb")}
        disk = self.kv.tiers.disk
        assert {f for f in files if disk.lookup(bytes.fromhex(f[:-4])) is None} == set(), "a file nobody indexes"

    @rule(pick=st.integers(0, DISK_BLOCKS - 1), how=st.sampled_from(["flip", "truncate", "delete"]))
    def damage_a_spill_file(self, pick, how):
        self.kv.drain()  # writes in flight land first: which files exist must not depend on I/O timing
        files = sorted((self.dir / "spill").glob("*.kvb"))
        if not files:
            return
        path = files[pick % len(files)]
        try:
            raw = bytearray(path.read_bytes())
            if how == "delete":
                os.unlink(path)
            elif how == "truncate":
                path.write_bytes(raw[: len(raw) // 2])
            else:
                raw[-1] ^= 0x10
                path.write_bytes(raw)
        except FileNotFoundError:  # deleted by an I/O thread meanwhile: nothing to damage
            return

    @precondition(lambda self: self.next_id >= 6 * (self.restarts + 1))
    @rule()
    def restart(self):
        """Every sequence ends, the manager closes; a new one opens the same directory."""
        for sid in list(self.tokens):
            self.kv.free(sid)
        self.tokens.clear()
        self.kv.close()
        self.counters.update(self.kv.metrics.counters)
        self.counters.update({f"hit_{k}": v for k, v in self.kv.metrics.hit_blocks.items()})
        self.kv = self._manager()
        self.restarts += 1

    # ---- invariants -----------------------------------------------------------------------------
    @invariant()
    def accounting_is_exact(self):
        kv = self.kv
        kv.check_invariants()
        for sid, toks in self.tokens.items():
            assert len(kv.block_table(sid)) == -(-len(toks) // BS)
        held = {b for sid in self.tokens for b in kv.block_table(sid)}
        assert kv.pool.num_free_blocks == NUM_BLOCKS - len(held)
        tiers = kv.tiers
        assert tiers.host.num_used <= HOST_BLOCKS
        assert tiers.disk.num_used <= tiers.disk.num_blocks <= DISK_BLOCKS


TestTieredKVMachine = TieredKVMachine.TestCase
TestTieredKVMachine.settings = settings(max_examples=60, stateful_step_count=50, deadline=None, derandomize=True)


def test_the_machine_exercised_every_tier():
    """(after TestTieredKVMachine, in file order) the runs did move blocks through every tier.

    Whether a damaged file is read again before it is evicted depends on when the I/O threads
    finish (the machine leaves I/O in flight on purpose), so reaching `corrupt_blocks` is not
    required here: it failed under load on 2 busy cores. Detection of damaged blocks is tested
    deterministically in tests/kv/test_tiers.py (test_disk_reads_verify_everything,
    test_corrupt_block_ends_the_prefix_and_is_recomputed) and tests/engine/test_tiers.py; here a
    damaged block that is read must never reach a sequence (the content check in _step)."""
    if not RUN_TOTALS:
        TestTieredKVMachine("runTest").runTest()
    for key in ("demotions", "promotions", "spills", "fetches", "hit_host", "hit_disk"):
        assert RUN_TOTALS[key] > 0, (key, RUN_TOTALS)
