"""Incremental detokenization: the streamed text equals a full decode of the output tokens
(multi-byte characters split across tokens, incomplete characters at the end, stop strings)."""

import random

import pytest

import afkv
from afkv.config import EngineConfig, KVConfig
from afkv.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return Tokenizer(default_model_dir)


def _streamed(tokenizer, ids):
    stream = tokenizer.stream()
    return "".join(stream.step(t) for t in ids) + stream.finish(ids)


def test_stream_equals_full_decode(tokenizer):
    text = ("Héllo wörld — 日本語のテキスト 🎉🎉 naïve café, Ελληνικά, русский, العربية, 한국어 😀👍🏽 " * 20)
    ids = tokenizer.encode(text)
    assert _streamed(tokenizer, ids) == tokenizer.decode(ids)
    rng = random.Random(0)
    for n in (1, 7, 300, 2000):
        # random ids, byte tokens (ids < 300) among them: many characters split or never completed
        ids = [rng.randrange(300) if rng.random() < 0.5 else rng.randrange(tokenizer.vocab_size) for _ in range(n)]
        assert _streamed(tokenizer, ids) == tokenizer.decode(ids), n
    ids = tokenizer.encode("日本")[:-1] + tokenizer.encode("語")[:1]  # ends inside a character
    assert _streamed(tokenizer, ids) == tokenizer.decode(ids)


@pytest.fixture
async def engine(tiny_chat_dir):
    async with afkv.Engine(tiny_chat_dir, EngineConfig(kv=KVConfig(block_size=16, num_blocks=256))) as e:
        yield e


async def test_long_sampled_outputs_stream_the_full_decode(engine):
    tok = engine.tokenizer
    for seed in range(3):
        params = afkv.SamplingParams(max_tokens=400, temperature=1.5, seed=seed, ignore_eos=True)
        chunks = [c async for c in engine.generate("Once upon a time", params)]
        ids = [t for c in chunks for t in c.token_ids]
        assert len(ids) == 400
        assert "".join(c.text for c in chunks) == tok.decode(ids)


async def test_stop_strings_cut_the_full_decode(engine):
    tok = engine.tokenizer
    base = afkv.SamplingParams(max_tokens=200, temperature=1.5, seed=11, ignore_eos=True)
    full = tok.decode((await engine.complete("Once upon a time", base)).token_ids)
    for stop in (full[50:53], full[120:122], full[150:160]):
        out = await engine.complete("Once upon a time", afkv.SamplingParams(
            max_tokens=200, temperature=1.5, seed=11, ignore_eos=True, stop=(stop, "\x00never")))
        assert out.finish_reason == "stop"
        assert out.text == full[: full.index(stop)]


async def test_no_full_decode_per_token(engine, monkeypatch):
    """A 300-token output decodes its whole text at most once (at its end), never per token."""
    calls = []
    decode = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode", lambda ids, *a, **k: calls.append(len(ids)) or decode(ids, *a, **k))
    params = afkv.SamplingParams(max_tokens=300, temperature=1.5, seed=3, ignore_eos=True, stop=("\x00never",))
    out = await engine.complete("Once upon a time", params)
    assert len(out.token_ids) == 300
    assert len(calls) <= 1
