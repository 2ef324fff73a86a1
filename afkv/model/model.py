"""The decoder layer loop, joining the attention side to an FFN backend at the AF seam."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from afkv.model.sides import AttentionSide, FFNSide, StepInputs
from afkv.model.spec import ModelSpec, UpcycleSpec, load_spec
from afkv.model.weights import CheckpointReader


class FFNBackend(Protocol):
    """What the attention side calls once per layer: the local FFNSide (colocated) or a
    transport to expert nodes (disaggregated)."""

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor: ...


class Model:
    def __init__(self, spec: ModelSpec, attn: AttentionSide, ffn: FFNBackend):
        self.spec, self.attn, self.ffn = spec, attn, ffn

    def forward(self, inputs: StepInputs, kv: torch.Tensor) -> torch.Tensor:
        """One step over the flattened chunks of all scheduled sequences -> hidden states [T, H]."""
        h = self.attn.embed(inputs.token_ids)  # [T, H]
        for i in range(self.spec.num_layers):
            h = self.attn.attention(i, h, inputs, kv)
            r = self.attn.route(i, h)
            h = h + self.ffn.forward(i, r.x, r.topk_ids, r.topk_weights)
        return h


def load_colocated(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype, upcycle: UpcycleSpec | None = None
) -> Model:
    """Both halves in one process (the baseline every disaggregated topology is compared to)."""
    spec = load_spec(model_dir)
    if upcycle is not None:
        spec = spec.with_upcycle(upcycle)
    reader = CheckpointReader(model_dir)
    try:
        attn = AttentionSide(spec, reader, device, dtype)
        ffn = FFNSide(spec, reader, device, dtype)
    finally:
        reader.close()
    return Model(spec, attn, ffn)
