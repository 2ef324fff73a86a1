"""Prompt admission: prompts are rendered and tokenized off the event loop, and text that
cannot fit is refused before any tokenizing (PromptTooLongError)."""

import asyncio
import threading

import pytest

from afkv import Engine, EngineConfig, SamplingParams
from afkv.errors import PromptTooLongError, RequestError

STREAM = SamplingParams(max_tokens=40, ignore_eos=True)


def _cfg(max_model_len=128):
    return EngineConfig.from_dict({"kv": {"block_size": 4, "num_blocks": 128},
                                   "scheduler": {"max_num_batched_tokens": 32, "max_model_len": max_model_len}})


async def test_tokenizing_runs_off_the_loop_and_huge_text_is_refused_first(tiny_text_dir, monkeypatch):
    async with Engine(tiny_text_dir, _cfg(), progress=False) as engine:
        assert engine.max_prompt_chars == 2 * 128  # one character per token at most, twice
        threads = []
        encode = engine.tokenizer.encode

        def spy(text, *args, **kwargs):
            threads.append(threading.current_thread())
            return encode(text, *args, **kwargs)

        monkeypatch.setattr(engine.tokenizer, "encode", spy)
        expected = (await engine.complete("hello", STREAM)).token_ids
        assert threads and threading.current_thread() not in threads  # the loop thread never tokenized
        threads.clear()

        beside = asyncio.create_task(engine.complete("hello", STREAM))  # a stream while the huge prompt comes
        with pytest.raises(PromptTooLongError, match="before tokenizing"):
            await engine.complete("x" * (15 * 2**20), STREAM)
        with pytest.raises(PromptTooLongError, match="before tokenizing"):
            await engine.complete([{"role": "user", "content": "y" * 300}], STREAM)
        with pytest.raises(PromptTooLongError):
            await engine.complete(list(range(200)), STREAM)  # token ids: counted, not checked one by one
        assert (await beside).token_ids == expected
        assert all(t is not threading.current_thread() for t in threads)
        # within the character limit but over the context after tokenizing: refused after
        with pytest.raises(PromptTooLongError, match="tokens"):
            await engine.complete("z" * 200, STREAM)


async def test_tokenizer_failures_are_request_errors(tiny_text_dir, monkeypatch):
    async with Engine(tiny_text_dir, _cfg(), progress=False) as engine:
        def broken(text, *args, **kwargs):
            raise Exception("the tokenizer refuses this text")  # tokenizers raises bare Exceptions

        monkeypatch.setattr(engine.tokenizer, "encode", broken)
        with pytest.raises(RequestError, match="refuses this text"):
            await engine.complete("hello", STREAM)
        assert len((await engine.complete([1, 2, 3], STREAM)).token_ids) == 40
