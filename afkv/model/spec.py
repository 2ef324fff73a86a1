"""ModelSpec: what afkv needs to know about a checkpoint, parsed once from config.json.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE, dense Llama (the one-expert case), and DeepSeek-V2 /
V3 (multi-head latent attention: `MLASpec`; grouped routing: `RouterSpec`; YaRN: `YarnSpec`).
An `UpcycleSpec` turns a dense Llama into an MoE (the embedded default model).
Checkpoints may store their linear weights in FP8 with block scales (DeepSeek-V3's format:
quantization_config {"quant_method": "fp8", "weight_block_size": [128, 128]}); `fp8_block`
records the block. `expert_dtype` is how a deployment holds the routed experts: "auto" (the
model dtype) or "fp8" (afkv.ops.fp8: e4m3, 128 x 128 block scales).
"""

from __future__ import annotations

import json
import math
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
    DEEPSEEK_V2 = "deepseek_v2"
    DEEPSEEK_V3 = "deepseek_v3"


_ARCHITECTURES = {
    "LlamaForCausalLM": Family.LLAMA,
    "MixtralForCausalLM": Family.MIXTRAL,
    "Qwen2MoeForCausalLM": Family.QWEN2_MOE,
    "Qwen3MoeForCausalLM": Family.QWEN3_MOE,
    "DeepseekV2ForCausalLM": Family.DEEPSEEK_V2,
    "DeepseekV3ForCausalLM": Family.DEEPSEEK_V3,
}


@dataclass(frozen=True)
class YarnSpec:
    """YaRN rotary scaling (Peng et al. 2023) as DeepSeek's configs state it (`rope_scaling`
    type "yarn"): frequencies between interpolation and extrapolation by a ramp over the
    rotary dimensions; cos/sin times `attention_factor`; the softmax scale times
    mscale(factor, mscale_all_dim)^2 (MLASpec.softmax_scale)."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # None: mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    truncate: bool = True

    @staticmethod
    def get_mscale(factor: float, mscale: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    @property
    def cos_sin_factor(self) -> float:
        """What cos and sin are multiplied by."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.get_mscale(self.factor, self.mscale) / self.get_mscale(self.factor, self.mscale_all_dim)
        return self.get_mscale(self.factor)

    def correction_range(self, dim: int, theta: float) -> tuple[float, float]:
        """Rotary pair indexes [low, high] between which the ramp runs (YaRN's correction range)."""
        def find(num_rotations: float) -> float:
            return dim * math.log(self.original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = find(self.beta_fast), find(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3). Per token and layer the cache holds one
    latent of kv_lora_rank + qk_rope_head_dim values (the RMS-normed compressed KV and the
    rotated shared key), no heads. Keys and values of head h are W_UK[h] c and W_UV[h] c
    (kv_b_proj's rows); queries come from q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj
    when q_lora_rank > 0 (V3)."""

    q_lora_rank: int  # 0: plain q_proj (V2-Lite)
    kv_lora_rank: int  # r: the compressed KV (512 in the released models)
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # rotary pairs (2i, 2i + 1), DeepSeek's layout; else (i, i + d/2)
    softmax_scale: float  # qk_head_dim^-0.5, times YaRN's mscale_all_dim factor squared

    @property
    def latent_dim(self) -> int:
        """Values cached per token and layer: the compressed KV, then the rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


ROUTER_SCORINGS = ("softmax", "sigmoid")
ROUTER_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class RouterSpec:
    """Top-k routing beyond softmax -> top-k (-> renormalise), which every other family uses:

    greedy                softmax scores, top-k (DeepSeek-V2-Lite)
    group_limited_greedy  softmax scores; keep the topk_groups groups (of num_groups of
                          consecutive experts) with the highest max score, top-k among them (V2)
    noaux_tc              sigmoid scores; choose with scores + e_score_correction_bias: keep the
                          topk_groups groups with the highest sum of their top-2, top-k among
                          them; weights are the chosen experts' scores without the bias (V3)

    Weights are renormalised to sum to one when `renormalize`, then multiplied by scaling_factor.
    """

    scoring: str
    method: str
    num_groups: int = 1
    topk_groups: int = 1
    scaling_factor: float = 1.0
    renormalize: bool = False

    @property
    def has_correction_bias(self) -> bool:
        return self.method == "noaux_tc"


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
    shared_expert_intermediate_size: int  # 0: none (DeepSeek: n_shared_experts x moe_intermediate_size)
    sparse_layers: tuple[bool, ...]  # per layer: MoE (True) or dense MLP (False)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    upcycle: UpcycleSpec | None = None
    fp8_block: tuple[int, int] | None = None  # the checkpoint's FP8 weight blocks (rows, cols); None: no FP8
    expert_dtype: str = "auto"  # routed experts held as: auto (the model dtype) | fp8
    shared_expert_gated: bool = True  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) x shared expert; DeepSeek: always on
    mla: MLASpec | None = None  # DeepSeek: multi-head latent attention (num_kv_heads, head_dim: HF's values, unused)
    router: RouterSpec | None = None  # None: softmax -> top-k (-> renormalise by norm_topk_prob)
    yarn: YarnSpec | None = None  # YaRN rotary scaling (DeepSeek)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return any(self.sparse_layers)

    @property
    def is_mla(self) -> bool:
        return self.mla is not None

    @property
    def rotary_dim(self) -> int:
        """Dimensions RoPE rotates per head: head_dim, or MLA's qk_rope_head_dim."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def num_expert_groups(self) -> int:
        """Groups of consecutive routed experts the router limits tokens to (EPLB's hierarchical
        policy packs whole groups); 1 without group-limited routing."""
        if self.router is not None and self.router.method != "greedy":
            return self.router.num_groups
        return 1

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
        """KV cache bytes per token (all layers) in a dtype of `dtype_bytes`, unquantized."""
        if self.mla is not None:
            return self.num_layers * self.mla.latent_dim * dtype_bytes
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


def _rope(cfg: dict, source: str, yarn_ok: bool) -> tuple[float, YarnSpec | None]:
    """(rope theta, YaRN scaling or None) from `rope_parameters` (transformers 5.x) or
    `rope_scaling` + `rope_theta` (the checkpoints' own config.json)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope_type in ("default", None):
        return theta, None
    if rope_type != "yarn" or not yarn_ok:
        supported = "default RoPE and YaRN (DeepSeek)" if yarn_ok else "only default RoPE"
        raise UnsupportedModelError(f"{source}: rope type {rope_type!r} is not supported ({supported})")
    try:
        orig = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        factor = params.get("factor") or int(cfg["max_position_embeddings"]) / int(orig)
        yarn = YarnSpec(
            factor=float(factor), original_max_position=int(orig),
            beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
            mscale=float(params.get("mscale") or 0.0), mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
            attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
            truncate=bool(params.get("truncate", True)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: YaRN rope scaling needs factor and original_max_position_embeddings "
                              f"({exc})") from exc
    return theta, yarn


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
    deepseek: dict = {}
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
    elif family in (Family.DEEPSEEK_V2, Family.DEEPSEEK_V3):
        num_experts = int(cfg.get("n_routed_experts") or 0)
        top_k = int(cfg.get("num_experts_per_tok") or 1)
        moe_inter = int(cfg.get("moe_intermediate_size") or 0)
        shared_inter = int(cfg.get("n_shared_experts") or 0) * moe_inter
        first_dense = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or 1)
        sparse = [num_experts > 0 and i >= first_dense and i % freq == 0 for i in range(num_layers)]
        deepseek = _deepseek_parts(cfg, family, source, num_experts, top_k)
        norm_topk = deepseek["router"].renormalize
    if family is Family.LLAMA and (cfg.get("mlp_bias") or cfg.get("attention_bias")):
        raise UnsupportedModelError(f"{source}: Llama with attention_bias/mlp_bias is not supported")
    if family is Family.QWEN2_MOE and cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: Qwen2-MoE with use_sliding_window is not supported")
    if family is Family.QWEN3_MOE and cfg.get("attention_bias"):
        raise UnsupportedModelError(f"{source}: Qwen3-MoE with attention_bias is not supported")

    sliding = cfg.get("sliding_window") if family is Family.MIXTRAL else None
    rope_theta, yarn = _rope(cfg, source, yarn_ok=bool(deepseek))
    if deepseek:
        mla: MLASpec = deepseek["mla"]
        scale = mla.qk_head_dim ** -0.5
        if yarn is not None and yarn.mscale_all_dim:
            scale *= YarnSpec.get_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
        deepseek["mla"] = MLASpec(**{**mla.__dict__, "softmax_scale": scale})
        head_dim, num_kv_heads = mla.qk_head_dim, num_heads  # HF's values; the cache holds latents
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
        rope_theta=rope_theta,
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
        shared_expert_gated=not deepseek,
        mla=deepseek.get("mla"),
        router=deepseek.get("router"),
        yarn=yarn,
        extra={"source": source},
    )


def _deepseek_parts(cfg: dict, family: Family, source: str, num_experts: int, top_k: int) -> dict:
    """MLASpec (softmax_scale filled in by the caller) and RouterSpec of a DeepSeek-V2/V3 config."""
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: DeepSeek with attention_bias/mlp_bias is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
    dims = {}
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{source}: MLA field {key} must be an integer, got {value!r}")
        dims[key] = value
    q_lora = cfg.get("q_lora_rank") or 0
    if isinstance(q_lora, bool) or not isinstance(q_lora, int):
        raise CheckpointError(f"{source}: MLA field q_lora_rank must be an integer or null, got {q_lora!r}")
    mla = MLASpec(q_lora_rank=q_lora, **dims, softmax_scale=0.0,
                  rope_interleave=family is Family.DEEPSEEK_V2 or bool(cfg.get("rope_interleave", True)))
    if mla.qk_rope_head_dim % 2 or mla.kv_lora_rank <= 0:
        raise CheckpointError(f"{source}: qk_rope_head_dim must be even and kv_lora_rank positive")
    scoring = cfg.get("scoring_func") or ("sigmoid" if family is Family.DEEPSEEK_V3 else "softmax")
    method = cfg.get("topk_method") or ("noaux_tc" if family is Family.DEEPSEEK_V3 else "greedy")
    if family is Family.DEEPSEEK_V3 and (scoring, method) != ("sigmoid", "noaux_tc"):
        raise UnsupportedModelError(f"{source}: DeepSeek-V3 routing {scoring}/{method} is not supported "
                                    "(only sigmoid scores with noaux_tc, as transformers implements it)")
    if family is Family.DEEPSEEK_V2 and (scoring != "softmax" or method not in ("greedy", "group_limited_greedy")):
        raise UnsupportedModelError(f"{source}: DeepSeek-V2 routing {scoring}/{method} is not supported "
                                    "(only softmax with greedy or group_limited_greedy)")
    renormalize = bool(cfg.get("norm_topk_prob", family is Family.DEEPSEEK_V3))
    if family is Family.DEEPSEEK_V2 and renormalize:
        # DeepSeek's code renormalises instead of scaling; transformers ignores the flag. No
        # released V2 checkpoint sets it: refuse rather than pick one of two answers.
        raise UnsupportedModelError(f"{source}: DeepSeek-V2 with norm_topk_prob true is not supported "
                                    "(DeepSeek's and transformers' implementations disagree on it)")
    groups = int(cfg.get("n_group") or 1)
    topk_groups = int(cfg.get("topk_group") or 1)
    if method != "greedy" and num_experts:
        if groups < 1 or num_experts % groups or not 1 <= topk_groups <= groups:
            raise CheckpointError(f"{source}: n_group {groups} must divide n_routed_experts {num_experts} and "
                                  f"topk_group {topk_groups} lie in [1, n_group]")
        if top_k > topk_groups * (num_experts // groups):
            raise CheckpointError(f"{source}: num_experts_per_tok {top_k} exceeds the experts of topk_group "
                                  f"{topk_groups} groups")
        if method == "noaux_tc" and num_experts // groups < 2:
            raise CheckpointError(f"{source}: noaux_tc scores groups by their top-2 experts: n_group {groups} "
                                  f"leaves fewer than 2 experts per group")
    router = RouterSpec(scoring, method, groups, topk_groups, float(cfg.get("routed_scaling_factor") or 1.0),
                        renormalize)
    return {"mla": mla, "router": router}
