"""Random weights in real model shapes, generated on the device (benchmarks: nothing can be
downloaded there, and writing a 60 GB checkpoint first would take longer than the run).

`random:<name>` names a model: `random:qwen3-30b-a3b`, `random:mixtral-8x7b`,
`random:deepseek-v2-lite`, `random:deepseek-v3-8l` (DeepSeek-V3's config cut to its first 8
layers: the 3 dense ones and 5 MoE layers; 56 GB of routed experts in fp8),
`random:qwen3-30b-a3b-16e` (Qwen3-30B-A3B with 16 of its 128 experts per layer: every
attention and KV shape real, 48 layers x 4 KV heads x 128, 96 KiB of bf16 KV per token, in
10 GB of weights, so that several nodes fit one GPU: the PD hand-off benchmark). Every tensor
is drawn by a generator seeded from its name, so every process (attention node, expert
nodes, the colocated baseline) builds identical weights without exchanging any.
"""

from __future__ import annotations

import hashlib

import torch

from afkv.errors import CheckpointError
from afkv.model.spec import Family, ModelSpec, spec_from_hf_config

PREFIX = "random:"

REAL_SHAPES: dict[str, dict] = {
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "eos_token_id": 151645,
    },
    "qwen3-30b-a3b-16e": {
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 16,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "eos_token_id": 151645,
    },
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
        "eos_token_id": 2,
    },
    "deepseek-v2-lite": {  # deepseek-ai/DeepSeek-V2-Lite's config.json
        "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400, "hidden_size": 2048,
        "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001,
    },
    "deepseek-v3-8l": {  # deepseek-ai/DeepSeek-V3's config.json, 8 of its 61 layers (weights random, not fp8)
        "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280, "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 8,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "num_experts_per_tok": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
        "n_group": 8, "topk_group": 4, "scoring_func": "sigmoid", "norm_topk_prob": True,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    },
}


def is_random(model: str | None) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def random_spec(model: str) -> ModelSpec:
    name = model.removeprefix(PREFIX)
    if name not in REAL_SHAPES:
        raise CheckpointError(f"unknown random model {name!r}; choose from {', '.join(REAL_SHAPES)}")
    return spec_from_hf_config(REAL_SHAPES[name], source=model)


class RandomCheckpoint:
    """The CheckpointReader interface over generated tensors with Hugging Face names."""

    fp8_block = None  # stores no FP8 weights: FFNSide quantizes FP8 experts at load

    def __init__(self, spec: ModelSpec, std: float = 0.02):
        self.spec, self.std = spec, std
        self._shapes = _hf_shapes(spec)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's Hugging Face name -> shape."""
        return dict(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def keys(self) -> list[str]:
        return list(self._shapes)

    def get(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        shape = self._shapes.get(name)
        if shape is None:
            raise CheckpointError(f"tensor {name!r} is not part of {self.spec.extra.get('source')}")
        seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
        gen = torch.Generator(device=device).manual_seed(seed)
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * self.std
        if name.endswith("norm.weight"):
            t += 1.0
        return t.to(dtype or torch.float32)

    def close(self) -> None:
        pass


def _hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    h, d = spec.hidden_size, spec.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if spec.mla is not None:
            out |= _mla_shapes(spec, a)
        else:
            out |= {a + "q_proj.weight": (spec.num_heads * d, h), a + "k_proj.weight": (spec.num_kv_heads * d, h),
                    a + "v_proj.weight": (spec.num_kv_heads * d, h), a + "o_proj.weight": (h, spec.num_heads * d)}
        if spec.qk_norm:
            out |= {a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)}
        if spec.sparse_layers[i]:
            m = p + ("block_sparse_moe." if spec.family is Family.MIXTRAL else "mlp.")
            out[m + "gate.weight"] = (spec.num_experts, h)
            if spec.router is not None and spec.router.has_correction_bias:
                out[m + "gate.e_score_correction_bias"] = (spec.num_experts,)
            names = ("w1", "w3", "w2") if spec.family is Family.MIXTRAL else ("gate_proj", "up_proj", "down_proj")
            inter = spec.moe_intermediate_size
            for e in range(spec.num_experts):
                out |= {f"{m}experts.{e}.{names[0]}.weight": (inter, h), f"{m}experts.{e}.{names[1]}.weight": (inter, h),
                        f"{m}experts.{e}.{names[2]}.weight": (h, inter)}
            if spec.shared_expert_intermediate_size:
                s = m + ("shared_expert." if spec.shared_expert_gated else "shared_experts.")
                inter = spec.shared_expert_intermediate_size
                out |= {s + "gate_proj.weight": (inter, h), s + "up_proj.weight": (inter, h),
                        s + "down_proj.weight": (h, inter)}
                if spec.shared_expert_gated:
                    out[m + "shared_expert_gate.weight"] = (1, h)
        else:
            inter = spec.intermediate_size
            out |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                    p + "mlp.down_proj.weight": (h, inter)}
    return out


def _mla_shapes(spec: ModelSpec, a: str) -> dict[str, tuple[int, ...]]:
    mla, h, heads = spec.mla, spec.hidden_size, spec.num_heads
    out = {a + "kv_a_proj_with_mqa.weight": (mla.latent_dim, h), a + "kv_a_layernorm.weight": (mla.kv_lora_rank,),
           a + "kv_b_proj.weight": (heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank),
           a + "o_proj.weight": (h, heads * mla.v_head_dim)}
    if mla.q_lora_rank:
        out |= {a + "q_a_proj.weight": (mla.q_lora_rank, h), a + "q_a_layernorm.weight": (mla.q_lora_rank,),
                a + "q_b_proj.weight": (heads * mla.qk_head_dim, mla.q_lora_rank)}
    else:
        out[a + "q_proj.weight"] = (heads * mla.qk_head_dim, h)
    return out
