"""tools/train.py and tools/test.py on a semantic config alone (in-process, tiny shapes data)."""
from __future__ import annotations

import json
import os
from tool_loader import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "shapes", "semantic_fpn_r34.yaml")


def _tiny(root, out):
    return [f"data.root={root}", "data.shapes.num_train=4", "data.shapes.num_val=2", "data.shapes.image_size=64",
            "data.batch_size=2", "data.test_batch_size=2", "data.num_workers=0", "model.backbone=resnet18",
            "model.options={min_size: null, max_size: null, fpn_out_channels: 32, conv_dims: 32}",
            f"train.output_dir={out}", "train.progress_bar=false"]


def test_semantic_train_then_test(tmp_path, capsys):
    root, out = tmp_path / "shapes", tmp_path / "out"
    rc = load_tool("train")(["--config", CONFIG, *_tiny(root, out), "solver.max_iter=2", "solver.warmup_iters=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "final: mIoU=" in printed
    assert (out / "model_final.pth").is_file()
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"mIoU"' in line]
    assert evals and 0.0 <= evals[-1]["mIoU"] <= 1.0

    metrics_file = tmp_path / "metrics.json"
    rc = load_tool("test")(["--config", CONFIG, "--checkpoint", str(out / "model_final.pth"), "--json",
                        str(metrics_file), *_tiny(root, out)])
    assert rc == 0
    assert "pAcc" in capsys.readouterr().out
    metrics = json.loads(metrics_file.read_text())
    assert metrics["mIoU"] == evals[-1]["mIoU"]  # the same checkpoint on the same data
