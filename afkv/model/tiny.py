"""Tiny random Hugging Face checkpoints of each supported family, for tests and CI, and a
Mixtral whose routers prefer experts by a Zipf law (`write_zipf_checkpoint`: EPLB tests and
`afkv bench eplb`).

Written through transformers' own config and model classes (`pip install transformers`),
so the files are exactly what a real checkpoint of that family looks like.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FAMILIES = ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str, **overrides):
    try:
        import transformers
    except ImportError as exc:  # transformers is a test dependency, not a runtime one
        raise RuntimeError("writing tiny checkpoints needs transformers: pip install 'afkv[test]'") from exc
    if family == "llama":
        cfg = transformers.LlamaConfig(**_COMMON, intermediate_size=96)
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(**_COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            **_COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
        )
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **_COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, head_dim=16,
        )
    elif family in ("deepseek_v2", "deepseek_v3"):
        # odd shapes: 5 heads, kv rank 40, q rank 24, nope/rope/value 12/6/10; the first layer dense;
        # YaRN as the released configs state it (factor 40 there), mscale != mscale_all_dim in V3
        def yarn(mscale: float, mscale_all_dim: float) -> dict:
            return {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
                                        "mscale": mscale, "mscale_all_dim": mscale_all_dim}}

        common = {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}
        mla = dict(num_attention_heads=5, num_key_value_heads=5, kv_lora_rank=40, qk_nope_head_dim=12,
                   qk_rope_head_dim=6, v_head_dim=10, intermediate_size=96, moe_intermediate_size=24,
                   first_k_dense_replace=1, n_shared_experts=2)
        if family == "deepseek_v2":  # V2-Lite's routing: plain q, softmax, greedy, no renormalisation
            cfg = transformers.DeepseekV2Config(**common | mla | {"hidden_size": 60}, q_lora_rank=None, n_routed_experts=8,
                                                num_experts_per_tok=3, topk_method="greedy", norm_topk_prob=False,
                                                routed_scaling_factor=1.5, **yarn(0.707, 0.707))
        else:  # V3's: q_lora, sigmoid + correction bias, 4 groups of 3, the best 2 groups, top-3
            cfg = transformers.DeepseekV3Config(**common | mla, q_lora_rank=24, n_routed_experts=12,
                                                num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
                                                routed_scaling_factor=2.5, rope_interleave=True, **yarn(1.0, 0.8))
    else:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def write_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0, std: float = 0.08, **overrides) -> Path:
    """Write config.json + model.safetensors of a random `family` model; returns out_dir.

    Weights are N(0, std^2) (norm weights 1 + N(0, std^2)) so that logits and routing are
    far from ties: greedy tokens then compare cleanly against transformers.
    """
    import torch
    import transformers

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: a bias that changes which experts win
                b.copy_(0.05 * torch.randn_like(b))
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


_GATE = "model.layers.{}.block_sparse_moe.gate.weight"


def write_zipf_checkpoint(out_dir: str | Path, exponent: float = 1.0, seed: int = 0, *, num_experts: int = 8,
                          num_layers: int = 3, hidden_size: int = 64, intermediate_size: int = 48,
                          top_k: int = 2, noise_std: float = 1.3, router_bias: torch.Tensor | None = None) -> Path:
    """A random Mixtral checkpoint whose router logits are about zipf_router_bias(E, exponent)
    plus per-token noise, so experts are picked with Zipf-like popularity.

    A random model has no router bias term, so one is built in: embedding channel 0 is a
    constant, which reaches every router input; router column 0 turns it into the bias.
    The other router columns are made orthogonal to the mean router input (no common
    preference) and scaled to give logit noise of `noise_std` per token. Means are measured
    with transformers on random tokens, layer by layer. Layer i's bias uses seed*1000 + i;
    `router_bias` [layers, experts] (log popularity) replaces the Zipf biases when given.
    Needs transformers (the `test` extra)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    from afkv.eplb import zipf_router_bias

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
        bias = (zipf_router_bias(num_experts, exponent, seed * 1000 + layer) if router_bias is None
                else router_bias[layer].float())  # [E]
        gate[:, 1:] = w
        gate[:, 0] = (bias - bias.mean()) / x[:, 0].mean() - (w @ mean) / x[:, 0].mean()
    save_file(tensors, path, metadata={"format": "pt"})
    return Path(out)
