"""The tiers below the device pool (loop-thread bookkeeping; bytes moved by worker and I/O threads).

    config.py   TierConfig: formats, sizes, eviction policy, prefetch depth, I/O threads
    policy.py   eviction order: LRUOrder, FIFOOrder
    copier.py   Copier: device <-> host copy batches on the model worker (CUDA: copy stream,
                pinned memory, events); Fence; InlineExecutor
    host.py     HostTier: slots of one host buffer, keyed by block hash
    fileio.py   PosixFileIO | KvikioFileIO (GPU machines): block file reads and writes
    disk.py     DiskTier: one file per block, crc32 per block, msgpack index, private directory
    stack.py    TierStack: the only code that moves bytes between tiers (demote, promote,
                spill, fetch), submitted at flush and collected at poll
    loader.py   TierLoader: a sequence's matched prefix brought up from host or disk, settled
                where a read failed; NoTiers, the same calls for a device-only cache
Imports afkv.kv.{layout, block_pool, formats, metrics}, afkv.ops and afkv.errors.
"""
