"""`afkv bench long-context` runs on the CPU (tiny model, torch references; the H2D bound needs a
GPU): streamed decode rows per host format against the same run's device-only and all-device
steps, and a prefill past the device tier that spills and streams."""

import json

import torch

from afkv.bench.long_context import format_tables, main, run_long_context_bench
from afkv.kv.formats import make_format
from afkv.kv.layout import KVLayout
from afkv.model.spec import load_spec


def test_long_context_bench_reports_rows_and_prefill(tiny_dir):
    result = run_long_context_bench(str(tiny_dir["llama"]), "cpu", [(2, 64)], ["none", "int4"], block_size=8,
                                    steps=1, prefill=(96, 56, 16), progress=lambda *_: None)
    rows = result["decode"]
    assert [(r["batch"], r["format"]) for r in rows] == [(2, "none"), (2, "int4")]
    for r in rows:
        assert r["host_tokens"] == int(r["context"] * 0.75) // 8 * 8 > 0 and r["step_s"] > 0
        assert r["all_device_s"] > 0 and r["device_only_s"] > 0 and "bound_s" not in r  # no GPU: no H2D figure
    assert rows[1]["host_bytes"] < rows[0]["host_bytes"] / 3  # int4 on the wire
    p = result["prefill"]
    assert p["bytes_spilled"] > 0 and p["bytes_streamed"] > 0 and p["steps"] == 96 // 16
    assert result["longest_context"] == 64 and "prefill" in format_tables(result)


def test_a_format_that_overflows_the_host_region_runs_the_longest_context_that_fits(tiny_dir):
    """--host-gib caps the one host region every format's store is laid in in turn: int4 blocks
    of 2 x 128 fit it, bf16 ones do not, so bf16 runs the longest context of the same batch and
    host share whose blocks fit (whole blocks), and the table names it."""
    spec = load_spec(tiny_dir["llama"])
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 8, torch.float32)
    int4 = make_format("int4", layout).nbytes
    host_blocks = 2 * (96 // 8)  # 2 x 128 tokens, 75% on the host
    result = run_long_context_bench(str(tiny_dir["llama"]), "cpu", [(2, 128)], ["int4", "none"], block_size=8,
                                    steps=1, host_gib=host_blocks * int4 / 2**30, progress=lambda *_: None)
    [q, raw] = result["decode"]
    assert (q["format"], q["context"], q["host_tokens"]) == ("int4", 128, 96)
    fits = host_blocks * int4 // make_format("none", layout).nbytes // 2 * 8  # host tokens per sequence
    assert raw["format"] == "none" and raw["host_tokens"] == fits < 96 and raw["context"] < 128
    assert raw["host_bytes"] <= result["host_region"]["nbytes"] == host_blocks * int4
    assert abs(raw["host_share"] - 0.75) < 0.1 and raw["context"] % 8 == 0
    assert "speedup_vs_none" not in q  # other contexts: no ratio
    assert result["host_region"]["pin_s"] >= 0 and set(result["fill_s"]) == {"int4", "none"}
    assert "page-locked" in format_tables(result)


def test_the_prefill_row_runs_alone_in_a_quantized_host_format(tiny_dir):
    """No workloads: the prefill row alone (long_context_gpu.sh's WORKLOADS=0), its store in
    int8: every chunk past the device tier spills and streams; the table has no decode rows."""
    result = run_long_context_bench(str(tiny_dir["llama"]), "cpu", [], [], block_size=8, steps=1,
                                    prefill=(96, 56, 16), prefill_format="int8", progress=lambda *_: None)
    assert "decode" not in result and "host_region" not in result
    p = result["prefill"]
    assert p["format"] == "int8" and p["steps"] == 96 // 16 and p["bytes_spilled"] > 0 and p["bytes_streamed"] > 0
    spec = load_spec(tiny_dir["llama"])
    assert p["attention_flops"] == 4 * spec.head_dim * spec.num_heads * (96 * 97 / 2) * spec.num_layers
    assert p["host_share"] == 1 - 56 / 96 and "stream_s_at_h2d" not in p  # no GPU: no H2D figure
    table = format_tables(result)
    assert "prefill" in table and "B x context" not in table


def test_the_cli_runs_the_prefill_row_alone(tiny_dir, tmp_path, capsys):
    """`--workloads 0` (long_context_gpu.sh's prefill phase): the prefill row alone, in the
    format --prefill-format names, its JSON written."""
    path = tmp_path / "lc.json"
    main(["--model", str(tiny_dir["llama"]), "--device", "cpu", "--workloads", "0", "--prefill", "64,56,16",
          "--prefill-format", "int4", "--block-size", "8", "--json", str(path)])
    result = json.loads(path.read_text())
    assert "decode" not in result and result["prefill"]["format"] == "int4" and result["prefill"]["steps"] == 4
    assert "prefill" in capsys.readouterr().out
