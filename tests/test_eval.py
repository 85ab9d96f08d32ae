"""Evaluators on hand-made cases: COCOEvaluator equals pycocotools run directly on the same results;
VOC AP equals values worked out by hand."""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from resdet.evaluation import COCOEvaluator, VOCEvaluator, inference_on_dataset, voc_ap


def _rect_mask(h, w, box):
    m = np.zeros((h, w), dtype=np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 1
    return m


def _gt() -> COCO:
    """Two 40x50 images, json category ids 3 and 7 (contiguous labels 1 and 2), one crowd region."""
    h, w = 40, 50
    anns, next_id = [], 1
    objects = {10: [(3, (2, 3, 20, 25)), (7, (25, 5, 45, 30))], 11: [(3, (5, 5, 30, 35)), (7, (30, 20, 48, 38), 1)]}
    for image_id, objs in objects.items():
        for cat, box, *crowd in objs:
            rle = mask_utils.encode(np.asfortranarray(_rect_mask(h, w, box)))
            rle["counts"] = rle["counts"].decode()
            x1, y1, x2, y2 = box
            anns.append({"id": next_id, "image_id": image_id, "category_id": cat, "segmentation": rle,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)),
                         "iscrowd": crowd[0] if crowd else 0})
            next_id += 1
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i in objects],
                    "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _prediction(boxes, labels, scores, h=40, w=50):
    masks = torch.stack([torch.from_numpy(_rect_mask(h, w, b)).float() * 0.9 for b in boxes])[:, None]
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores), "masks": masks}


PREDICTIONS = {
    10: _prediction([(2, 3, 20, 24), (25, 6, 44, 30), (0, 0, 10, 10)], [1, 2, 2], [0.9, 0.8, 0.7]),
    11: _prediction([(6, 5, 30, 33), (30, 20, 48, 38), (4, 6, 29, 35)], [1, 2, 2], [0.95, 0.6, 0.5]),
}


def _direct(coco, iou_type):
    """pycocotools on its own, from the same results written by hand."""
    results = []
    for image_id, p in PREDICTIONS.items():
        for b, lab, s, m in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist(), p["masks"]):
            r = {"image_id": image_id, "category_id": {1: 3, 2: 7}[lab], "score": s}
            if iou_type == "bbox":
                r["bbox"] = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
            else:
                rle = mask_utils.encode(np.asfortranarray((m[0] >= 0.5).numpy().astype(np.uint8)))
                r["segmentation"] = rle
            results.append(r)
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(coco, coco.loadRes(results), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def test_coco_evaluator_equals_pycocotools():
    coco = _gt()
    ev = COCOEvaluator(coco, {1: 3, 2: 7}, iou_types=("bbox", "segm"))
    for image_id, p in PREDICTIONS.items():
        ev.process([{"image_id": image_id}], [p])
    metrics = ev.evaluate()
    for iou_type in ("bbox", "segm"):
        stats = _direct(coco, iou_type)
        for name, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), stats):
            expected = value if value >= 0 else float("nan")  # pycocotools' -1 (no such ground truth): undefined
            assert metrics[f"{iou_type}/{name}"] == pytest.approx(expected, abs=1e-12, nan_ok=True), (iou_type, name)
    assert 0 < metrics["bbox/AP"] < 1
    summary = ev.summary()
    assert summary.index("*bbox*") < summary.index("*segm*") and "Average Precision" in summary


def test_coco_evaluator_prints_per_category_ap_by_name():
    """The per-category table names each category and gives its AP@[.5:.95], pycocotools' own numbers."""
    coco = _gt()
    ev = COCOEvaluator(coco, {1: 3, 2: 7}, iou_types=("bbox",))
    for image_id, p in PREDICTIONS.items():
        ev.process([{"image_id": image_id}], [p])
    ev.evaluate()
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(coco, coco.loadRes([r for r in ev._results["bbox"]]), "bbox")
        e.evaluate()
        e.accumulate()
    table = ev.summary().split("Per-category bbox AP (%):\n")[1].splitlines()[0]
    for k, name in enumerate(("a", "b")):
        p = e.eval["precision"][:, :, k, 0, -1]
        assert f"{name} {100 * p[p > -1].mean():5.1f}" in table


def test_coco_evaluator_without_detections_and_through_inference_loop():
    coco = _gt()
    ev = COCOEvaluator(coco, {1: 3, 2: 7}, iou_types=("bbox",))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    ev.process([{"image_id": 10}], [empty])
    assert ev.evaluate()["bbox/AP"] == 0.0

    class Oracle(torch.nn.Module):  # returns the hand-made predictions of each image
        def forward(self, images):
            return [PREDICTIONS[int(img[0, 0, 0])] for img in images]

    loader = [([torch.full((3, 40, 50), 10.0), torch.full((3, 40, 50), 11.0)], [{"image_id": 10}, {"image_id": 11}])]
    metrics = inference_on_dataset(Oracle(), loader, COCOEvaluator(coco, {1: 3, 2: 7}, iou_types=("bbox",)))
    assert metrics["bbox/AP"] == pytest.approx(_direct(coco, "bbox")[0])


def test_voc_ap_by_hand():
    # one class, 3 ground-truth boxes (one difficult) in two images; detections sorted by score:
    # TP, FP (duplicate), ignored (difficult), TP  ->  npos = 2
    ev = VOCEvaluator(["thing"], use_07_metric=False)
    gt0 = {"image_id": 0, "boxes": torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]]),
           "labels": torch.tensor([1, 1]), "difficult": torch.tensor([False, True])}
    gt1 = {"image_id": 1, "boxes": torch.tensor([[5., 5., 15., 15.]]), "labels": torch.tensor([1])}
    det0 = {"boxes": torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 9.], [20., 20., 30., 30.]]),
            "labels": torch.tensor([1, 1, 1]), "scores": torch.tensor([0.9, 0.8, 0.7])}
    det1 = {"boxes": torch.tensor([[5., 5., 15., 15.]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.6])}
    ev.process([gt0, gt1], [det0, det1])
    m = ev.evaluate()
    # precision/recall after each counted detection: (1, .5), (.5, .5), (2/3, 1)
    # area: recall 0->.5 at precision 1, .5->1 at precision 2/3  =>  0.5 + 1/3
    assert m["bbox/mAP50"] == pytest.approx(0.5 + 1 / 3)
    ev07 = VOCEvaluator(["thing"], use_07_metric=True)
    ev07.process([gt0, gt1], [det0, det1])
    # 11-point: t = 0..0.5 (6 points) -> 1, t = 0.6..1.0 (5 points) -> 2/3
    assert ev07.evaluate()["bbox/mAP50"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert "thing" in ev07.summary()


def test_voc_ap_curve_and_missing_class():
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)
    ev = VOCEvaluator(["a", "b"])
    ev.process([{"image_id": 0, "boxes": torch.tensor([[0., 0., 4., 4.]]), "labels": torch.tensor([1])}],
               [{"boxes": torch.tensor([[0., 0., 4., 4.]]), "labels": torch.tensor([1]), "scores": torch.tensor([1.])}])
    m = ev.evaluate()
    assert m["bbox/AP50-a"] == 1.0 and math.isnan(m["bbox/AP50-b"]) and m["bbox/mAP50"] == 1.0
