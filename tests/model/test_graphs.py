"""CPU-side logic of the decode CUDA graphs: buckets, decode-only rows through micro-batches."""

import torch

from afkv.engine.runner import ChunkPlan, ModelRunner, SampleSpec
from afkv.model.graphs import default_buckets
from afkv.model.model import split_micro_batches


def test_buckets_cover_every_batch():
    for n in (1, 7, 16, 100, 300, 512):
        b = default_buckets(n)
        assert b[-1] == n and b == sorted(set(b)) and b[0] == 1
        assert all(any(x >= k for x in b) for k in range(1, n + 1))  # every batch has a bucket


def _plan(lengths, start=5):
    greedy = SampleSpec(0.0, 0, 1.0, 0, 0, None)
    return [ChunkPlan(i, tuple(range(n)), start, tuple(range(4 * i, 4 * i + 4)), greedy) for i, n in enumerate(lengths)]


def test_decode_only_step_marks_every_row_and_micro_batches_keep_it():
    runner = ModelRunner(model=None, kv=None, block_size=4, device=torch.device("cpu"))
    inputs = runner._inputs(_plan([1, 1, 1, 1, 1]))
    d = inputs.decode
    assert d.every_row and d.rows.tolist() == [0, 1, 2, 3, 4]
    for mb in split_micro_batches(inputs, 2):
        assert mb.decode.every_row and mb.decode.rows.tolist() == list(range(mb.token_ids.numel()))
    mixed = runner._inputs(_plan([1, 3, 1]))  # a prefill chunk among decode rows: rows are not 0..B-1
    assert not mixed.decode.every_row and mixed.decode.rows.tolist() == [0, 4]
