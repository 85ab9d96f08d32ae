"""tools/train.py and tools/test.py on a semantic config alone (in-process, tiny shapes data)."""
from __future__ import annotations

import json
import os

from helpers import SEMANTIC_CONFIG, load_tool, semantic_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def test_semantic_train_then_test(tmp_path, capsys):
    root, out = tmp_path / "shapes", tmp_path / "out"
    rc = load_tool("train")(["--config", SEMANTIC_CONFIG, *semantic_overrides(root, out), "solver.max_iter=2",
                             "solver.warmup_iters=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "final: mIoU=" in printed
    assert (out / "model_final.pth").is_file()
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"mIoU"' in line]
    assert evals and 0.0 <= evals[-1]["mIoU"] <= 1.0

    metrics_file = tmp_path / "metrics.json"
    rc = load_tool("test")(["--config", SEMANTIC_CONFIG, "--checkpoint", str(out / "model_final.pth"), "--json",
                        str(metrics_file), *semantic_overrides(root, out)])
    assert rc == 0
    assert "pAcc" in capsys.readouterr().out
    metrics = json.loads(metrics_file.read_text())
    assert metrics["mIoU"] == evals[-1]["mIoU"]  # the same checkpoint on the same data
