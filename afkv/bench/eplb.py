"""`afkv bench eplb`: expert load balancing under Zipf-skewed routing, CPU processes.

A synthetic Mixtral checkpoint whose routers prefer experts by a Zipf law
(`write_zipf_checkpoint`) is served by one attention node (this process) and N expert
nodes (processes on loopback), twice in the same run:

    no EPLB   contiguous shards, no replicas (the baseline)
    EPLB      slots_per_node spare slots; after a warm-up the coordinator rebalances
              from the measured load statistics, then the same batch is decoded again

For each: max / mean tokens per expert node (measured by the expert nodes' load windows
over the measured phase) and decode tokens/s; ratios are against the baseline of the same
run. Greedy tokens of both runs are compared (they must be equal).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from afkv.eplb import zipf_router_bias

_GATE = "model.layers.{}.block_sparse_moe.gate.weight"


def write_zipf_checkpoint(out_dir: str | Path, exponent: float = 1.0, seed: int = 0, *, num_experts: int = 8,
                          num_layers: int = 3, hidden_size: int = 64, intermediate_size: int = 48,
                          top_k: int = 2, noise_std: float = 1.3) -> Path:
    """A random Mixtral checkpoint whose router logits are about zipf_router_bias(E, exponent)
    plus per-token noise, so experts are picked with Zipf-like popularity.

    A random model has no router bias term, so one is built in: embedding channel 0 is a
    constant, which reaches every router input; router column 0 turns it into the bias.
    The other router columns are made orthogonal to the mean router input (no common
    preference) and scaled to give logit noise of `noise_std` per token. Means are measured
    with transformers on random tokens, layer by layer. Layer i's bias uses seed*1000 + i.
    Needs transformers (the `test` extra)."""
    import transformers
    from safetensors.torch import load_file, save_file

    from afkv.model.tiny import write_tiny_checkpoint

    out = write_tiny_checkpoint("mixtral", out_dir, seed=seed, num_local_experts=num_experts,
                                num_hidden_layers=num_layers, hidden_size=hidden_size,
                                intermediate_size=intermediate_size, num_experts_per_tok=top_k)
    path = Path(out) / "model.safetensors"
    tensors = load_file(path)
    embed = tensors["model.embed_tokens.weight"]  # [V, H]
    embed[:, 0] = embed[:, 1:].pow(2).mean().sqrt() * 8  # a constant channel, several times the others' RMS
    tokens = torch.randint(3, embed.shape[0], (16, 48), generator=torch.Generator().manual_seed(seed))
    for layer in range(num_layers):
        save_file(tensors, path, metadata={"format": "pt"})
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        seen = []
        norm = model.model.layers[layer].post_attention_layernorm
        hook = norm.register_forward_hook(lambda mod, inp, outp: seen.append(outp.detach()))
        with torch.no_grad():
            model(tokens)
        hook.remove()
        x = seen[0].reshape(-1, hidden_size)  # [N, H] router inputs
        gate = tensors[_GATE.format(layer)]  # [E, H]
        rest = x[:, 1:]  # [N, H-1]
        mean = rest.mean(0)  # [H-1]
        unit = mean / mean.norm()
        w = gate[:, 1:] - (gate[:, 1:] @ unit)[:, None] * unit[None, :]  # [E, H-1] no common preference
        noise = (rest - mean) @ w.T  # [N, E]
        w = w * (noise_std / noise.std(0).clamp_min(1e-6))[:, None]
        bias = zipf_router_bias(num_experts, exponent, seed * 1000 + layer)  # [E]
        gate[:, 1:] = w
        gate[:, 0] = (bias - bias.mean()) / x[:, 0].mean() - (w @ mean) / x[:, 0].mean()
    save_file(tensors, path, metadata={"format": "pt"})
    return Path(out)
