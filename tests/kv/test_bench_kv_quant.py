"""The long-context decode benchmark of a quantized device tier runs (tiny model, CPU) and
reports ratios against the unquantized run of the same invocation."""

import json

from afkv.bench.kv import format_device_quant_table, main, run_device_quant_bench


def test_device_quant_bench_reports_ratios(tiny_dir):
    result = run_device_quant_bench(str(tiny_dir["llama"]), "cpu", 40, 2, 2, ["int8", "int4"], group_size=4,
                                    block_size=8, progress=lambda *_: None)
    rows = {r["format"]: r for r in result["rows"]}
    assert list(rows) == ["auto", "int8", "int4"]
    assert rows["auto"]["step_time_ratio"] == 1.0 and rows["auto"]["kv_bytes_ratio"] == 1.0
    assert rows["int4"]["kv_bytes_ratio"] < rows["int8"]["kv_bytes_ratio"] < 1.0
    assert all(r["step_ms"] > 0 for r in rows.values()) and result["decode_path"] == "torch reference"
    assert "int4" in format_device_quant_table(result)


def test_main_writes_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["--model", str(tiny_dir["llama"]), "--device", "cpu", "--context", "24", "--seqs", "1", "--steps", "1",
          "--formats", "int4", "--block-size", "8", "--group-size", "4", "--json", str(out)])
    assert [r["format"] for r in json.loads(out.read_text())["rows"]] == ["auto", "int4"]
    assert "long-context decode" in capsys.readouterr().out
