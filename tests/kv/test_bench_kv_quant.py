"""`afkv bench kv-quant` runs on the CPU (tiny model: the attention step through the torch
references; the kernel and capacity phases need a GPU) and reports ratios against the model
dtype's run of the same invocation."""

import json

from afkv.bench.kv_quant import format_tables, main, run_kv_quant_bench


def test_kv_quant_bench_reports_ratios(tiny_dir):
    result = run_kv_quant_bench(str(tiny_dir["llama"]), "cpu", ["fp8", "int8", "int4"], [(2, 40)], block_size=8,
                                steps=2, progress=lambda *_: None)
    rows = {r["format"]: r for r in result["attention_step"]}
    assert list(rows) == ["auto", "fp8", "int8", "int4"]
    assert rows["auto"]["vs_auto"] == 1.0 and rows["auto"]["kv_vs_auto"] == 1.0
    assert rows["int4"]["kv_vs_auto"] < rows["int8"]["kv_vs_auto"] < 1.0
    assert rows["fp8"]["kv_vs_auto"] < 1.0
    assert all(r["step_s"] > 0 for r in rows.values()) and "kernel" not in result and "capacity" not in result
    assert "int4" in format_tables(result)


def test_main_writes_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["--model", str(tiny_dir["llama"]), "--device", "cpu", "--workloads", "1x24", "--steps", "1",
          "--formats", "int4", "--block-size", "8", "--json", str(out)])
    assert [r["format"] for r in json.loads(out.read_text())["attention_step"]] == ["auto", "int4"]
    assert "attention step" in capsys.readouterr().out
