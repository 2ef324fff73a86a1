"""Small model ops: RMSNorm, rotary embedding, SiLU-gated MLP, routing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] -> [..., D], computed in float32 like the HF reference."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class Rotary:
    """Rotary position embedding (non-interleaved halves, as HF's rotate_half). `inv_freq`
    [D/2] replaces the default frequencies theta^(-2i/D) (YaRN), and cos and sin are multiplied
    by `scale` (YaRN's attention factor)."""

    def __init__(self, head_dim: int, theta: float, device: torch.device, inv_freq: torch.Tensor | None = None,
                 scale: float = 1.0):
        if inv_freq is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)  # [D/2]
        self.scale = scale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        if self.scale == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D]; cos/sin [T, D]."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, H, D]
        return x * cos[:, None, :] + rotated * sin[:, None, :]


def gated_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP: x [T, H] -> [T, H]; w_gate_up [2I, H] (gate rows, then up rows), w_down [H, I]."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)  # [T, I] each
    return F.linear(F.silu(gate) * up, w_down)


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax -> top-k (-> renormalise): logits [T, E] -> (ids [T, k] int64, weights [T, k] float32)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def route_grouped_topk(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    sigmoid: bool,
    num_groups: int = 1,
    topk_groups: int = 1,
    correction_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routing, as transformers computes it: logits [T, E] (float32) -> (ids [T, k]
    int64, weights [T, k] float32). Scores are sigmoid(logits) (V3) or their softmax (V2). With
    num_groups > 1 only the topk_groups best groups of E / num_groups consecutive experts take
    part: a group scores the sum of its top-2 of scores + correction_bias (V3's noaux_tc) or,
    without a bias, its best score (V2's group_limited_greedy). The choice uses scores + bias,
    the weights the scores alone; renormalised to sum to one when asked, then times
    scaling_factor. No host synchronisation (CUDA-graph safe)."""
    logits = router_logits.float()
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias.float()  # [T, E]
    if num_groups > 1:
        t, e = choice.shape
        grouped = choice.view(t, num_groups, e // num_groups)  # [T, G, E/G]
        if correction_bias is not None:
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)  # [T, G]
        else:
            group_scores = grouped.amax(-1)  # [T, G]
        group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]  # [T, g]
        keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()  # [T, G]
        keep = keep[:, :, None].expand(-1, -1, e // num_groups).reshape(t, e)  # [T, E]
        choice = choice.masked_fill(~keep, float("-inf") if correction_bias is not None else 0.0)
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]  # [T, k]
    weights = scores.gather(1, ids)  # [T, k]
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling_factor
