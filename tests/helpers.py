"""Shared test helpers (references computed with transformers)."""

from __future__ import annotations

import torch


def hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' generate, greedy, exactly n new tokens (EOS not special)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=cfg)
    return out[0, len(prompt):].tolist()


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


# float32 perplexity of the same text, afkv (paged KV, chunked prefill) against transformers:
# measured within 4e-8 (relative) on the default model; 1e-5 is a mean NLL shift of 1e-5 nats,
# where a wrong mask, position or cache block moves it by more than 1e-2.
PPL_REL_TOL_FLOAT32 = 1e-5


def hf_perplexity(model_dir, token_ids: list[int]) -> float:
    """transformers' perplexity of token_ids (float32, one forward pass over the whole text):
    exp of the mean negative log-likelihood of every token after the first."""
    import math

    model = hf_model(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, :-1].float()  # [n - 1, V]
    nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(token_ids[1:])[:, None])  # [n - 1, 1]
    return math.exp(float(nll.double().mean()))


def write_byte_tokenizer(model_dir) -> None:
    """A byte-level tokenizer.json with one token per byte (256 ids, no merges), so that tiny
    checkpoints (vocabulary 256) take text prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(model_dir / "tokenizer.json"))
