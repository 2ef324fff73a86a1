"""`afkv plan` and `afkv bench calibrate` from the command line: tables, JSON, configs, typed errors."""

import json
from pathlib import Path

import pytest

from afkv.cli import main
from afkv.config import EngineConfig

RESULTS = Path(__file__).resolve().parents[2] / "afkv" / "bench" / "results"


def test_plan_from_builtin_figures_prints_a_table_and_writes_a_config(tmp_path, capsys):
    out = tmp_path / "mixtral.toml"
    assert main(["plan", "--model", "mixtral-8x7b", "--gpus", "8", "--prompt-len", "4096", "--toml", str(out)]) == 0
    text = capsys.readouterr().out
    assert "deployment" in text and "tok/s/GPU" in text and "colocated DP" in text and "\nchosen: " in text
    assert "(not in afkv yet)" in text  # EP is shown for reference, never chosen
    cfg = EngineConfig.from_toml(out)
    assert cfg.scheduler.max_num_seqs > 0 and cfg.kv.device_memory_mib > 0


def test_plan_json(capsys):
    assert main(["plan", "--model", "random:qwen3-30b-a3b", "--gpus", "4", "--gpu", "h100", "--json",
                 "--output-dist", "geometric", "--expert-batching", "merged", "--overlap", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["profile"] == "h100" and data["gpus"] == 4 and data["workload"]["mean_context"] == 2048 + 256
    assert data["chosen"]["runnable"] and data["predictions"][0]["tok_s_per_gpu"] >= data["chosen"]["tok_s_per_gpu"]
    assert "[kv]" in data["toml"]


def test_plan_checks_the_stored_runs(capsys):
    assert main(["plan", "--check-runs", str(RESULTS)]) == 0
    out = capsys.readouterr().out
    assert "af-mixtral-final.json" in out and "gpu-qwen3.json" in out and "predicted figures" in out


def test_plan_errors_are_one_line_and_say_what_to_do(tmp_path, capsys):
    assert main(["plan"]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert main(["plan", "--model", "nonexistent-model"]) == 2
    err = capsys.readouterr().err
    assert "neither a known name" in err and "Traceback" not in err
    assert main(["plan", "--model", "mixtral-8x7b", "--profile", str(tmp_path / "none.json")]) == 2
    assert "afkv bench calibrate" in capsys.readouterr().err
    assert main(["plan", "--model", "mixtral-8x7b", "--gpus", "1", "--gpu", "h100"]) == 2
    assert "add GPUs" in capsys.readouterr().err
    assert main(["plan", "--model", "mixtral-8x7b", "--overlap", "2"]) == 2
    assert "overlap must be a number in [0, 1]" in capsys.readouterr().err


def test_calibrate_on_the_cpu_writes_a_profile_plan_reads(tiny_dir, tmp_path, capsys):
    """The same calibration code at tiny sizes on the CPU: a valid profile with the machine and
    software recorded, fitted curves, and `afkv plan --profile` planning the model on it."""
    model = str(tiny_dir["qwen3_moe"])
    prof = tmp_path / "cpu.json"
    assert main(["bench", "calibrate", "--models", model, "--device", "cpu", "--out", str(prof),
                 "--disk-dir", str(tmp_path)]) == 0
    assert "attention floor" in capsys.readouterr().out
    data = json.loads(prof.read_text())
    assert data["schema"] == "afkv-profile/1" and data["link"]["kind"] == "socket"
    assert data["software"]["torch"] and data["machine"]["cpus"] >= 1
    cal = data["calibrations"][0]
    assert cal["model"]["architectures"] == ["Qwen3MoeForCausalLM"]
    assert len(cal["attention"]) == 6 and len(cal["ffn"]) == 6
    assert {p["seqs"] for p in cal["attention"]} == {1, 4, 16} and all(p["seconds"] > 0 for p in cal["ffn"])
    assert "built-in profile h200" in data["sources"]["af"]
    assert main(["plan", "--model", model, "--profile", str(prof), "--gpus", "2", "--prompt-len", "64",
                 "--output-len", "16", "--tpot-slo-ms", "10000", "--micro-batches", "1,2"]) == 0
    assert "chosen: " in capsys.readouterr().out


def test_calibrate_on_cuda_without_a_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "calibrate", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Traceback" not in err


@pytest.mark.gpu
def test_calibrate_on_a_gpu(tiny_dir, tmp_path, capsys):
    """The GPU path (CUDA graphs, pinned copies, NCCL where two GPUs) end to end on a tiny model."""
    prof = tmp_path / "gpu.json"
    assert main(["bench", "calibrate", "--models", str(tiny_dir["qwen3_moe"]), "--device", "cuda", "--out", str(prof),
                 "--disk-dir", str(tmp_path)]) == 0
    data = json.loads(prof.read_text())
    assert data["machine"]["gpu"] and data["link"]["kind"] in ("nccl", "pcie")
    assert len(data["calibrations"][0]["ffn"]) == 14 and data["calibrations"][0]["attention"]
