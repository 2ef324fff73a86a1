"""Benchmarks (`afkv bench ...`): each prints a table and writes JSON. Every figure is
reported next to a baseline measured in the same run.

    decode.py   afkv vs transformers' generate: decode tokens/s and TTFT per batch size
"""
