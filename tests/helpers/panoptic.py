"""Panoptic ground truth and predictions written in panopticapi's format, for the panoptic tests."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

# 3 things and 3 stuff categories with non-contiguous ids, as COCO's; "wall" never occurs in the data.
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
    {"id": 8, "name": "bus", "isthing": 1}, {"id": 92, "name": "road", "isthing": 0},
    {"id": 118, "name": "sky", "isthing": 0}, {"id": 200, "name": "wall", "isthing": 0},
]
THINGS = [1, 3, 8]
STUFF = [92, 118]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def write_png(path, ids: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(id2rgb(ids)).save(path)


def segments_of(ids: np.ndarray, categories: dict[int, int], crowd: set[int] = frozenset()) -> list[dict]:
    """segments_info of every non-void id of ``ids`` (category from ``categories``), json order = id order."""
    out = []
    values, counts = np.unique(ids, return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist()):
        if value == 0:
            continue
        ys, xs = np.nonzero(ids == value)
        out.append({"id": value, "category_id": categories[value], "iscrowd": int(value in crowd), "area": count,
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]})
    return out


def write_panoptic_json(path, images: list[dict], annotations: list[dict], categories=CATEGORIES) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return str(path)


def random_pair(rng: np.random.Generator, height: int = 24, width: int = 32):
    """A ground truth (stuff bands, void, things, crowds) and a prediction made from it (shifted, dropped,
    relabelled, added segments, some on void and crowd). Returns ``(gt ids, gt segments, pred ids, pred
    segments)`` with ids spread over all three colour channels."""
    def fresh_id() -> int:
        return int(rng.integers(1, 256 ** 3 - 1))

    gt = np.zeros((height, width), np.int64)
    cats, crowd = {}, set()
    cut = int(rng.integers(6, height - 6))
    for rows, cat in ((slice(0, cut), 118), (slice(cut, height), 92)):
        sid = fresh_id()
        gt[rows] = sid
        cats[sid] = cat
    y, x = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 6))
    gt[y:y + 4, x:x + 6] = 0  # void
    for k in range(int(rng.integers(2, 6))):
        h, w = int(rng.integers(3, 10)), int(rng.integers(3, 12))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        sid = fresh_id()
        gt[y:y + h, x:x + w] = sid
        cats[sid] = int(rng.choice(THINGS[:2]))
        if k == 0 or rng.random() < 0.2:
            crowd.add(sid)
    gt_segments = segments_of(gt, cats, crowd)

    pred = np.zeros_like(gt)
    pcats = {}
    for seg in gt_segments:
        r = rng.random()
        if r < 0.15:
            continue  # missed
        dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
        mask = np.roll(gt == seg["id"], (dy, dx), axis=(0, 1))
        sid = fresh_id()
        pred[mask] = sid
        pcats[sid] = seg["category_id"] if r < 0.85 else int(rng.choice(THINGS + STUFF))
    for _ in range(int(rng.integers(0, 3))):  # extra predictions, some on void / crowd
        h, w = int(rng.integers(2, 6)), int(rng.integers(2, 6))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        sid = fresh_id()
        pred[y:y + h, x:x + w] = sid
        pcats[sid] = int(rng.choice(THINGS))
    pred_segments = segments_of(pred, pcats)
    rng.shuffle(pred_segments)  # json order is not id order
    return gt, gt_segments, pred, pred_segments


def write_random_dataset(root, n: int, seed: int = 0, extra: tuple = ()):
    """``n`` random ground truth / prediction pairs (plus ``extra`` hand-made ones) in panopticapi's files.

    Returns:
        (gt json, gt folder, pred json, pred folder).
    """
    rng = np.random.default_rng(seed)
    pairs = [random_pair(rng) for _ in range(n)] + list(extra)
    images, gt_anns, pred_anns = [], [], []
    for i, (gt, gt_segments, pred, pred_segments) in enumerate(pairs):
        name = f"img_{i:03d}.png"
        images.append({"id": i + 10, "file_name": f"img_{i:03d}.jpg", "height": gt.shape[0], "width": gt.shape[1]})
        write_png(os.path.join(root, "gt", name), gt)
        write_png(os.path.join(root, "pred", name), pred)
        gt_anns.append({"image_id": i + 10, "file_name": name, "segments_info": gt_segments})
        pred_anns.append({"image_id": i + 10, "file_name": name, "segments_info": pred_segments})
    gt_json = write_panoptic_json(os.path.join(root, "gt.json"), images, gt_anns)
    pred_json = write_panoptic_json(os.path.join(root, "pred.json"), images, pred_anns)
    return gt_json, os.path.join(root, "gt"), pred_json, os.path.join(root, "pred")


def write_cityscapes_gtfine(root, split: str = "train") -> str:
    """Two 32x64 Cityscapes frames (two cities) with 16-bit ``*_gtFine_instanceIds.png`` / ``labelIds``:
    road, sidewalk, sky, two cars, a person, a rider, a car group and a bicycle group (crowds), parking
    (evaluated as void) and an ego-vehicle pixel."""
    road, sidewalk, parking, sky, person, rider, car, bicycle = 7, 8, 9, 23, 24, 25, 26, 33
    frames = [("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")]
    rng = np.random.default_rng(0)
    for k, (city, stem) in enumerate(frames):
        img_dir = os.path.join(root, "leftImg8bit", split, city)
        gt_dir = os.path.join(root, "gtFine", split, city)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(
            os.path.join(img_dir, f"{stem}_leftImg8bit.png"))
        labels = np.full((32, 64), road, np.uint16)
        labels[:8] = sky
        labels[8:10] = parking
        labels[10:12, 40:] = sidewalk
        labels[0, 0] = 1  # ego vehicle
        inst = labels.copy()
        things = [(car, 26000, (12, 20, 2, 12)), (car, 26001, (12, 20, 20, 30)), (person, 24000, (22, 30, 40, 44)),
                  (car, car, (22, 26, 50, 60)), (bicycle, bicycle, (27, 31, 50, 58))]
        if k == 1:
            things = [(rider, 25000, (14, 24, 10, 16)), (car, 26000, (20, 28, 30, 50))]
        for label, value, (y1, y2, x1, x2) in things:
            labels[y1:y2, x1:x2] = label
            inst[y1:y2, x1:x2] = value
        Image.fromarray(labels.astype(np.uint8)).save(os.path.join(gt_dir, f"{stem}_gtFine_labelIds.png"))
        Image.fromarray(inst).save(os.path.join(gt_dir, f"{stem}_gtFine_instanceIds.png"))  # 16-bit
    return str(root)


def write_coco_panoptic(root, split: str = "val2017", n: int = 2, size=(24, 32)) -> str:
    """COCO panoptic layout: ``{split}/*.jpg``, ``annotations/panoptic_{split}.json`` and
    ``annotations/panoptic_{split}/*.png`` with non-contiguous category ids, ids over all three channels,
    a crowd, void and an image without things."""
    rng = np.random.default_rng(1)
    images, anns = [], []
    for i in range(n):
        image_id = 139 + 100 * i
        h, w = size
        ids = np.zeros((h, w), np.int64)
        cats = {}
        ids[: h // 2], cats[3290681] = 3290681, 118  # sky; id 3290681 uses the blue channel
        ids[h // 2:], cats[5931152] = 5931152, 92  # road
        ids[0:2, 0:3] = 0  # void
        if i == 0:
            ids[4:10, 2:8], cats[1000] = 1000, 1
            ids[14:20, 10:20], cats[2000] = 2000, 3
            ids[2:6, 20:30], cats[2001] = 2001, 3  # crowd
        os.makedirs(os.path.join(root, split), exist_ok=True)
        name = f"{image_id:012d}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, split, name + ".jpg"))
        write_png(os.path.join(root, "annotations", f"panoptic_{split}", name + ".png"), ids)
        images.append({"id": image_id, "file_name": name + ".jpg", "height": h, "width": w})
        anns.append({"image_id": image_id, "file_name": name + ".png", "segments_info": segments_of(ids, cats, {2001})})
    return write_panoptic_json(os.path.join(root, "annotations", f"panoptic_{split}.json"), images, anns)
