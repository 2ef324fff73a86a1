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


def test_gpu_benchmarks_say_what_is_missing(capsys):
    """Without the GPUs they need, the GPU benchmarks end with a one-line error naming it."""
    import pytest
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    assert main(["bench", "af"]) == 2
    err = capsys.readouterr().err
    assert "needs two GPUs" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        assert main(["bench", "gpu"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
        assert main(["bench", "kernels", "moe", "--tokens", "16"]) == 2
        assert "needs triton and a CUDA GPU" in capsys.readouterr().err


def test_plot_of_a_gpu_result(tmp_path, capsys):
    """`afkv bench plot` draws a PNG from a `bench gpu` JSON, or says matplotlib is missing."""
    result = {"device": "test", "context": 16, "date": "2026-11-30", "models": {
        "m": {"afkv": {"1": {"tok_s": 10.0}, "16": {"tok_s": 100.0}}, "hf": {"1": {"tok_s": 1.0}}}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert main(["bench", "plot", str(path)]) == 2
        assert "matplotlib" in capsys.readouterr().err
        return
    assert main(["bench", "plot", str(path)]) == 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
