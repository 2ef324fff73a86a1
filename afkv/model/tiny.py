"""Tiny random Hugging Face checkpoints of each supported family, for tests and CI.

Written through transformers' own config and model classes (`pip install transformers`),
so the files are exactly what a real checkpoint of that family looks like.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "mixtral", "qwen2_moe", "qwen3_moe")

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
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
