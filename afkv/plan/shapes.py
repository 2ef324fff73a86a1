"""What the latency model needs to know of a model: bytes read and FLOPs per layer and per token.

Derived once from a ModelSpec (afkv.model.spec); every count is per decoder layer unless named
otherwise. Weights are `dtype_bytes` wide (2: bf16, the GPU default), KV entries too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from afkv.errors import CheckpointError
from afkv.model.spec import ModelSpec, load_spec, spec_from_hf_config


@dataclass(frozen=True)
class Shapes:
    name: str
    num_layers: int
    num_moe_layers: int  # layers whose FFN is routed experts (the rest: a dense MLP)
    hidden_size: int
    dtype_bytes: int
    attn_layer_bytes: float  # q, k, v, o projections and the router: read once per micro-batch and layer
    attn_layer_flops_per_token: float
    head_bytes: float  # lm_head: read once per step
    head_flops_per_token: float
    embed_bytes: float  # held by the attention side, read by rows only
    kv_bytes_per_token_layer: int
    num_experts: int
    top_k: int
    expert_bytes: float  # one routed expert of one layer
    expert_flops_per_pair: float  # one (token, expert) pair
    shared_bytes: float  # per MoE layer: the shared expert (0: none)
    dense_bytes: float  # per dense layer: its MLP
    max_position: int  # longest sequence the model takes

    @classmethod
    def from_spec(cls, spec: ModelSpec, name: str | None = None, dtype_bytes: int = 2) -> "Shapes":
        h, d = spec.hidden_size, spec.head_dim
        attn_params = h * (spec.num_heads + 2 * spec.num_kv_heads) * d + spec.num_heads * d * h
        attn_params += spec.num_experts * h if spec.is_moe else 0  # the router
        head_params = spec.vocab_size * h
        moe_layers = sum(spec.sparse_layers)
        expert_params = 3 * h * spec.moe_intermediate_size
        return cls(
            name=name or str(spec.extra.get("source", spec.family.value)),
            num_layers=spec.num_layers, num_moe_layers=moe_layers, hidden_size=h, dtype_bytes=dtype_bytes,
            attn_layer_bytes=attn_params * dtype_bytes, attn_layer_flops_per_token=2.0 * attn_params,
            head_bytes=head_params * dtype_bytes, head_flops_per_token=2.0 * head_params,
            embed_bytes=0.0 if spec.tie_embeddings else head_params * dtype_bytes,
            kv_bytes_per_token_layer=2 * spec.num_kv_heads * d * dtype_bytes,
            num_experts=spec.num_experts if moe_layers else 0, top_k=spec.top_k if moe_layers else 0,
            expert_bytes=expert_params * dtype_bytes, expert_flops_per_pair=2.0 * expert_params,
            shared_bytes=3 * h * spec.shared_expert_intermediate_size * dtype_bytes,
            dense_bytes=3 * h * spec.intermediate_size * dtype_bytes, max_position=spec.max_position,
        )  # fmt: skip

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.num_layers

    @property
    def attention_side_bytes(self) -> float:
        """Weights an attention node holds: embedding, attention layers, router, lm_head."""
        return self.embed_bytes + self.num_layers * self.attn_layer_bytes + self.head_bytes

    def expert_side_bytes(self, expert_nodes: int = 1) -> float:
        """Weights the fullest of `expert_nodes` expert nodes holds (contiguous expert shards; the
        dense MLPs and shared experts of layer l live on node l % expert_nodes)."""
        per_node = -(-self.num_experts // expert_nodes) if self.num_experts else 0
        extra_layers = -(-self.num_layers // expert_nodes)
        extra = max(self.shared_bytes, self.dense_bytes if self.num_dense_layers else 0.0)
        return self.num_moe_layers * per_node * self.expert_bytes + extra_layers * extra

    @property
    def total_bytes(self) -> float:
        return self.attention_side_bytes + self.expert_side_bytes(1)

    def touched(self, tokens: float, experts_held: int) -> float:
        """Expected distinct experts among `experts_held` that `tokens` uniformly routed tokens
        reach (each token picks top_k distinct of num_experts)."""
        if not self.num_experts:
            return 0.0
        return experts_held * (1.0 - (1.0 - self.top_k / self.num_experts) ** tokens)

    def signature(self) -> tuple:
        """Shapes that decide kernel times: two models with equal signatures share calibrations."""
        return (self.num_layers, self.hidden_size, self.attn_layer_bytes, self.kv_bytes_per_token_layer,
                self.num_experts, self.top_k, self.expert_bytes)


KNOWN_MODELS = ("qwen3-30b-a3b", "mixtral-8x7b")


def load_shapes(model: str | Path) -> Shapes:
    """A model for the planner: a known name (qwen3-30b-a3b, mixtral-8x7b, optionally as
    `random:<name>`), a Hugging Face checkpoint directory, or its config.json."""
    from afkv.model.random import REAL_SHAPES, random_spec

    text = str(model)
    name = text.removeprefix("random:")
    if name in REAL_SHAPES:
        return Shapes.from_spec(random_spec(f"random:{name}"), name)
    path = Path(text)
    if path.is_dir():
        return Shapes.from_spec(load_spec(path), path.name)
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        return Shapes.from_spec(spec_from_hf_config(cfg, source=str(path)), path.parent.name or path.stem)
    raise CheckpointError(f"model {text!r} is neither a known name ({', '.join(REAL_SHAPES)}) nor a checkpoint "
                          "directory or config.json path")
