"""Token sampling on logits rows (torch; CPU and GPU)."""

from __future__ import annotations

import hashlib

import torch


def row_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, step): sampling is reproducible whatever the batch."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] (finite, or -inf) -> scaled logits with filtered-out entries at -inf. The
    row's maximum is subtracted before dividing by the temperature: every scaled logit is
    <= 0 and the largest is 0, so no temperature > 0 makes one overflow to +inf or NaN."""
    x = (logits - logits.max()) / temperature  # [V]
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)  # [V]
        cum = torch.softmax(sorted_x, -1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_x, -1)) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample_tokens(logits: torch.Tensor, rows: list[tuple[float, int, float, torch.Generator | None]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [S, V] float32, one (temperature, top_k, top_p, generator) per row -> (token ids
    [S], ok [S] bool) on the logits' device, without a host synchronisation. temperature 0 is
    argmax. A row with a NaN or +inf logit, or no finite one, cannot be sampled: ok is False
    and its token is meaningless (it is sampled from a placeholder, so that the other rows and
    the device are unharmed)."""
    ok = ~(torch.isnan(logits) | torch.isposinf(logits)).any(-1) & torch.isfinite(logits).any(-1)  # [S]
    safe = torch.where(ok[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))  # [S, V]
    tokens = torch.argmax(safe, -1)  # [S]: every greedy row at once
    for r, (temperature, top_k, top_p, gen) in enumerate(rows):
        if temperature == 0:
            continue
        probs = torch.softmax(filter_logits(safe[r], temperature, top_k, top_p), -1)  # [V]
        tokens[r] = torch.multinomial(probs, 1, generator=gen)[0]
    return tokens, ok


def top_logprobs_batch(logprobs: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs [R, V] -> the n largest per row: (values [R, n], ids [R, n]), on the device."""
    return torch.topk(logprobs, n, dim=-1)
