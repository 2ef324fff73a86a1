"""The paged KV cache of an attention node, and the tiers below the device.

    layout.py      KVLayout | LatentLayout (MLA): block geometry and bytes (frozen specs)
    checks.py      owned / accounted: invariants that guard data raise typed errors
    block_pool.py  BlockPool: the only owner of free blocks, ref counts and the prefix-hash map
                   of the device tier; chain_hashes, the one place block hashes are computed
    formats.py     BlockFormat: a block as one row of bytes (none | fp8 | int8 | int4; MLA latents too)
    device.py      the device tier: PlainDevice (the cache in the model dtype) or
                   QuantizedDevice (quantized rows plus full-precision staging blocks for each
                   sequence's most recent tokens); owns the tensors attention reads
    pruning.py     KVPruning (StreamingLLM, H2O) and PruningState, its per-sequence state
    stream.py      contexts larger than the device: StreamStore (the middle of long sequences
                   in pinned host memory, layer-major; NoStream when off) and StreamRing /
                   StreamStep (the device staging ring attention streams it through, layer
                   by layer, on a copy stream)
    pinned.py      PinnedRegion: page-locked host memory of exactly the size asked for (the
                   stream store's; torch's pinned allocator rounds up to a power of two)
    tiers/         host memory and disk below the device, every move between tiers, and
                   loading a matched prefix from them (TierLoader; NoTiers when device only)
    metrics.py     KVMetrics: counters, occupancy and latency; frozen snapshots
    manager.py     KVManager: prefix matching and the only owner of per-sequence block tables;
                   asks the pool for blocks, the device tier, the lower tiers, the pruning
                   state and the stream store for the rest

    device pool (BlockPool, kv tensor)     L1   <- attention reads here
         | demote on slot reuse  ^ promote
    host tier (pinned buffer)              L2
         | write-through         ^ fetch (prefetch ahead of admission)
    disk tier (files + msgpack index)      L3   the last tier: LRU files are deleted

    stream store (pinned, layer-major)     beside L2: a running sequence's middle; each step
         | spill as it leaves the window   ^ streamed per layer into the staging ring

A block is block_size tokens x all layers (K and V, or MLA latents), contiguous, so that it moves
between tiers as one transfer: kv[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
(KVLayout) or kv[num_blocks, num_layers, block_size, kv_lora_rank + rope_dim] (LatentLayout).
Block identity in every tier is the chained hash of its tokens (block_pool.chain_hashes).
Imports afkv.model (specs), afkv.ops and afkv.errors only.
"""
