"""tools/train.py, test.py and infer.py as a user runs them (in-process, tiny settings)."""
from __future__ import annotations

import json

import pytest

from helpers import detection_overrides, load_tool


def test_train_test_infer_scripts(tmp_path, capsys):
    root, out = tmp_path / "shapes", tmp_path / "out"
    rc = load_tool("train")(detection_overrides(root) + [
        "solver.max_iter=2", "solver.warmup_iters=1", "solver.steps=[]", f"train.output_dir={out}",
        "train.num_vis_images=1", "train.progress_bar=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.index("*bbox*") < printed.index("*segm*") and "final: bbox/AP=" in printed
    assert (out / "model_final.pth").is_file() and (out / "metrics.jsonl").is_file()
    assert list((out / "vis").glob("*.png")) and (out / "config.yaml").is_file()

    # --resume continues from model_final (iteration 2) to a longer schedule
    rc = load_tool("train")(detection_overrides(root) + [
        "--resume", "solver.max_iter=3", "solver.warmup_iters=1", "solver.steps=[]", f"train.output_dir={out}",
        "train.num_vis_images=0", "train.progress_bar=false"])
    assert rc == 0
    capsys.readouterr()
    iterations = [json.loads(line)["iteration"] for line in open(out / "metrics.jsonl")
                  if json.loads(line)["kind"] == "train"]
    assert iterations[-1] == 3 and 3 not in iterations[:-1]

    # the config stored in the checkpoint is used when --config is not given
    rc = load_tool("test")(["--checkpoint", str(out / "model_final.pth"), "--json", str(tmp_path / "m.json"),
                        f"train.output_dir={tmp_path / 'test'}"])
    assert rc == 0 and "Average Precision" in capsys.readouterr().out
    assert "segm/AP" in json.load(open(tmp_path / "m.json"))

    rc = load_tool("infer")(["--checkpoint", str(out / "model_final.pth"), "--input", str(root / "images" / "val"),
                         "--output", str(tmp_path / "infer"), "--score-thresh", "0.0"])
    assert rc == 0
    detections = json.load(open(tmp_path / "infer" / "detections.json"))
    assert len(detections) == 2 and len(list((tmp_path / "infer").glob("*.png"))) == 2
    for entry in detections:
        for d in entry["detections"]:
            assert len(d["box"]) == 4 and d["class"] in ("circle", "square", "triangle", "cross")


def test_train_reports_config_errors(capsys):
    assert load_tool("train")(["solver.lrr=0.1"]) == 2
    assert "did you mean 'solver.lr'?" in capsys.readouterr().err


def test_default_config_is_the_shapes_demo():
    from resdet.config import load_config

    import_main = load_tool("train")
    assert import_main is not None
    cfg = load_config("configs/shapes/mask_rcnn_r34_fpn.yaml")
    assert (cfg.model.arch, cfg.model.backbone, cfg.data.dataset) == ("mask_rcnn", "resnet34", "shapes")
    assert cfg.model.backbone_weights is None and cfg.model.weights is None  # from scratch


@pytest.mark.parametrize("bad", ["--checkpoint"])
def test_test_script_needs_checkpoint(bad):
    with pytest.raises(SystemExit):
        load_tool("test")([bad])
