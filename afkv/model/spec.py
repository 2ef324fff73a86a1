"""ModelSpec: what afkv needs to know about a checkpoint, parsed once from config.json.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE, and dense Llama (the one-expert case).
An `UpcycleSpec` turns a dense Llama into an MoE (the embedded default model).
Checkpoints may store their linear weights in FP8 with block scales (DeepSeek-V3's format:
quantization_config {"quant_method": "fp8", "weight_block_size": [128, 128]}); `fp8_block`
records the block. `expert_dtype` is how a deployment holds the routed experts: "auto" (the
model dtype) or "fp8" (afkv.ops.fp8: e4m3, 128 x 128 block scales).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from afkv.errors import CheckpointError, ConfigError, UnsupportedModelError

EXPERT_DTYPES = ("auto", "fp8")


class Family(str, Enum):
    LLAMA = "llama"
    MIXTRAL = "mixtral"
    QWEN2_MOE = "qwen2_moe"
    QWEN3_MOE = "qwen3_moe"


_ARCHITECTURES = {
    "LlamaForCausalLM": Family.LLAMA,
    "MixtralForCausalLM": Family.MIXTRAL,
    "Qwen2MoeForCausalLM": Family.QWEN2_MOE,
    "Qwen3MoeForCausalLM": Family.QWEN3_MOE,
}


@dataclass(frozen=True)
class UpcycleSpec:
    """Sparse upcycling of a dense MLP into `num_experts` experts (Komatsuzaki et al. 2022).

    Every expert is the dense MLP (the same tensors, never copied); a router with
    weights drawn from N(0, router_std^2) by a generator seeded with `router_seed`
    picks `top_k` experts per token; the top-k weights are renormalised to sum to
    one (Mixtral routing). Hence sum_k w_k * MLP(x) = MLP(x): the MoE layer equals
    the dense layer for every routing decision, while tokens still spread over
    experts as in a real MoE. configs/default-model.toml documents the defaults.
    """

    num_experts: int = 8
    top_k: int = 2
    router_seed: int = 0
    router_std: float = 0.02

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"upcycle needs 1 <= top_k <= num_experts, got {self.top_k}, {self.num_experts}")


@dataclass(frozen=True)
class ModelSpec:
    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    intermediate_size: int  # dense MLP width
    num_experts: int  # 0: dense model
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int  # 0: none
    sparse_layers: tuple[bool, ...]  # per layer: MoE (True) or dense MLP (False)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    upcycle: UpcycleSpec | None = None
    fp8_block: tuple[int, int] | None = None  # the checkpoint's FP8 weight blocks (rows, cols); None: no FP8
    expert_dtype: str = "auto"  # routed experts held as: auto (the model dtype) | fp8
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return any(self.sparse_layers)

    def num_routed_experts(self, layer: int) -> int:
        """Experts the router of `layer` chooses from (1 for a dense layer)."""
        if self.sparse_layers[layer]:
            return self.num_experts
        return self.upcycle.num_experts if self.upcycle else 1

    def layer_top_k(self, layer: int) -> int:
        if self.sparse_layers[layer]:
            return self.top_k
        return self.upcycle.top_k if self.upcycle else 1

    def layer_has_router(self, layer: int) -> bool:
        return self.sparse_layers[layer] or self.upcycle is not None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def with_upcycle(self, upcycle: UpcycleSpec) -> "ModelSpec":
        if self.family is not Family.LLAMA:
            raise UnsupportedModelError(f"upcycling applies to dense Llama models, not {self.family.value}")
        from dataclasses import replace

        return replace(self, upcycle=upcycle)

    def with_expert_dtype(self, expert_dtype: str) -> "ModelSpec":
        """The same model with its routed experts held as `expert_dtype` (auto | fp8)."""
        from dataclasses import replace

        if expert_dtype not in EXPERT_DTYPES:
            raise ConfigError(f"expert_dtype must be one of {', '.join(EXPERT_DTYPES)}, got {expert_dtype!r}")
        if expert_dtype == "fp8" and not any(self.sparse_layers):
            raise UnsupportedModelError(f"{self.extra.get('source', 'this model')}: expert_dtype fp8 applies to the "
                                        "routed experts of MoE checkpoints, and this one has none")
        return replace(self, expert_dtype=expert_dtype)


def load_spec(model_dir: str | Path) -> ModelSpec:
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"no config.json in {model_dir}: not a Hugging Face checkpoint directory") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return spec_from_hf_config(cfg, source=str(path))


def _rope_theta(cfg: dict, source: str) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise UnsupportedModelError(f"{source}: rope type {rope_type!r} is not supported (only default RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def fp8_block(cfg: dict, source: str = "config.json") -> tuple[int, int] | None:
    """The FP8 weight block of a checkpoint's quantization_config; None when it has none.
    Only block-scaled e4m3 (DeepSeek-V3's format) is supported."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise UnsupportedModelError(f"{source}: quantization method {method!r} is not supported (only fp8 with "
                                    "block scales)")
    if q.get("fmt", "e4m3") != "e4m3":
        raise UnsupportedModelError(f"{source}: fp8 format {q.get('fmt')!r} is not supported (only e4m3)")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UnsupportedModelError(f"{source}: fp8 without weight_block_size [rows, cols] (per-tensor scales) is "
                                    "not supported")
    return block[0], block[1]


def spec_from_hf_config(cfg: dict, source: str = "config.json") -> ModelSpec:
    archs = cfg.get("architectures") or []
    family = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
    if family is None:
        model_type = cfg.get("model_type")
        family = next((f for f in Family if f.value == model_type), None)
    if family is None:
        supported = ", ".join(sorted(_ARCHITECTURES))
        raise UnsupportedModelError(f"{source}: architecture {archs or cfg.get('model_type')} is not supported; supported: {supported}")
    try:
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        num_layers = int(cfg["num_hidden_layers"])
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        vocab = int(cfg["vocab_size"])
        intermediate = int(cfg.get("intermediate_size") or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: missing or invalid field {exc}") from exc

    num_experts, top_k, moe_inter, shared_inter, norm_topk = 0, 1, 0, 0, True
    sparse = [False] * num_layers
    if family is Family.MIXTRAL:
        num_experts = int(cfg.get("num_local_experts", 8))
        top_k = int(cfg.get("num_experts_per_tok", 2))
        moe_inter = intermediate
        sparse = [True] * num_layers
    elif family in (Family.QWEN2_MOE, Family.QWEN3_MOE):
        num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        top_k = int(cfg.get("num_experts_per_tok", 1))
        moe_inter = int(cfg.get("moe_intermediate_size", intermediate))
        norm_topk = bool(cfg.get("norm_topk_prob", False))
        if family is Family.QWEN2_MOE:
            shared_inter = int(cfg.get("shared_expert_intermediate_size", 0))
        step = int(cfg.get("decoder_sparse_step", 1))
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        sparse = [(i not in mlp_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]
    if family is Family.LLAMA and (cfg.get("mlp_bias") or cfg.get("attention_bias")):
        raise UnsupportedModelError(f"{source}: Llama with attention_bias/mlp_bias is not supported")
    if family is Family.QWEN2_MOE and cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: Qwen2-MoE with use_sliding_window is not supported")
    if family is Family.QWEN3_MOE and cfg.get("attention_bias"):
        raise UnsupportedModelError(f"{source}: Qwen3-MoE with attention_bias is not supported")

    sliding = cfg.get("sliding_window") if family is Family.MIXTRAL else None
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelSpec(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg, source),
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family is Family.QWEN2_MOE and bool(cfg.get("qkv_bias", True)),
        qk_norm=family is Family.QWEN3_MOE,
        sliding_window=int(sliding) if sliding else None,
        intermediate_size=intermediate,
        num_experts=num_experts,
        top_k=top_k,
        moe_intermediate_size=moe_inter,
        norm_topk_prob=norm_topk,
        shared_expert_intermediate_size=shared_inter,
        sparse_layers=tuple(sparse),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        fp8_block=fp8_block(cfg, source),
        extra={"source": source},
    )
