"""The paged KV cache of an attention node.

    layout.py      KVLayout: block geometry and bytes (frozen spec)
    block_pool.py  BlockPool: the only owner of free blocks, ref counts and the prefix-hash map
    manager.py     KVManager: the only owner of per-sequence block tables; asks the pool
                   for blocks; owns the device tensor the attention kernels read

A block is block_size tokens x all layers (K and V), contiguous, so that it moves between
tiers as one transfer: kv[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].
Imports afkv.model (specs) and afkv.ops only.
"""
