"""Checkpoint loading: sharded checkpoints, and clear typed errors for broken ones."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from afkv import Engine
from afkv.errors import CheckpointError, EngineClosedError, UnsupportedModelError
from afkv.model.model import load_colocated
from afkv.model.weights import CheckpointReader
from tests.helpers import random_prompt


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_the_same_weights(tiny_dir, tmp_path):
    src = tiny_dir["qwen2_moe"]
    tensors = load_file(src / "model.safetensors")
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, out / fname)
        weight_map.update({n: fname for n in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reader = CheckpointReader(out)
    assert set(reader.keys()) == set(names)
    a = load_colocated(src, torch.device("cpu"), torch.float32)
    b = load_colocated(out, torch.device("cpu"), torch.float32)
    assert torch.equal(a.attn.layers[2]["qkv"], b.attn.layers[2]["qkv"])
    assert torch.equal(a.ffn.ffn.experts[0][5].down, b.ffn.ffn.experts[0][5].down)


def test_each_side_reads_only_its_tensors(tiny_dir, monkeypatch):
    read = []
    orig = CheckpointReader.get

    def spy(self, name, *a, **k):
        read.append(name)
        return orig(self, name, *a, **k)

    monkeypatch.setattr(CheckpointReader, "get", spy)
    from afkv.model.sides import AttentionSide, FFNSide
    from afkv.model.spec import load_spec

    spec = load_spec(tiny_dir["mixtral"])
    reader = CheckpointReader(tiny_dir["mixtral"])
    AttentionSide(spec, reader, torch.device("cpu"), torch.float32)
    assert read and not any(".experts." in n for n in read)
    read.clear()
    FFNSide(spec, reader, torch.device("cpu"), torch.float32, expert_ids=frozenset({1, 6}))
    assert read and all(".experts.1." in n or ".experts.6." in n for n in read)


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_colocated(tmp_path, torch.device("cpu"), torch.float32)
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")


def test_missing_weights_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir["llama"], tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_colocated(d, torch.device("cpu"), torch.float32)


def test_truncated_weights_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir["llama"], tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|unreadable"):
        load_colocated(d, torch.device("cpu"), torch.float32)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir["llama"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_proj.weight"):
        load_colocated(d, torch.device("cpu"), torch.float32)


def test_unsupported_architecture(tiny_dir, tmp_path):
    d = _copy(tiny_dir["llama"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_colocated(d, torch.device("cpu"), torch.float32)


async def test_engine_start_failure_is_typed_and_engine_unusable(tmp_path):
    engine = Engine(tmp_path)
    with pytest.raises(CheckpointError):
        await engine.start()
    with pytest.raises(EngineClosedError):
        await engine.complete(random_prompt(3, 10, 0))
