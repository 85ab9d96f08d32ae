"""Tiny datasets written in the real COCO, VOC and Cityscapes layouts."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from resdet.data import VOC_CLASSES
from resdet.data.cityscapes_labels import LABELS

SPARSE = [(5, "airplane"), (17, "cat"), (88, "teddy bear"), (90, "toothbrush")]


def coco_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_coco(root, detections_per_image, categories, *, size=(96, 128), seed=0):
    """COCO layout under ``root`` (val2017/, annotations/instances_val2017.json); ground truth = the given
    detections (``[(image array, output dict with COCO-id labels)]``) or, with None outputs, no boxes."""
    os.makedirs(os.path.join(root, "val2017"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, anns = [], []
    for i, (array, output) in enumerate(detections_per_image):
        Image.fromarray(array).save(os.path.join(root, "val2017", f"{i:06d}.png"))
        images.append({"id": i + 1, "file_name": f"{i:06d}.png", "height": array.shape[0], "width": array.shape[1]})
        for b, c, m in zip(output["boxes"].tolist(), output["labels"].tolist(), output.get("masks", [None] * 999)):
            x1, y1, x2, y2 = b
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
                   "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            if m is not None:
                ann["segmentation"] = coco_rle((m[0] >= 0.5).numpy())
            anns.append(ann)
    cats = [{"id": c, "name": n} for c, n in categories]
    with open(os.path.join(root, "annotations", "instances_val2017.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def coco_arrays(n, size=(96, 128), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------------------ VOC

def _voc_palette():
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_voc_png(array, path):
    image = Image.fromarray(array.astype(np.uint8), mode="P")
    image.putpalette(_voc_palette())
    image.save(path)


def _xml(width, height, objects):
    body = "".join(
        f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for name, diff, (x1, y1, x2, y2) in objects)
    return (f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"{body}</annotation>")


def write_voc(root, *, bad_class=False):
    """VOC2012 with two 48x64 images: 2012_000001 (person + difficult dog), 2012_000002 (two cats)."""
    base = root / "VOC2012"
    for sub in ("Annotations", "ImageSets/Main", "ImageSets/Segmentation", "JPEGImages", "SegmentationClass",
                "SegmentationObject"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    objects = {
        "2012_000001": [("person", False, (11, 6, 30, 40)), ("dog" if not bad_class else "dragon", True,
                                                            (41, 21, 60, 45))],
        "2012_000002": [("cat", False, (1, 1, 20, 20)), ("cat", False, (31, 11, 64, 48))],
    }
    rng = np.random.default_rng(0)
    for file_id, objs in objects.items():
        (base / "Annotations" / f"{file_id}.xml").write_text(_xml(64, 48, objs))
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(base / "JPEGImages" / f"{file_id}.jpg")
        classes = np.zeros((48, 64), np.uint8)
        instances = np.zeros((48, 64), np.uint8)
        for k, (name, _, (x1, y1, x2, y2)) in enumerate(objs):
            classes[y1 - 1:y2, x1 - 1:x2] = VOC_CLASSES.index(name) + 1 if name in VOC_CLASSES else 0
            instances[y1 - 1:y2, x1 - 1:x2] = k + 1
            # object outline drawn in 255, as VOC does
            classes[y1 - 1, x1 - 1:x2] = 255
            instances[y1 - 1, x1 - 1:x2] = 255
        write_voc_png(classes, base / "SegmentationClass" / f"{file_id}.png")
        write_voc_png(instances, base / "SegmentationObject" / f"{file_id}.png")
    for sets in ("Main", "Segmentation"):
        (base / "ImageSets" / sets / "train.txt").write_text("2012_000001\n2012_000002\n")
    return root


# ------------------------------------------------------------------------------------------ Cityscapes

CITYSCAPES_ID = {label.name: label.id for label in LABELS}


def write_cityscapes(root, split="train"):
    """Two 32x64 frames in two cities: road/sky stuff, two cars, a person and a car group (crowd)."""
    frames = [("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")]
    rng = np.random.default_rng(0)
    for k, (city, stem) in enumerate(frames):
        img_dir = root / "leftImg8bit" / split / city
        gt_dir = root / "gtFine" / split / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
        label_ids = np.full((32, 64), CITYSCAPES_ID["road"], np.uint8)
        label_ids[:8] = CITYSCAPES_ID["sky"]
        label_ids[8:10] = CITYSCAPES_ID["parking"]  # ignored in eval -> 255
        label_ids[0, 0] = CITYSCAPES_ID["ego vehicle"]
        instance_ids = label_ids.astype(np.uint16)  # 16-bit PNG, as Cityscapes ships
        if k == 0:
            for i, (x1, x2) in enumerate([(2, 12), (20, 30)]):
                label_ids[12:20, x1:x2] = CITYSCAPES_ID["car"]
                instance_ids[12:20, x1:x2] = CITYSCAPES_ID["car"] * 1000 + i
            label_ids[22:30, 40:44] = CITYSCAPES_ID["person"]
            instance_ids[22:30, 40:44] = CITYSCAPES_ID["person"] * 1000
            label_ids[22:26, 50:60] = CITYSCAPES_ID["car"]
            instance_ids[22:26, 50:60] = CITYSCAPES_ID["car"]  # group region: value < 1000
        Image.fromarray(label_ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(instance_ids).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    return root
