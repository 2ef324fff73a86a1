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


# ---- afkv run: help, flags, refusals, metrics; memory checks; README snippet ------------------
import asyncio  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import afkv  # noqa: E402
from afkv.cli import build_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _subparser(name: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize("command", ["run", "serve"])
def test_help_describes_every_option_with_its_default(command, capsys):
    parser = _subparser(command)
    for action in parser._actions:
        assert action.help, f"afkv {command} {action.option_strings or action.dest} has no description"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    if command == "run":
        for option in ("--stop TEXT", "--logprobs N", "--ignore-eos", "--stats"):
            assert option in text
        assert "new tokens at most per prompt (default: 128)" in text
        assert "sampling temperature (0: greedy) (default: 0.0)" in text
    else:
        assert "address to listen on (default: 127.0.0.1)" in text and "(default: 8000)" in text


@pytest.mark.parametrize("argv", [["   "], [""], ["--raw", "   "], ["--raw", "\n\t"], ["fine", " "]])
def test_run_refuses_empty_prompts_before_loading(argv, capsys, monkeypatch):
    monkeypatch.setattr(afkv, "Engine", lambda *a, **k: pytest.fail("the engine was loaded"))
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert "empty or whitespace only" in err and "Traceback" not in err


def test_run_flags_stop_logprobs_ignore_eos_and_stats(tiny_chat_dir, capsys):
    model = str(tiny_chat_dir)
    prompt = "Once upon a time"

    async def expected():
        async with afkv.Engine(model, progress=False) as e:
            return await e.complete(prompt, afkv.SamplingParams(max_tokens=24, ignore_eos=True))

    full = asyncio.run(expected())
    assert main(["run", "--model", model, "--raw", "--max-tokens", "24", "--ignore-eos", prompt]) == 0
    out = capsys.readouterr()
    assert out.out == full.text + "\n" and "24 new tokens" in out.err and "finish: length" in out.err

    stop = full.text[10:13]
    assert main(["run", "--model", model, "--raw", "--max-tokens", "24", "--ignore-eos", "--stop", stop,
                 "--stop", "\x00never", "--logprobs", "2", "--stats", prompt]) == 0
    out = capsys.readouterr()
    assert out.out == full.text[: full.text.index(stop)] + "\n" and "finish: stop" in out.err
    n = int(re.search(r"(\d+) new tokens", out.err).group(1))
    rows = [line for line in out.err.splitlines() if re.match(r"\s+'.*'\s+-?\d+\.\d{3}\s+\[", line)]
    assert len(rows) == n  # one logprob row per token, each with its 2 most likely tokens
    assert all(row.count(", ") >= 1 for row in rows)
    for metric in ("kv_hit_blocks{node=0,tier=device}", "kv_spilled_bytes{node=0,to=host}", "kv_promoted_bytes{node=0,from=host}",
                   "generation_tokens{node=0}", "layer_seconds{node=0,part=attention}", "kv_tier_blocks{node=0,tier=device}"):
        assert metric in out.err


def test_run_stats_show_tier_usage(tiny_chat_dir, tmp_path, capsys):
    """With a host tier, a prompt evicted from the device is found again in host memory."""
    cfg = tmp_path / "tiers.toml"
    cfg.write_text("[kv]\nblock_size = 4\nnum_blocks = 24\nhost_num_blocks = 64\n"
                   "[scheduler]\nmax_num_seqs = 1\n")
    long_prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    fillers = [f"filler prompt number {i} with a few more words so that it takes some blocks" for i in range(5)]
    assert main(["run", "--model", str(tiny_chat_dir), "--config", str(cfg), "--raw", "--max-tokens", "8",
                 "--ignore-eos", "--stats", long_prompt, *fillers, long_prompt]) == 0
    err = capsys.readouterr().err

    def value(name):
        return float(re.search(re.escape(name) + r"\s+([\d.]+)", err).group(1))

    assert value("kv_tier_capacity_blocks{node=0,tier=host}") == 64
    assert value("kv_spilled_bytes{node=0,to=host}") > 0
    assert value("kv_hit_blocks{node=0,tier=host}") > 0 and value("kv_promoted_bytes{node=0,from=host}") > 0


def test_kv_sizes_are_checked_against_the_machine(tiny_dir, tmp_path, capsys):
    from afkv.config import EngineConfig

    for body, key in (("device_memory_mib = 100000000", "kv.device_memory_mib"),
                      ("num_blocks = 4000000000000", "kv.num_blocks"),
                      ("host_memory_mib = 100000000", "kv.host_memory_mib")):
        cfg = tmp_path / "big.toml"
        cfg.write_text(f"[kv]\n{body}\n")
        assert main(["run", "--model", str(tiny_dir["llama"]), "--config", str(cfg), "hello"]) == 2
        err = capsys.readouterr().err
        assert f"key '{key}'" in err and str(cfg) in err and "MiB fits" in err and "Traceback" not in err, err

    # the README's long-context config on a machine with less memory than it asks for
    from afkv.config import available_memory

    if available_memory("cpu")["host"] > 72 * 2**30:
        pytest.skip("this machine has the memory configs/long-context.toml asks for")
    assert EngineConfig.from_toml(ROOT / "configs/long-context.toml").kv.device_memory_mib == 65536
    assert main(["run", "--model", str(tiny_dir["llama"]), "--config", str(ROOT / "configs/long-context.toml"),
                 "--raw", "hello"]) == 2
    err = capsys.readouterr().err
    assert "the device KV tier" in err and "key 'kv.device_memory_mib'" in err and "MiB fits" in err


def test_check_memory_names_what_fits():
    from afkv.config import KVConfig
    from afkv.errors import ConfigError
    from afkv.kv.formats import make_format
    from afkv.kv.layout import KVLayout
    from afkv.kv.tiers.config import TierConfig
    import torch

    layout = KVLayout(2, 2, 16, 16, torch.float32)  # 8 KiB blocks
    kv = KVConfig(device_memory_mib=64, host_memory_mib=64)
    tiers = TierConfig(make_format("none", layout), host_num_blocks=8192)  # 64 MiB
    gib = 2**30
    kv.check_memory(layout, 8192, None, tiers, "cpu", available={"host": gib, "device": gib})
    with pytest.raises(ConfigError, match=r"at most 57 MiB fits.*key 'kv.device_memory_mib'"):
        kv.check_memory(layout, 8192, None, None, "cuda", available={"host": gib, "device": 64 * 2**20})
    with pytest.raises(ConfigError, match=r"host KV tier.*beside the device tier.*key 'kv.host_memory_mib'"):
        kv.check_memory(layout, 8192, None, tiers, "cpu", available={"host": 120 * 2**20, "device": 120 * 2**20})
    kv.check_memory(layout, 8192, None, tiers, "cuda", available={"host": 120 * 2**20, "device": 120 * 2**20})


def test_bench_decode_says_what_to_install_before_loading(capsys, monkeypatch):
    import afkv.bench.decode as bench_decode

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.setattr(bench_decode, "Engine", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["bench", "decode", "--batch-sizes", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'transformers" in err and "--no-hf" in err and "Traceback" not in err


def test_readme_python_snippet_ends_the_streamed_line(tiny_chat_dir, capsys, monkeypatch):
    """The README's snippet, run as written (on the tiny model): the final print starts a new line."""
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Using it from Python\s+```python\n(.*?)```", readme, re.S).group(1)
    streamed = []

    class Recording(afkv.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(tiny_chat_dir, progress=False)

        async def generate(self, prompt, params=None):
            async for chunk in super().generate(prompt, params):
                streamed.append(chunk.text) if not isinstance(prompt, str) else None
                yield chunk

    monkeypatch.setattr(afkv, "Engine", Recording)
    exec(compile(snippet, "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert streamed and out.startswith("".join(streamed) + "\n")
    assert len(out) > len("".join(streamed)) + 1
