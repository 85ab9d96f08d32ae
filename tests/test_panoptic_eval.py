"""PQ / SQ / RQ: resdet.evaluation.pq_compute and PanopticEvaluator against cityscapesScripts'
evalPanopticSemanticLabeling (panopticapi's definition) on data written here, plus hand-made cases."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os

import numpy as np
import pytest
import torch

from resdet.evaluation import PanopticEvaluator, pq_compute
from resdet.evaluation.panoptic import PQStat, pq_image_stat

from helpers.panoptic import CATEGORIES, segments_of, write_random_dataset

CATS = {c["id"]: c for c in CATEGORIES}


def _hand_cases():
    """(gt, gt segments, pred, pred segments) pairs for one rule each."""
    cases = []
    # IoU exactly 0.5 is not a match: 4-pixel person, 2-pixel prediction inside it -> FN + FP.
    gt = np.zeros((6, 8), np.int64)
    gt[0, 0:4] = 300
    pred = np.zeros_like(gt)
    pred[0, 0:2] = 7
    cases.append((gt, segments_of(gt, {300: 1}), pred, segments_of(pred, {7: 1})))
    # Void is left out of the union: 2-pixel car, prediction 2 on it + 2 on void -> IoU 1.
    gt = np.zeros((6, 8), np.int64)
    gt[1, 0:2] = 301
    pred = np.zeros_like(gt)
    pred[1, 0:4] = 9
    cases.append((gt, segments_of(gt, {301: 3}), pred, segments_of(pred, {9: 3})))
    # Crowd: a car prediction 4/6 on a car crowd is no FP; a person prediction on it is; the crowd is no FN.
    gt = np.zeros((6, 8), np.int64)
    gt[2:4, 0:5] = 302
    pred = np.zeros_like(gt)
    pred[2:4, 3:6] = 11
    pred[2, 0:2] = 12
    cases.append((gt, segments_of(gt, {302: 3}, {302}), pred, segments_of(pred, {11: 3, 12: 1})))
    # Two car crowds: only the last listed one ignores predictions (panopticapi's dict) -> FP on the first.
    gt = np.zeros((6, 8), np.int64)
    gt[0:2, 0:3] = 303
    gt[4:6, 0:3] = 304
    pred = np.zeros_like(gt)
    pred[0:2, 0:3] = 13
    cases.append((gt, segments_of(gt, {303: 3, 304: 3}, {303, 304}), pred, segments_of(pred, {13: 3})))
    return cases


def test_hand_cases_one_rule_each():
    counts = []
    for gt, gs, pred, ps in _hand_cases():
        stat = pq_image_stat(gt, gs, pred, ps, CATS)
        counts.append({c: s[1:] for c, s in stat.per_cat.items() if any(s[1:])})
    assert counts[0] == {1: [0, 1, 1]}
    assert counts[1] == {3: [1, 0, 0]}
    assert counts[2] == {1: [0, 1, 0]}
    assert counts[3] == {3: [0, 1, 0]}
    stat = PQStat()
    for gt, gs, pred, ps in _hand_cases():
        pq_image_stat(gt, gs, pred, ps, CATS, stat=stat)
    results = stat.results(CATS)
    # person: TP 0, FP 2, FN 1 -> PQ 0; car: TP 1 (IoU 1), FP 1 -> PQ = SQ * RQ = 1 * 1/1.5.
    assert results["per_class"][3]["pq"] == pytest.approx(1 / 1.5)
    assert results["Things"]["n"] == 2 and results["Stuff"]["n"] == 0 and math.isnan(results["Stuff"]["pq"])
    assert results["per_class"][200] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_random_dataset(tmp_path_factory.mktemp("pq"), 12, extra=tuple(_hand_cases()))


def test_pq_compute_equals_cityscapesscripts(files, tmp_path):
    from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as cs

    ours = pq_compute(*files)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = cs.evaluatePanoptic(*files, str(tmp_path / "cs_results.json"))
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == reference[group]["n"]
        for key in ("pq", "sq", "rq"):  # the reference sums per-process partial sums: equal to rounding
            assert ours[group][key] == pytest.approx(reference[group][key], rel=1e-12, abs=0)
    assert set(ours["per_class"]) == set(reference["per_class"])
    for cat, ref in reference["per_class"].items():
        assert {k: ours["per_class"][cat][k] for k in ref} == pytest.approx(ref, rel=1e-12, abs=0)
    assert 0.2 < ours["All"]["pq"] < 0.9 and ours["All"]["n"] == 5  # "wall" never occurs: left out

    # The per-category sums (IoU of the matches, TP, FP, FN) are bit-identical with one reference process.
    gt, pred = (json.load(open(p)) for p in (files[0], files[2]))
    pairs = list(zip(gt["annotations"], pred["annotations"]))
    with contextlib.redirect_stdout(io.StringIO()):
        ref_stat = cs.pq_compute_single_core(0, pairs, files[1], files[3], CATS)
    stat = PQStat()
    from resdet.data.panoptic_io import read_panoptic_png

    for g, p in pairs:
        pq_image_stat(read_panoptic_png(os.path.join(files[1], g["file_name"])), g["segments_info"],
                      read_panoptic_png(os.path.join(files[3], p["file_name"])), p["segments_info"], CATS, stat=stat)
    for cat, s in ref_stat.pq_per_cat.items():
        assert stat.per_cat[cat] == [s.iou, s.tp, s.fp, s.fn]


def _targets_and_outputs(files):
    from resdet.data.panoptic_io import read_panoptic_png

    gt, pred = (json.load(open(p)) for p in (files[0], files[2]))
    targets, outputs = [], []
    for g, p in zip(gt["annotations"], pred["annotations"]):
        targets.append({"image_id": g["image_id"], "panoptic_file_name": g["file_name"],
                        "panoptic_seg": torch.from_numpy(read_panoptic_png(os.path.join(files[1], g["file_name"]))),
                        "segments_info": g["segments_info"]})
        segments = [{"id": s["id"], "category_id": s["category_id"]} for s in p["segments_info"]]
        outputs.append({"panoptic_seg": torch.from_numpy(read_panoptic_png(os.path.join(files[3], p["file_name"]))),
                        "segments_info": segments})
    return targets, outputs


def test_evaluator_scores_through_the_same_core(files, tmp_path):
    targets, outputs = _targets_and_outputs(files)
    evaluator = PanopticEvaluator(CATEGORIES, None, instance_iou_types=(), output_dir=tmp_path / "out")
    for k in range(0, len(targets), 5):
        evaluator.process(targets[k:k + 5], outputs[k:k + 5])
    metrics = evaluator.evaluate()
    reference = pq_compute(*files)
    assert metrics["panoptic/PQ"] == pytest.approx(reference["All"]["pq"], rel=1e-12)
    assert metrics["panoptic/PQ_th"] == pytest.approx(reference["Things"]["pq"], rel=1e-12)
    assert metrics["panoptic/SQ_st"] == pytest.approx(reference["Stuff"]["sq"], rel=1e-12)
    assert metrics["panoptic/PQ/car"] == pytest.approx(reference["per_class"][3]["pq"], rel=1e-12)
    assert "panoptic/PQ/wall" not in metrics
    summary = evaluator.summary()
    assert "Things" in summary and "Stuff" in summary and "sky" in summary
    # The written predictions are panopticapi files that score the same.
    rewritten = pq_compute(files[0], files[1], tmp_path / "out" / "panoptic_results.json",
                           tmp_path / "out" / "panoptic_results")
    assert rewritten["All"]["pq"] == pytest.approx(reference["All"]["pq"], rel=1e-12)


def test_evaluator_instance_half_perfect_predictions():
    """The ground truth's own things as predictions: PQ_th 1 and box / mask AP 1 (crowds ignored)."""
    from helpers.panoptic import random_pair

    gt, gs, _, _ = random_pair(np.random.default_rng(3))
    label = {1: 1, 3: 2, 8: 3, 92: 4, 118: 5, 200: 6}  # model labels: things first, then stuff
    things = [s for s in gs if CATS[s["category_id"]]["isthing"] and not s["iscrowd"]]
    masks = torch.stack([torch.from_numpy(gt == s["id"]) for s in things])[:, None].float()
    from resdet.models.panoptic_transform import boxes_from_masks

    boxes = boxes_from_masks(masks[:, 0].bool())
    output = {"panoptic_seg": torch.from_numpy(gt), "boxes": boxes, "masks": masks,
              "labels": torch.tensor([label[s["category_id"]] for s in things]), "scores": torch.ones(len(things)),
              "segments_info": [{"id": s["id"], "category_id": label[s["category_id"]]} for s in gs]}
    evaluator = PanopticEvaluator(CATEGORIES, {v: k for k, v in label.items()})
    evaluator.process([{"image_id": 1, "panoptic_seg": torch.from_numpy(gt), "segments_info": gs}], [output])
    metrics = evaluator.evaluate()
    assert metrics["panoptic/PQ"] == 1.0
    assert metrics["bbox/AP"] == pytest.approx(1.0) and metrics["segm/AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("case", ["png_id_not_in_json", "json_id_not_in_png", "unknown_category", "size",
                                  "no_prediction"])
def test_bad_prediction_files_name_file_and_id(files, tmp_path, case):
    pred = json.load(open(files[2]))
    ann = pred["annotations"][2]
    pred_dir = files[3]
    if case == "png_id_not_in_json":
        removed = ann["segments_info"].pop(0)["id"]
        match = f"img_002.png.*segment id {removed} is in the PNG but not in segments_info"
    elif case == "json_id_not_in_png":
        ann["segments_info"].append({"id": 12345, "category_id": 1})
        match = "img_002.png.*segment id 12345 is in segments_info but has no pixel"
    elif case == "unknown_category":
        ann["segments_info"][0]["category_id"] = 77
        match = f"img_002.png.*segment id {ann['segments_info'][0]['id']} has unknown category_id 77"
    elif case == "size":
        from PIL import Image

        pred_dir = str(tmp_path / "pred")
        os.makedirs(pred_dir)
        for name in os.listdir(files[3]):
            im = Image.open(os.path.join(files[3], name))
            cropped = im.crop((0, 0, im.width - 1, im.height)) if name == "img_002.png" else im
            cropped.save(os.path.join(pred_dir, name))
        match = r"img_002.png.*prediction is 24x31 \(HxW\) but the ground truth"
    else:
        pred["annotations"].pop(2)
        match = "no prediction for image id 12"
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(pred))
    with pytest.raises(ValueError, match=match):
        pq_compute(files[0], files[1], path, pred_dir)
