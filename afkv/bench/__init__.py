"""Benchmarks (`afkv bench ...`): each prints a table and writes JSON. Every figure is
reported next to a baseline measured in the same run. RESULTS.md keeps the runs' figures.

    decode.py   afkv vs transformers' generate: decode tokens/s and TTFT per batch size
    kv.py       KV tier bandwidths against the copy limit; decode with tiers off / on
    af.py       1A1F over NCCL vs colocated data parallel on two GPUs (real shapes)
"""
