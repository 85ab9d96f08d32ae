"""Panoptic FPN end to end through the tools: the shipped Cityscapes config on data written in Cityscapes'
layout (gtFine converted by tools/convert_cityscapes_to_panoptic.py), and the shapes demo config, each with
tiny size / iteration overrides only."""
from __future__ import annotations

import json
import os

import pytest

from resdet.evaluation import pq_compute

from helpers import REPO, load_tool
from helpers.panoptic import write_cityscapes_gtfine

TINY = ["solver.max_iter=2", "solver.steps=[]", "solver.warmup_iters=0", "data.batch_size=2", "data.num_workers=0",
        "train.progress_bar=false", "train.num_vis_images=1", "model.backbone_weights=null",
        "model.rpn_post_nms_top_n_train=50", "model.rpn_post_nms_top_n_test=20", "model.box_batch_size_per_image=16",
        "model.options.combine_score_thresh=0.0", "model.options.combine_stuff_area_thresh=16"]
TABLE = ["Things", "Stuff", "PQ", "SQ", "RQ", "*segm*"]


def test_cityscapes_panoptic_fpn_train_test_infer(tmp_path, capsys):
    root = str(tmp_path / "cityscapes")
    for split in ("train", "val"):
        write_cityscapes_gtfine(root, split)
    assert load_tool("convert_cityscapes_to_panoptic")(["--root", root, "--split", "train", "val"]) == 0
    out = tmp_path / "out"
    config = os.path.join(REPO, "configs", "cityscapes", "panoptic_fpn_r50.yaml")
    overrides = [f"data.root={root}", "model.min_size=32", "model.max_size=64", "model.options.crop_size=[32,48]",
                 "model.options.fpn_out_channels=64", "model.options.sem_seg_conv_dims=32"]
    assert load_tool("train")(["--config", config, *TINY, *overrides, f"train.output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert all(word in printed for word in TABLE + ["road", "car"]), printed[-3000:]
    assert "final: panoptic/PQ=" in printed
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if "panoptic/PQ" in line]
    assert evals and 0.0 <= evals[-1]["panoptic/PQ"] <= 1.0

    metrics_file = tmp_path / "metrics.json"
    assert load_tool("test")(["--checkpoint", str(out / "model_final.pth"), "--json", str(metrics_file),
                              f"train.output_dir={out / 'test'}"]) == 0
    printed = capsys.readouterr().out
    assert all(word in printed for word in TABLE), printed[-3000:]
    metrics = json.loads(metrics_file.read_text())
    assert metrics["panoptic/PQ"] == pytest.approx(evals[-1]["panoptic/PQ"])  # same checkpoint, same data
    # The written results are official files: pq_compute on them gives the same PQ.
    gt = os.path.join(root, "gtFine", "cityscapes_panoptic_val")
    files = pq_compute(gt + ".json", gt, out / "test" / "panoptic_results.json", out / "test" / "panoptic_results")
    assert files["All"]["pq"] == pytest.approx(metrics["panoptic/PQ"], rel=1e-9)

    images = os.path.join(root, "leftImg8bit", "val", "aachen")
    assert load_tool("infer")(["--checkpoint", str(out / "model_final.pth"), "--input", images,
                               "--output", str(out / "infer")]) == 0
    assert "panoptic segments" in capsys.readouterr().out
    results = json.load(open(out / "infer" / "detections.json"))
    assert len(results) == 1 and len(list((out / "infer").glob("*.png"))) == 1
    assert results[0]["segments"] and {"id", "label", "class", "isthing", "area", "segmentation"} <= set(
        results[0]["segments"][0])


def test_shapes_panoptic_config_prints_pq_tables(tmp_path, capsys):
    out = tmp_path / "out"
    config = os.path.join(REPO, "configs", "shapes", "panoptic_fpn_r34.yaml")
    overrides = [f"data.root={tmp_path / 'shapes'}", "data.shapes.num_train=4", "data.shapes.num_val=2",
                 "data.shapes.image_size=64", "model.backbone=resnet18", "model.min_size=64", "model.max_size=64",
                 "model.options.fpn_out_channels=32", "model.options.sem_seg_conv_dims=32"]
    assert load_tool("train")(["--config", config, *TINY, *overrides, f"train.output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert all(word in printed for word in TABLE + ["sky", "grass", "gravel", "circle"]), printed[-3000:]
    assert (out / "vis").is_dir() and list((out / "vis").glob("*.png"))
