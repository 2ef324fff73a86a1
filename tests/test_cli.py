"""The afkv command: make-tiny writes loadable checkpoints; errors are one readable line."""

import json

from afkv.cli import main


def test_make_tiny_writes_hf_checkpoints(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path), "--family", "qwen2_moe"]) == 0
    out = tmp_path / "qwen2_moe"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    assert (out / "model.safetensors").stat().st_size > 0
    assert str(out) in capsys.readouterr().out


def test_run_reports_typed_errors(tiny_dir, capsys):
    # a text prompt for a model without a tokenizer, and an impossible max_tokens
    assert main(["run", "--model", str(tiny_dir["llama"]), "hello"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["run", "--model", str(tiny_dir["llama"]), "--max-tokens", "0", "hello"]) == 2
    assert "max_tokens must be a positive integer" in capsys.readouterr().err
