"""Block accounting of the pool and the manager: unit and property tests."""

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from afkv.kv.block_pool import BlockPool, chain_hash
from afkv.kv.layout import KVLayout
from afkv.kv.manager import KVManager

ROOT = Path(__file__).resolve().parents[2]


def _manager(num_blocks=16, block_size=4):
    return KVManager(KVLayout(2, 1, 4, block_size, torch.float32), num_blocks, torch.device("cpu"))


# Literal values computed once (blake2b, 16-byte digest, keyed by the salt, over the parent hash
# or 16 zero bytes, then the token ids as little-endian int64). Disk tiers written by one process
# are reused by the next through these hashes: any change to them must break this test.
PINNED = {
    "first": "7077f7c78cbaa9547bb8ede0e304f4f3",  # chain_hash(None, [1, 2, 3, 4])
    "second": "f6a02ec41af69775855a14560bc3f3d1",  # chain_hash(first, [5, 6, 7, 8])
    "salted": "65337159c0e204f7494a3f6e51f17665",  # chain_hash(None, [1, 2, 3, 4], salt=b"other model")
    "large": "046a99187a076988d906be65e35b6e49",  # chain_hash(None, [2**40, 0, 151643, 7])
}

_HASHES = """
import json
from afkv.kv.block_pool import chain_hash
first = chain_hash(None, [1, 2, 3, 4])
print(json.dumps({"first": first.hex(), "second": chain_hash(first, [5, 6, 7, 8]).hex(),
                  "salted": chain_hash(None, (1, 2, 3, 4), salt=b"other model").hex(),
                  "large": chain_hash(None, [2**40, 0, 151643, 7]).hex()}))
"""


def test_chain_hash_is_pinned():
    first = chain_hash(None, [1, 2, 3, 4])
    assert first.hex() == PINNED["first"]
    assert chain_hash(first, [5, 6, 7, 8]).hex() == PINNED["second"]
    assert chain_hash(None, (1, 2, 3, 4), salt=b"other model").hex() == PINNED["salted"]
    assert chain_hash(None, [2**40, 0, 151643, 7]).hex() == PINNED["large"]


def test_chain_hash_is_the_same_in_a_fresh_process():
    """Another interpreter, with another seed for Python's hash(), computes the pinned values."""
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hash_seed}
        child = subprocess.run([sys.executable, "-c", _HASHES], env=env, cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
        assert child.returncode == 0, child.stderr
        assert json.loads(child.stdout) == PINNED


def test_chain_hash_follows_its_definition():
    """The pinned layout, rebuilt with hashlib alone: parent (16 zero bytes for the first block),
    then little-endian int64 token ids; the salt is the blake2b key."""
    def by_hand(parent: bytes | None, tokens: list[int], salt: bytes = b"") -> bytes:
        h = hashlib.blake2b(digest_size=16, key=salt)
        h.update(parent or bytes(16))
        h.update(struct.pack(f"<{len(tokens)}q", *tokens))
        return h.digest()

    a = chain_hash(None, [1, 2, 3, 4])
    assert a == by_hand(None, [1, 2, 3, 4]) and len(a) == 16
    assert chain_hash(a, [5, 6, 7, 8]) == by_hand(a, [5, 6, 7, 8])
    assert chain_hash(None, [1, 2, 3, 4], salt=b"other model") == by_hand(None, [1, 2, 3, 4], b"other model")
    assert chain_hash(a, [5, 6, 7, 8]) != chain_hash(None, [5, 6, 7, 8])  # chained: the prefix counts


def test_allocate_is_all_or_nothing():
    pool = BlockPool(4)
    assert pool.allocate(5) is None and pool.num_free_blocks == 4
    got = pool.allocate(3)
    assert len(set(got)) == 3 and pool.num_free_blocks == 1
    pool.release(got)
    assert pool.num_free_blocks == 4
    pool.check_invariants()


def test_freed_cached_block_is_reused_then_evicted_lru():
    pool = BlockPool(2)
    [a] = pool.allocate(1)
    h = chain_hash(None, [1, 2])
    assert pool.register(a, h)
    pool.release([a])
    assert pool.lookup(h) == a  # still cached while free
    pool.acquire(a)
    assert pool.ref_count(a) == 1 and pool.num_free_blocks == 1
    pool.release([a])
    pool.allocate(2)  # needs every slot: the cached content is evicted
    assert pool.lookup(h) is None
    pool.check_invariants()


def test_eviction_order_is_least_recently_freed_first():
    """Free slots are handed out in the order they were freed; a cached slot that is taken back
    (prefix hit) and freed again goes to the end; each eviction is reported before the slot is
    handed out again, with the hash the slot held."""
    evicted: list[tuple[int, bytes]] = []
    pool = BlockPool(6, on_evict=lambda block_id, h: evicted.append((block_id, h)))
    assert pool.allocate(6) == [0, 1, 2, 3, 4, 5]  # a fresh pool: ascending ids
    hashes = {b: chain_hash(None, [b]) for b in range(6)}
    for b in range(5):  # block 5 stays private (no hash)
        assert pool.register(b, hashes[b])
    pool.release([3])
    pool.release([1])
    pool.release([4, 0])
    pool.release([5])
    pool.release([2])  # freed: 3, 1, 4, 0, 5, 2
    pool.acquire(1)  # a prefix hit takes block 1 back ...
    pool.release([1])  # ... and freeing it again makes it the most recently freed: 3, 4, 0, 5, 2, 1
    assert pool.allocate(1) == [3] and evicted == [(3, hashes[3])]
    assert pool.lookup(hashes[3]) is None and pool.lookup(hashes[4]) == 4
    assert pool.allocate(3) == [4, 0, 5]
    assert evicted == [(3, hashes[3]), (4, hashes[4]), (0, hashes[0])]  # 5 held no hash: nothing evicted
    pool.release([0])  # freed again, holding no content now: last in the queue
    assert pool.allocate(3) == [2, 1, 0]
    assert [b for b, _ in evicted] == [3, 4, 0, 2, 1]
    assert pool.num_free_blocks == 0 and pool.allocate(1) is None
    pool.check_invariants()


def test_manager_prefix_sharing_and_free():
    kv = _manager()
    prompt = list(range(100, 118))  # 18 tokens: 4 full blocks + 2
    assert kv.match_prefix(1, prompt) == 0
    assert kv.allocate(1, len(prompt))
    kv.commit(1, prompt, len(prompt))
    table1 = kv.block_table(1)
    assert len(table1) == 5
    assert kv.match_prefix(2, prompt[:13] + [7, 7, 7]) == 12  # 3 shared blocks
    assert kv.block_table(2) == table1[:3]
    assert all(kv.pool.ref_count(b) == 2 for b in table1[:3])
    kv.free(1)
    kv.free(2)
    assert kv.pool.num_free_blocks == 16
    kv.pool.check_invariants()


def test_graph_scratch_block_is_held_outside_every_table():
    """CUDA graphs' padding rows write a reserved pool block: it is never handed to a sequence,
    never freed, and the manager's accounting counts it (found on the GPU, where graphs reserve it)."""
    kv = _manager(num_blocks=4)
    scratch = kv.reserve_scratch_block()
    kv.check_invariants()
    prompt = list(range(12))  # 3 blocks: every block but the scratch one
    kv.match_prefix(1, prompt)
    assert kv.allocate(1, len(prompt)) and scratch not in kv.block_table(1)
    kv.commit(1, prompt, len(prompt))
    kv.match_prefix(2, [99] * 4)
    assert not kv.allocate(2, 4)  # the scratch block is not free
    kv.free(2)
    kv.check_invariants()
    kv.free(1)
    kv.check_invariants()
    assert kv.pool.num_free_blocks == 3 and kv.pool.ref_count(scratch) == 1


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / append / fork (prefix share) / free sequences: accounting stays exact."""

    def __init__(self):
        super().__init__()
        self.kv = _manager(num_blocks=12, block_size=2)
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0

    @rule(n=st.integers(1, 9), vocab=st.integers(2, 4))
    def new_sequence(self, n, vocab):
        sid = self.next_id
        self.next_id += 1
        toks = [(sid * 7 + i) % vocab for i in range(n)]
        cached = self.kv.match_prefix(sid, toks)
        assert cached % 2 == 0 and cached < n
        if self.kv.allocate(sid, n):
            self.kv.commit(sid, toks, n)
            self.tokens[sid] = toks
        else:
            self.kv.free(sid)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        sid = self.next_id
        self.next_id += 1
        toks = list(self.tokens[parent]) + [1]
        cached = self.kv.match_prefix(sid, toks)
        # the parent's full blocks are shared, except where equal content was first
        # registered by a block that has since been evicted
        assert cached % 2 == 0 and cached <= (len(toks) - 1) // 2 * 2
        if self.kv.allocate(sid, len(toks)):
            self.kv.commit(sid, toks, len(toks))
            self.tokens[sid] = toks
        else:
            self.kv.free(sid)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), k=st.integers(1, 3))
    def append(self, data, k):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        toks = self.tokens[sid] + [0] * k
        if self.kv.allocate(sid, len(toks)):
            self.kv.commit(sid, toks, len(toks))
            self.tokens[sid] = toks

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(sid)
        del self.tokens[sid]

    @invariant()
    def accounting_is_exact(self):
        self.kv.pool.check_invariants()
        refs = {}
        for sid in self.tokens:
            table = self.kv.block_table(sid)
            assert len(table) == -(-len(self.tokens[sid]) // 2)
            assert len(set(table)) == len(table)
            for b in table:
                refs[b] = refs.get(b, 0) + 1
        for b in range(12):
            assert self.kv.pool.ref_count(b) == refs.get(b, 0)  # no leak, no phantom owner
        assert self.kv.pool.num_free_blocks == 12 - len(refs)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=40), st.integers(1, 8))
@settings(max_examples=50, deadline=None)
def test_equal_prefixes_share_blocks(tokens, block_size):
    kv = _manager(num_blocks=64, block_size=block_size)
    assert kv.match_prefix(0, tokens) == 0
    assert kv.allocate(0, len(tokens))
    kv.commit(0, tokens, len(tokens))
    cached = kv.match_prefix(1, tokens + [3])
    assert cached == len(tokens) // block_size * block_size
    assert kv.block_table(1) == kv.block_table(0)[: cached // block_size]


_OPTIMIZED = """
from afkv.errors import BlockOwnershipError, TierAccountingError
from afkv.kv.block_pool import BlockPool, chain_hash
from afkv.kv.formats import RawFormat
from afkv.kv.layout import KVLayout
from afkv.kv.tiers.host import HostTier
import pytest
import torch
assert False, "python -O strips asserts: this line must not run"
pool = BlockPool(2)
[b] = pool.allocate(1)
pool.release([b])
try:
    pool.release([b])
except BlockOwnershipError as e:
    print("pool:", e)
host = HostTier(RawFormat(KVLayout(1, 1, 2, 2, torch.float32)), 2, "lru", pin_memory=False)
host.reserve(chain_hash(None, [1]), loading=False)
try:
    host.reserve(chain_hash(None, [1]), loading=False)
except TierAccountingError as e:
    print("host:", e)
"""


def test_invariants_that_guard_data_are_typed_errors_even_under_python_O():
    """Block ownership and tier accounting raise KVError subclasses, which `python -O` keeps
    (it strips asserts): a double free, a sequence admitted twice, a host entry reserved twice."""
    from afkv.errors import BlockOwnershipError, KVError

    kv = _manager()
    kv.match_prefix(0, [1, 2, 3])
    assert kv.allocate(0, 3)
    with pytest.raises(BlockOwnershipError, match="admitted twice"):
        kv.match_prefix(0, [1, 2, 3])
    block = kv.block_table(0)[0]
    kv.free(0)
    with pytest.raises(BlockOwnershipError, match=f"double free of block {block}"):
        kv.pool.release([block])
    assert issubclass(BlockOwnershipError, KVError)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-O", "-c", _OPTIMIZED], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert "pool: double free of block 0" in child.stdout and "host: host entry" in child.stdout, child.stdout
