"""`afkv bench kv` stays runnable: the transfer part on a tiny geometry, the table, the CLI."""

import torch

from afkv.bench.kv import format_table, run_transfer_bench
from afkv.cli import build_parser
from afkv.kv.layout import KVLayout


def test_transfer_bench_runs_and_reports_ratios(tmp_path):
    layout = KVLayout(2, 2, 16, 4, torch.float32)
    rows = run_transfer_bench(layout, torch.device("cpu"), 8, ["none", "int4"], 2, tmp_path, repeats=1,
                              progress=lambda *_: None)
    assert [r["path"] for r in rows[:4]] == ["device->host (demote)", "host->device (promote)",
                                             "host->disk (spill)", "disk->host (fetch)"]
    assert all(r["gb_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert rows[4]["wire_mib"] < rows[0]["wire_mib"]  # int4 moves fewer bytes
    assert not list(tmp_path.rglob("*.kvb"))  # cleaned up
    table = format_table({"transfers": rows, "decode": [{"tiers": "off", "decode_tok_s": 10.0, "vs_off": 1.0,
                                                          "demotions": 0, "spills": 0}]})
    assert "host->disk (spill)" in table and "tiers off" in table


def test_cli_parses_bench_kv():
    args = build_parser().parse_args(["bench", "kv", "--no-decode", "--blocks", "16", "--formats", "none"])
    assert args.bench == "kv" and args.no_decode and args.blocks == 16
