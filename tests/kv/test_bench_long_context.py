"""`afkv bench long-context` runs on the CPU (tiny model, torch references; the H2D bound needs a
GPU): streamed decode rows per host format against the same run's device-only and all-device
steps, and a prefill past the device tier that spills and streams."""

from afkv.bench.long_context import format_tables, run_long_context_bench


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
