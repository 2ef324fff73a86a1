"""DeviceQuant: a device tier that stores full blocks as quantized rows (fp8 / int8 / int4,
afkv.kv.formats) and keeps each sequence's most recent tokens in full-precision staging blocks.

    new tokens  -> staging block (full precision; written by attention)
    block full and out of the window -> quantized into its device row (a worker job, ordered
                                         with the steps), staging block freed
    attention   -> quantized rows (read in place by the kernels) + the staging tail

A sequence's staging blocks are the last blocks of its table: its partial block plus the full
blocks whose last token is among its `fp_window` most recent tokens. Between steps that is at
most ceil(fp_window / block_size) + 1 blocks, and a step adds at most ceil(n / block_size)
per sequence computing n tokens: `staging_blocks_needed` sizes the staging pool for the worst
case, so growing a table never waits for a staging block. One staging block more is the
scratch block of CUDA graphs (padding rows of a captured decode step write and read it).
"""

from __future__ import annotations

from dataclasses import dataclass

from afkv.kv.formats import LatentQuantFormat, QuantFormat


@dataclass(frozen=True)
class DeviceQuant:
    format: QuantFormat | LatentQuantFormat  # how the device tier stores a full block
    fp_window: int  # tokens kept in full precision beyond the partial block
    num_staging_blocks: int

    def __post_init__(self) -> None:
        assert self.fp_window >= 0 and self.num_staging_blocks > 1

    @property
    def max_tail_blocks(self) -> int:
        """Most staging blocks at the end of a decode row's table (its fixed tail bound)."""
        return -(-self.fp_window // self.format.layout.block_size) + 1


def staging_blocks_needed(block_size: int, fp_window: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Staging blocks for the worst case: every running sequence with a full window and a
    partial block, plus a step's new blocks (one partial block per sequence at most), plus
    the scratch block of CUDA graphs."""
    window_blocks = -(-fp_window // block_size) + 1
    return max_num_seqs * (window_blocks + 1) + -(-max_num_batched_tokens // block_size) + 1
