"""The paged KV cache of an attention node, and the tiers below the device.

    layout.py      KVLayout | LatentLayout (MLA): block geometry and bytes (frozen specs)
    block_pool.py  BlockPool: the only owner of free blocks, ref counts and the prefix-hash map
                   of the device tier
    formats.py     BlockFormat: a block as one row of bytes (none | fp8 | int8 | int4; MLA latents too)
    device.py      DeviceQuant: a device tier of quantized rows plus full-precision staging
                   blocks for each sequence's most recent tokens
    tiers/         host memory and disk below the device, and every move between tiers
    metrics.py     KVMetrics: counters, occupancy and latency; frozen snapshots
    manager.py     KVManager: the only owner of per-sequence block tables; asks the pool for
                   blocks and the tier stack for moves; owns the device tensor the attention
                   kernels read

    device pool (BlockPool, kv tensor)     L1   <- attention reads here
         | demote on slot reuse  ^ promote
    host tier (pinned buffer)              L2
         | write-through         ^ fetch (prefetch ahead of admission)
    disk tier (files + msgpack index)      L3   the last tier: LRU files are deleted

A block is block_size tokens x all layers (K and V, or MLA latents), contiguous, so that it moves
between tiers as one transfer: kv[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
(KVLayout) or kv[num_blocks, num_layers, block_size, kv_lora_rank + rope_dim] (LatentLayout).
Block identity in every tier is the chained hash of its tokens (block_pool.chain_hash).
Imports afkv.model (specs), afkv.ops and afkv.errors only.
"""
