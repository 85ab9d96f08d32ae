"""End to end on the Cityscapes layout: tools/train.py, then tools/test.py, then tools/infer.py, for the
shipped Mask R-CNN, semantic FPN and DeepLabV3+ configs with only the data root and tiny size/iteration overrides.
(The VOC2012-only detection run waits on the VOC validation year fix in resdet/engine/builders.py.)"""
from __future__ import annotations

import json

from helpers import load_tool, write_cityscapes

TINY = ["solver.max_iter=2", "solver.steps=[]", "solver.warmup_iters=0", "data.batch_size=2", "data.num_workers=0",
        "train.progress_bar=false", "train.num_vis_images=1", "model.backbone_weights=null"]
DETECTOR_TINY = ["model.min_size=64", "model.max_size=96", "model.rpn_post_nms_top_n_train=50",
                 "model.rpn_post_nms_top_n_test=20", "model.box_batch_size_per_image=16"]


def _run_all(config, overrides, out, input_dir, capsys, names):
    assert load_tool("train")(["--config", config, *TINY, *overrides, f"train.output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert all(n in printed for n in names), printed[-2000:]
    assert load_tool("test")(["--checkpoint", str(out / "model_final.pth"), f"train.output_dir={out / 'test'}"]) == 0
    printed = capsys.readouterr().out
    assert all(n in printed for n in names), printed[-2000:]
    assert load_tool("infer")(["--checkpoint", str(out / "model_final.pth"), "--input", str(input_dir),
                           "--output", str(out / "infer"), "--score-thresh", "0"]) == 0
    capsys.readouterr()
    results = json.load(open(out / "infer" / "detections.json"))
    assert results and len(list((out / "infer").glob("*.png"))) == len(results)
    return results


def test_cityscapes_mask_rcnn(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        write_cityscapes(root, split)
        assert load_tool("convert_cityscapes_to_coco")(
            ["--root", str(root), "--split", split,
             "--out", str(root / "annotations" / f"instances_gtFine_{split}.json")])
    capsys.readouterr()
    results = _run_all("configs/cityscapes/mask_rcnn_r34_fpn.yaml",
                       [f"data.root={root}", "model.weights=null", "data.batch_size=1", *DETECTOR_TINY],
                       tmp_path / "out",
                       root / "leftImg8bit" / "val" / "aachen", capsys, ["*bbox*", "*segm*"])
    assert all("segmentation" in d for r in results for d in r["detections"])


def test_cityscapes_semantic_fpn(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        write_cityscapes(root, split)
    results = _run_all("configs/cityscapes/semantic_fpn_r34.yaml", [f"data.root={root}",
                       "model.options.crop_size=[32,64]"], tmp_path / "out", root / "leftImg8bit" / "val" / "aachen",
                       capsys, ["road", "sky", "car"])
    assert all("class_fractions" in r for r in results)


def test_cityscapes_deeplabv3plus_with_sliding_window_evaluation(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        write_cityscapes(root, split)
    results = _run_all("configs/cityscapes/deeplabv3plus_r50.yaml", [
        f"data.root={root}", "model.options.crop_size=[32,64]",
        "model.options.test_crop_size=[32,32]", "model.options.test_stride=[32,16]"],
        tmp_path / "out", root / "leftImg8bit" / "val" / "aachen", capsys, ["road", "sky", "car"])
    assert all("class_fractions" in r for r in results)
