"""tools/semantic_peer.py's bookkeeping: run order, the results file and the table (the runs themselves
need segmentation_models_pytorch, a benchmark-only extra, and are not run here)."""
from __future__ import annotations

import json

from helpers import load_tool, load_tool_module


def _lib():
    return load_tool_module("semantic_peer_lib")


def _row(arch, side, seed, miou, train_s):
    return {"arch": arch, "side": side, "seed": seed, "mIoU": miou, "train_s": train_s, "total_s": train_s + 10,
            "params": 22_000_000, "threads": 1}


def test_plan_pairs_each_seed_and_alternates_which_side_goes_first():
    groups = _lib().plan(["deeplabv3plus", "semantic_fpn"], [0, 1, 2])
    assert len(groups) == 6 and all({g[0][1], g[1][1]} == {g[0][1]} for g in groups)
    assert [g[0][2] for g in groups[:3]] == ["resdet", "smp", "resdet"]
    assert [g[0][0] for g in groups] == ["deeplabv3plus"] * 3 + ["semantic_fpn"] * 3


def test_table_margin_spread_and_time_ratios():
    rows = [_row("semantic_fpn", "resdet", s, m, t) for s, m, t in [(0, 0.70, 100), (1, 0.72, 110), (2, 0.74, 90)]]
    rows += [_row("semantic_fpn", "smp", s, m, t) for s, m, t in [(0, 0.60, 200), (1, 0.65, 100), (2, 0.61, 90)]]
    text = _lib().table(rows)
    assert "| semantic_fpn | resdet | 3 | 0.720 | 0.700..0.740 | 100 | 110 | 22.0 |" in text
    assert "| semantic_fpn | smp | 3 | 0.620 | 0.600..0.650 | 130 | 140 | 22.0 |" in text
    assert "resdet - smp mIoU +0.100, more than the largest seed spread (0.050)" in text
    assert "per seed: 0.50, 1.10, 1.00" in text
    rows[3]["mIoU"] = 0.50  # smp's spread now 0.15 > margin
    assert "not more than the largest seed spread (0.150)" in _lib().table(rows)


def test_report_reads_the_newest_row_per_run_and_names_a_bad_line(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    rows = [_row("deeplabv3plus", "resdet", 0, 0.1, 50), _row("deeplabv3plus", "smp", 0, 0.5, 50),
            _row("deeplabv3plus", "resdet", 0, 0.6, 40)]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_tool("semantic_peer")(["--report", "--output", str(tmp_path)]) == 0
    assert "| deeplabv3plus | resdet | 1 | 0.600 |" in capsys.readouterr().out
    results.write_text(json.dumps(rows[0]) + "\n{not json\n")
    assert load_tool("semantic_peer")(["--report", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "results.jsonl:2: not a result row" in err and "\n" not in err
