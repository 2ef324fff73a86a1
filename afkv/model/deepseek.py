"""DeepSeek-V2 / V3: the attention side with multi-head latent attention (MLA).

Per layer and token (shapes: H heads, dn / dr / dv the nope / rope / value head dims, r the
KV rank, ql the q rank):

    x      = rms_norm(h)
    q      = q_b(rms_norm(q_a(x)))  (V3)  or  q_proj(x)  (V2-Lite)      [H, dn + dr]
    c, k_pe = kv_a(x)                                                   [r], [dr]
    latent = [rms_norm(c), rope(k_pe)]  -> the paged latent cache        [r + dr], no heads
    out_h  = W_UV[h] attention([W_UK[h]^T q_nope, rope(q_pe)], latents)  (weight absorption)
    h     += o_proj(out)

q_a and kv_a share their input: they are one matrix (one pass over the weights). Decode rows
and short prefill chunks attend with absorbed queries (afkv.ops.mla: one read of each latent
for every head; Triton on CUDA, split-K); chunks of at least `expand_threshold` queries expand
K and V per head from the chunk's context instead and run scaled-dot-product attention, which
costs fewer multiply-adds from there on (afkv.ops.mla's module docstring has the count).

RoPE: DeepSeek rotates pairs (2i, 2i + 1) of q_pe and k_pe. Their rows of q and kv_a are
permuted at load so that the pairs become (i, i + dr/2) and the usual rotate-half rotary
applies; q and k are permuted alike, so every score is unchanged (transformers' V3 does the
same in its forward pass, V2 through complex numbers). YaRN (afkv.model.spec.YarnSpec) sets the
frequencies, a factor on cos and sin, and MLASpec.softmax_scale.

The routing (grouped, sigmoid + correction bias for V3), the norms and the lm_head are
AttentionSideBase's; routed and shared experts and the first_k_dense_replace dense MLPs live
on the FFN side (afkv.model.sides.FFNSide) like every family's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afkv.errors import UnsupportedModelError
from afkv.model.sides import AttentionSideBase, StepInputs, _layer_prefix
from afkv.model.spec import ModelSpec
from afkv.model.weights import CheckpointReader
from afkv.ops.attention import QuantizedKVCache
from afkv.ops.kernels import Kernels
from afkv.ops.layers import Rotary, rms_norm
from afkv.ops.mla import expand_threshold, mla_expanded_attention, write_latent

LORA_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm: DeepSeek's (and transformers') default, not rms_norm_eps


def rotary_frequencies(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """(inv_freq [dr/2] float32, factor on cos and sin): theta^(-2i/dr), or YaRN's blend of
    interpolated and extrapolated frequencies (as transformers computes them)."""
    dim, theta = spec.rotary_dim, spec.rope_theta
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dr/2]
    yarn = spec.yarn
    if yarn is None:
        return 1.0 / pos_freqs, 1.0
    low, high = yarn.correction_range(dim, theta)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [dr/2]
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (yarn.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, yarn.cos_sin_factor


def _deinterleave(rope_dim: int) -> torch.Tensor:
    """Row order turning rotary pairs (2i, 2i + 1) into (i, i + dr/2)."""
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])  # [dr]


class MLAAttentionSide(AttentionSideBase):
    """The attention side of DeepSeek-V2/V3 (see the module docstring). Per layer, besides the
    base's norms and router: `in` [Q + r + dr, H] (q_a or q_proj, then kv_a), `q_a_norm` [ql]
    and `q_b` [H (dn + dr), ql] (V3), `kv_norm` [r], `w_uk` [H, dn, r], `w_uv_t` [H, r, dv],
    `o` [H_model, H dv]."""

    def __init__(self, spec: ModelSpec, reader: CheckpointReader, device: torch.device, dtype: torch.dtype,
                 kernels: Kernels | None = None):
        if spec.mla is None:
            raise UnsupportedModelError(f"{spec.family.value} has no multi-head latent attention")
        super().__init__(spec, reader, device, dtype, kernels)
        mla = spec.mla
        inv_freq, factor = rotary_frequencies(spec)
        self.rotary = Rotary(mla.qk_rope_head_dim, spec.rope_theta, device, inv_freq, factor)
        self.expand_from = expand_threshold(mla.kv_lora_rank, mla.qk_nope_head_dim, mla.v_head_dim)

    def _load_attention(self, layer: int, reader: CheckpointReader, get) -> dict[str, torch.Tensor]:
        mla, heads = self.spec.mla, self.spec.num_heads
        dn, dr, dv, r = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
        a = _layer_prefix(layer) + "self_attn."
        perm = _deinterleave(dr).to(self.device) if mla.rope_interleave else None

        def rope_rows(w: torch.Tensor) -> torch.Tensor:  # [H (dn + dr), K]: each head's rope rows reordered
            if perm is None:
                return w
            w = w.view(heads, dn + dr, -1)
            return torch.cat([w[:, :dn], w[:, dn:][:, perm]], 1).flatten(0, 1)

        kv_a = get(a + "kv_a_proj_with_mqa.weight")  # [r + dr, H_model]
        if perm is not None:
            kv_a = torch.cat([kv_a[:r], kv_a[r:][perm]])
        kv_b = get(a + "kv_b_proj.weight").view(heads, dn + dv, r)  # [H, dn + dv, r]
        out = {"kv_norm": get(a + "kv_a_layernorm.weight"),  # [r]
               "w_uk": kv_b[:, :dn].contiguous(),  # [H, dn, r]
               "w_uv_t": kv_b[:, dn:].transpose(1, 2).contiguous(),  # [H, r, dv]
               "o": get(a + "o_proj.weight")}  # [H_model, H dv]
        if mla.q_lora_rank:
            out["in"] = torch.cat([get(a + "q_a_proj.weight"), kv_a])  # [ql + r + dr, H_model]
            out["q_a_norm"] = get(a + "q_a_layernorm.weight")  # [ql]
            out["q_b"] = rope_rows(get(a + "q_b_proj.weight"))  # [H (dn + dr), ql]
        else:
            out["in"] = torch.cat([rope_rows(get(a + "q_proj.weight")), kv_a])  # [H (dn + dr) + r + dr, H_model]
        return out

    def attention(self, i: int, h: torch.Tensor, inputs: StepInputs, kv: torch.Tensor | QuantizedKVCache) -> torch.Tensor:
        """h [T, H_model] -> h + attention(norm(h)); writes this step's latents of layer i into kv
        (the latent cache [num_blocks, L, bs, r + dr], or a quantized device tier's staging blocks)."""
        spec, w, k = self.spec, self.layers[i], self.kernels
        mla, heads = spec.mla, spec.num_heads
        dn, dr, r = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
        x = self._input_norm(i, h)  # [T, H_model]
        proj = F.linear(x, w["in"])  # [T, Q + r + dr]
        q, c, k_pe = proj.split([proj.shape[1] - r - dr, r, dr], dim=1)
        if mla.q_lora_rank:
            q = F.linear(rms_norm(q, w["q_a_norm"], LORA_NORM_EPS), w["q_b"])  # [T, H (dn + dr)]
        q = q.view(-1, heads, dn + dr)  # [T, H, dn + dr]
        if inputs.rope is None:  # the same for every layer of the step
            inputs.rope = self.rotary.cos_sin(inputs.positions, q.dtype)  # [T, dr] each
        cos, sin = inputs.rope
        q_nope = q[..., :dn]  # [T, H, dn]
        q_pe = Rotary.apply(q[..., dn:], cos, sin)  # [T, H, dr]
        latent = torch.cat([rms_norm(c, w["kv_norm"], LORA_NORM_EPS),
                            Rotary.apply(k_pe[:, None], cos, sin)[:, 0]], 1)  # [T, r + dr]
        if isinstance(kv, QuantizedKVCache):  # quantized device tier: new latents go to staging blocks
            if inputs.staging_slots is None:
                inputs.staging_slots = inputs.slot_blocks - kv.num_blocks  # [T]
            write_latent(kv.staging, i, inputs.staging_slots, inputs.slot_offsets, latent)
        else:
            write_latent(kv, i, inputs.slot_blocks, inputs.slot_offsets, latent)
        scale = mla.softmax_scale
        d = inputs.decode
        if d is not None and d.every_row:  # a decode-only step: no gather or scatter of rows
            o_lat = k.mla_decode(self._absorb(w, q_nope, q_pe), kv, i, d.block_tables, d.context_lens, scale, r)
            return self._residual(i, h, F.linear(self._values(w, o_lat).flatten(1), w["o"]))
        out = q.new_empty(q.shape[0], heads, mla.v_head_dim)  # [T, H, dv]
        if d is not None:
            o_lat = k.mla_decode(self._absorb(w, q_nope[d.rows], q_pe[d.rows]), kv, i, d.block_tables,
                                 d.context_lens, scale, r)  # [B, H, r]
            out[d.rows] = self._values(w, o_lat)
        for ch in inputs.chunks:
            if d is not None and ch.length == 1 and not ch.score_keys:
                continue
            if ch.score_keys:
                raise UnsupportedModelError("H2O pruning is not available for MLA models (the engine refuses it)")
            rows = slice(ch.start, ch.start + ch.length)
            if ch.length >= self.expand_from:
                qr = torch.cat([q_nope[rows], q_pe[rows]], -1)  # [n, H, dn + dr]
                out[rows] = mla_expanded_attention(qr, kv, i, ch.block_ids, ch.context_len, scale, w["w_uk"],
                                                   w["w_uv_t"].transpose(1, 2))
            else:
                o_lat = k.mla_prefill(self._absorb(w, q_nope[rows], q_pe[rows]), kv, i, ch.block_ids,
                                      ch.context_len, scale, r)  # [n, H, r]
                out[rows] = self._values(w, o_lat)
        return self._residual(i, h, F.linear(out.flatten(1), w["o"]))  # [T, H_model]

    @staticmethod
    def _absorb(w: dict, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [n, H, dn], q_pe [n, H, dr] -> absorbed queries [n, H, r + dr]: W_UK[h]^T q_nope."""
        q_lat = torch.bmm(q_nope.transpose(0, 1), w["w_uk"]).transpose(0, 1)  # [n, H, r]
        return torch.cat([q_lat, q_pe], -1)

    @staticmethod
    def _values(w: dict, o_lat: torch.Tensor) -> torch.Tensor:
        """Attention outputs in latent space [n, H, r] -> per-head values [n, H, dv]: W_UV[h] o."""
        return torch.bmm(o_lat.transpose(0, 1), w["w_uv_t"]).transpose(0, 1)  # [n, H, dv]
