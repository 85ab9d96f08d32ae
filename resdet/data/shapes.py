"""The built-in synthetic dataset: coloured shapes on textured backgrounds, written in COCO format.

A new user trains and evaluates without downloading anything: ``generate(root)`` writes
``images/{split}/*.jpg``, ``sem_seg/{split}/*.png`` (0 background, 1..K) and
``annotations/instances_{split}.json`` (instance masks as RLE or polygons) for "train" and "val".

With ``stuff_classes=True`` (the panoptic demo; off by default, and the default output is unchanged) the
background is made of wavy horizontal bands of three *stuff* classes that differ by brightness and texture
(``STUFF_NAMES``: smooth bright "sky", striped "grass", speckled dark "gravel"), and the split also gets
COCO panoptic ground truth, ``annotations/panoptic_{split}.json`` with ``annotations/panoptic_{split}/*.png``
(things: category ids 1..4, segment ids ``label * 1000 + k``; stuff: category ids 5..7, one segment per class
present; pixels of shapes too hidden to be annotated are void); ``sem_seg`` then holds the category ids 1..7.

The task is built to be learnable in minutes on a CPU: four classes that differ by outline (circle, square,
triangle, cross — each with a small random rotation, random aspect and colour), 1–4 objects per image,
objects a sizeable fraction of the image, occlusion limited so every object keeps most of its area visible.
Everything is drawn with OpenCV from a per-image seeded generator, so a seed always gives byte-identical files.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .base import Transform
from .coco import CocoDataset
from .convert import encode_rle
from .panoptic_io import write_panoptic_png

__all__ = ["CLASS_NAMES", "STUFF_NAMES", "ShapesSplit", "generate", "ShapesDataset", "draw_sample",
           "draw_panoptic_sample"]

logger = logging.getLogger("resdet.data")

CLASS_NAMES = ("circle", "square", "triangle", "cross")
STUFF_NAMES = ("sky", "grass", "gravel")
_FORMAT_VERSION = 1


class ShapesSplit(NamedTuple):
    """Where one generated split lives (arguments for ``CocoDataset``)."""

    image_dir: str
    ann_file: str
    sem_seg_dir: str


def _outline(kind: str, center: np.ndarray, size: float, angle: float, aspect: float) -> np.ndarray:
    """Polygon (float [P, 2]) of a shape whose longer extent is about ``size`` pixels."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        points = np.stack([np.cos(t), np.sin(t)], 1) * 0.5
    elif kind == "square":
        points = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * [1.0, aspect]
    elif kind == "triangle":
        t = np.deg2rad([90, 210, 330])
        points = np.stack([np.cos(t), -np.sin(t)], 1) * 0.55
    elif kind == "cross":
        a, b = 0.5, 0.17
        points = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                           [-a, b], [-a, -b], [-b, -b]])
    else:
        raise ValueError(f"unknown shape {kind!r}, expected one of {CLASS_NAMES}")
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    return points @ rotation.T * size + center


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Colour gradient plus blotchy low-frequency texture and pixel noise."""
    base = rng.uniform(40, 215, size=3)
    tilt = rng.uniform(-50, 50, size=(2, 3))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = base + ys[..., None] / height * tilt[0] + xs[..., None] / width * tilt[1]
    coarse = rng.normal(0, 18, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
    image = image + cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 4))):  # a few thin distractor lines
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(float(v) for v in rng.uniform(0, 255, size=3))
        cv2.line(image, p1, p2, colour, 1, cv2.LINE_AA)
    return image


def _stuff_background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """2-3 wavy horizontal bands, each a stuff class (neighbours differ) with its own brightness and texture.

    Returns:
        (image float [H, W, 3] 0..255, stuff map int64 [H, W] with values 1..len(STUFF_NAMES)).
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = int(rng.integers(2, 4))
    cuts = np.sort(rng.uniform(0.2, 0.8, size=bands - 1)) * height
    stuff = np.zeros((height, width), dtype=np.int64)
    previous = 0
    for band in range(bands):
        below = np.ones((height, width), dtype=bool)
        if band < bands - 1:  # the band's lower edge: a sine wave around its cut
            amplitude, period, phase = rng.uniform(2, 0.08 * height), rng.uniform(0.5, 1.5) * width, rng.uniform(0, 6.3)
            below = ys < cuts[band] + amplitude * np.sin(2 * np.pi * xs / period + phase)
        choice = int(rng.choice([k for k in range(1, len(STUFF_NAMES) + 1) if k != previous]))
        stuff[(stuff == 0) & below] = choice
        previous = choice
    image = np.zeros((height, width, 3), dtype=np.float32)
    for k in range(1, len(STUFF_NAMES) + 1):
        region = stuff == k
        if not region.any():
            continue
        if k == 1:  # sky: bright, pale blue-grey, smooth vertical gradient
            base = rng.uniform([150, 170, 200], [200, 215, 245])
            texture = (ys / height - 0.5)[..., None] * rng.uniform(-40, 40)
        elif k == 2:  # grass: muted olive, diagonal stripes
            base = rng.uniform([90, 110, 60], [130, 150, 90])
            wavelength, angle = rng.uniform(5, 9), rng.uniform(0, np.pi)
            texture = 28 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / wavelength)[..., None]
        else:  # gravel: dark grey-brown, coarse speckle
            base = rng.uniform([60, 55, 50], [105, 100, 90])
            coarse = rng.normal(0, 28, size=(max(1, height // 2), max(1, width // 2), 1)).astype(np.float32)
            texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_NEAREST)[..., None]
        image[region] = (base + texture)[region]
    return image, stuff


def _class_colour(rng: np.random.Generator, label: int) -> np.ndarray:
    """RGB colour (float [3], 0..255) with a hue from class ``label``'s band of 360/K degrees."""
    band = 180 // len(CLASS_NAMES)  # OpenCV hue runs over 0..179
    hue = (label - 1) * band + rng.uniform(0.15, 0.85) * band
    hsv = np.array([[[hue, rng.uniform(150, 255), rng.uniform(110, 255)]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def draw_sample(rng: np.random.Generator, height: int, width: int, *, num_objects: tuple[int, int] = (1, 4),
                object_size: tuple[float, float] = (0.16, 0.45), max_occlusion: float = 0.25,
                max_rotation: float = 15.0, class_hues: bool = True,
                noise: float = 6.0) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draws one image; each shape is rotated by up to ``max_rotation`` degrees either way.

    With ``class_hues`` each class draws its colour from its own band of hues (saturation and brightness
    still vary), so class identity is carried by outline and hue; without, colours are uniform random
    and only the outline tells the classes apart (a task a from-scratch network learns far more slowly).

    Returns:
        (image uint8 [H, W, 3], [(label 1..K, visible mask bool [H, W]), ...]).
    """
    image, objects, _ = _draw_objects(rng, _background(rng, height, width), num_objects=num_objects,
                                      object_size=object_size, max_occlusion=max_occlusion,
                                      max_rotation=max_rotation, class_hues=class_hues, noise=noise)
    return image, objects


def draw_panoptic_sample(rng: np.random.Generator, height: int, width: int, **options: Any
                         ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]], np.ndarray]:
    """:func:`draw_sample` on a background of stuff bands (``options`` are its keywords).

    Returns:
        (image uint8 [H, W, 3], [(label, visible mask), ...], stuff map int64 [H, W] with 1..len(STUFF_NAMES)
        where stuff shows and 0 under every shape drawn, annotated or not).
    """
    background, stuff = _stuff_background(rng, height, width)
    image, objects, covered = _draw_objects(rng, background, **options)
    stuff[covered] = 0
    return image, objects, stuff


def _draw_objects(rng: np.random.Generator, image: np.ndarray, *, num_objects: tuple[int, int] = (1, 4),
                  object_size: tuple[float, float] = (0.16, 0.45), max_occlusion: float = 0.25,
                  max_rotation: float = 15.0, class_hues: bool = True, noise: float = 6.0
                  ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]], np.ndarray]:
    """Shapes drawn on ``image`` (float [H, W, 3]), then pixel noise: (image uint8, visible objects, union
    of every drawn shape bool [H, W])."""
    height, width = image.shape[:2]
    short = min(height, width)
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    full_masks: list[np.ndarray] = []
    labels: list[int] = []
    union = np.zeros((height, width), dtype=bool)
    for _ in range(count):
        for _attempt in range(20):
            label = int(rng.integers(1, len(CLASS_NAMES) + 1))
            size = rng.uniform(*object_size) * short
            center = rng.uniform([size * 0.4, size * 0.4], [width - size * 0.4, height - size * 0.4])
            angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
            polygon = _outline(CLASS_NAMES[label - 1], center, size, angle, rng.uniform(0.6, 1.0))
            mask = np.zeros((height, width), dtype=np.uint8)
            cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1, cv2.LINE_8)
            mask = mask.astype(bool)
            area = mask.sum()
            if area < 64:
                continue
            # The new shape lies on top: it may hide at most `max_occlusion` of any earlier shape, and
            # may itself overlap the union only a little.
            if (mask & union).sum() > max_occlusion * area:
                continue
            if any((mask & m).sum() > max_occlusion * m.sum() for m in full_masks):
                continue
            break
        else:
            continue
        local = image[mask].mean(0)
        for _attempt in range(50):  # keep contrast with the background under the shape
            base_colour = _class_colour(rng, label) if class_hues else rng.uniform(0, 255, size=3)
            if np.abs(base_colour - local).sum() >= 150:
                break
        shade = rng.uniform(-25, 25, size=3)
        ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
        image = np.where(mask[..., None], base_colour + shade * ys, image)
        full_masks.append(mask)
        labels.append(label)
        union |= mask
    image = image + rng.normal(0, noise, size=image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    # Visible part of each shape: later shapes cover earlier ones.
    objects = []
    covered = np.zeros((height, width), dtype=bool)
    for label, mask in reversed(list(zip(labels, full_masks))):
        visible = mask & ~covered
        covered |= mask
        if visible.sum() >= 32:
            objects.append((label, visible))
    objects.reverse()
    return image, objects, union


def _polygons(mask: np.ndarray) -> list[list[float]]:
    # Contours run through the centres of boundary pixels, which would shave half a pixel off every side.
    # Tracing the mask upsampled 2x and mapping back puts the vertices a quarter pixel outside the original
    # pixel centres, which pycocotools rasterizes back to exactly the same pixels.
    up = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [((c.reshape(-1, 2).astype(np.float64) + 0.5) / 2).ravel().tolist() for c in contours if len(c) >= 3]


def _panoptic_segments(objects: list[tuple[int, np.ndarray]], stuff: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Segment id map and ``segments_info`` of one image: shapes ``label * 1000 + k``, stuff class s as one
    segment with id and category id ``len(CLASS_NAMES) + s``; unannotated shape pixels stay void (0)."""
    ids = np.zeros(stuff.shape, dtype=np.int64)
    segments = []
    things = [(label, mask, label * 1000 + k) for k, (label, mask) in enumerate(objects)]
    stuff_segments = [(len(CLASS_NAMES) + s, stuff == s, len(CLASS_NAMES) + s)
                      for s in range(1, len(STUFF_NAMES) + 1)]
    for category, mask, seg_id in things + stuff_segments:
        if not mask.any():
            continue
        ids[mask] = seg_id
        ys, xs = np.nonzero(mask)
        segments.append({"id": int(seg_id), "category_id": int(category), "iscrowd": 0, "area": int(mask.sum()),
                         "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                  int(ys.max() - ys.min() + 1)]})
    return ids, segments


def _write_split(root: str, split: str, num_images: int, height: int, width: int, seed: int, split_index: int,
                 mask_format: str, draw_options: dict[str, Any], stuff_classes: bool = False) -> ShapesSplit:
    paths = _split_paths(root, split)
    for folder in (paths.image_dir, paths.sem_seg_dir, os.path.dirname(paths.ann_file)):
        os.makedirs(folder, exist_ok=True)
    panoptic_dir = os.path.join(root, "annotations", f"panoptic_{split}")
    images, annotations, panoptic = [], [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_index, i])
        name = f"{i:06d}"
        semantic = np.zeros((height, width), dtype=np.uint8)
        if stuff_classes:
            image, objects, stuff = draw_panoptic_sample(rng, height, width, **draw_options)
            semantic[stuff > 0] = (stuff[stuff > 0] + len(CLASS_NAMES)).astype(np.uint8)
            ids, segments = _panoptic_segments(objects, stuff)
            write_panoptic_png(os.path.join(panoptic_dir, name + ".png"), ids)
            panoptic.append({"image_id": i + 1, "file_name": name + ".png", "segments_info": segments})
        else:
            image, objects = draw_sample(rng, height, width, **draw_options)
        cv2.imwrite(os.path.join(paths.image_dir, name + ".jpg"), image[:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        for label, mask in objects:
            semantic[mask] = label
        cv2.imwrite(os.path.join(paths.sem_seg_dir, name + ".png"), semantic)
        images.append({"id": i + 1, "file_name": name + ".jpg", "height": height, "width": width})
        for label, mask in objects:
            if mask_format == "rle":
                segmentation = encode_rle(mask)
            else:  # box and area of the polygon as pycocotools rasterizes it, so mask and box agree
                segmentation = _polygons(mask)
                if not segmentation:
                    continue
                mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
                if mask.sum() < 16:
                    continue
            ys, xs = np.nonzero(mask)
            x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()), "iscrowd": 0,
                                "segmentation": segmentation})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]
    _write_json_atomic({"info": {"description": f"resdet synthetic shapes, {split}, seed {seed}"}, "images": images,
                        "annotations": annotations, "categories": categories}, paths.ann_file)
    if stuff_classes:
        categories = ([dict(c, isthing=1) for c in categories] +
                      [{"id": len(CLASS_NAMES) + k + 1, "name": name, "supercategory": "stuff", "isthing": 0}
                       for k, name in enumerate(STUFF_NAMES)])
        _write_json_atomic({"info": {"description": f"resdet synthetic shapes with stuff, {split}, seed {seed}"},
                            "images": images, "annotations": panoptic, "categories": categories},
                           os.path.join(root, "annotations", f"panoptic_{split}.json"))
    return paths


def _write_json_atomic(obj: Any, path: str) -> None:
    """json to ``path.tmp``, then renamed: an interrupted generation never leaves a truncated file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _split_paths(root: str, split: str) -> ShapesSplit:
    return ShapesSplit(os.path.join(root, "images", split),
                       os.path.join(root, "annotations", f"instances_{split}.json"),
                       os.path.join(root, "sem_seg", split))


def _incomplete(root: str, meta: dict[str, Any]) -> str | None:
    """Why the dataset under ``root`` is not the complete one ``meta`` describes (None when it is): the meta
    file unreadable (an interrupted write) or of other arguments, or a file of the splits missing."""
    meta_path = os.path.join(root, "shapes_meta.json")
    if not os.path.isfile(meta_path):
        return f"{meta_path} not found"
    try:
        with open(meta_path) as f:
            stored = json.load(f)
    except (ValueError, OSError) as err:  # json.JSONDecodeError / UnicodeDecodeError are ValueErrors
        return f"{meta_path} is unreadable ({' '.join(str(err).split())})"
    if stored != meta:
        return f"{meta_path} describes other settings"
    for split, count in (("train", meta["num_train"]), ("val", meta["num_val"])):
        paths = _split_paths(root, split)
        expected = [paths.ann_file] + [os.path.join(folder, f"{i:06d}{suffix}") for i in range(count)
                                       for folder, suffix in ((paths.image_dir, ".jpg"), (paths.sem_seg_dir, ".png"))]
        if meta.get("stuff_classes"):
            panoptic = os.path.join(root, "annotations", f"panoptic_{split}")
            expected += [panoptic + ".json"] + [os.path.join(panoptic, f"{i:06d}.png") for i in range(count)]
        missing = [p for p in expected if not os.path.isfile(p)]
        if missing:
            return f"{len(missing)} of its files are missing (e.g. {missing[0]})"
    return None


def generate(root: str, *, num_train: int = 400, num_val: int = 100, image_size: int | tuple[int, int] = 128,
             seed: int = 0, num_objects: tuple[int, int] = (1, 4), object_size: tuple[float, float] = (0.16, 0.45),
             max_occlusion: float = 0.25, max_rotation: float = 15.0, class_hues: bool = True,
             mask_format: Literal["rle", "polygon"] = "rle", stuff_classes: bool = False,
             overwrite: bool = False) -> dict[str, ShapesSplit]:
    """Writes the synthetic shapes dataset under ``root`` (or reuses it when it was written with the same
    arguments and ``overwrite`` is False).

    Args:
        root: output folder.
        num_train, num_val: images per split.
        image_size: side of square images, or (height, width).
        seed: the whole dataset is a function of the arguments and this seed.
        num_objects: (min, max) shapes per image.
        object_size: (min, max) shape extent as a fraction of the shorter image side.
        max_occlusion: largest fraction of a shape that later shapes may cover.
        max_rotation: shapes are rotated uniformly within ±this many degrees (180: any orientation). Small
            rotations keep the classes learnable from scratch within the demo's few hundred iterations.
        class_hues: each class takes its colours from its own hue band (see ``draw_sample``).
        mask_format: COCO segmentation as compressed "rle" or "polygon".
        stuff_classes: stuff bands as background and COCO panoptic ground truth (module docstring).
        overwrite: regenerate even when a matching dataset exists.

    Returns:
        {"train": ShapesSplit, "val": ShapesSplit}.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if min(height, width) < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if not 1 <= num_objects[0] <= num_objects[1]:
        raise ValueError(f"num_objects must be (min, max) with 1 <= min <= max, got {num_objects}")
    if not 0 < object_size[0] <= object_size[1] <= 1:
        raise ValueError(f"object_size must be (min, max) fractions in (0, 1], got {object_size}")
    if mask_format not in ("rle", "polygon"):
        raise ValueError(f"mask_format must be 'rle' or 'polygon', got {mask_format!r}")
    options = {"num_objects": tuple(num_objects), "object_size": tuple(object_size), "max_occlusion": max_occlusion,
               "max_rotation": float(max_rotation), "class_hues": bool(class_hues)}
    meta = {"version": _FORMAT_VERSION, "num_train": num_train, "num_val": num_val, "image_size": [height, width],
            "seed": seed, "mask_format": mask_format, **{k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in options.items()}}
    if stuff_classes:  # only then, so that a dataset written before the option existed is still reused
        meta["stuff_classes"] = True
    meta_path = os.path.join(root, "shapes_meta.json")
    if not overwrite:
        reason = _incomplete(root, meta)
        if reason is None:
            return {split: _split_paths(root, split) for split in ("train", "val")}
        if os.path.exists(meta_path):  # an earlier generation: say why it is redone
            logger.warning("shapes dataset in %s is regenerated: %s", root, reason)
    os.makedirs(root, exist_ok=True)
    if os.path.isfile(meta_path):
        os.remove(meta_path)  # an interrupted run must not look complete
    splits = {}
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        splits[split] = _write_split(root, split, count, height, width, seed, split_index, mask_format, options,
                                     stuff_classes)
    _write_json_atomic(meta, meta_path)  # last: its presence says every file above is complete
    return splits


class ShapesDataset(CocoDataset):
    """``CocoDataset`` over a split written by ``generate`` (``sem_seg`` included when ``with_sem_seg``).

    Args:
        root: the folder passed to ``generate``.
        split: "train" or "val".
        transforms, remove_empty, with_masks: as for ``CocoDataset``.
        with_sem_seg: also return ``sem_seg`` (0 background, 1..4).
    """

    def __init__(self, root: str, split: Literal["train", "val"] = "train", *, transforms: Transform | None = None,
                 with_masks: bool = True, with_sem_seg: bool = False, remove_empty: bool = False) -> None:
        image_dir = os.path.join(root, "images", split)
        ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"{ann_file!r} not found: write the dataset first with "
                                    f"resdet.data.shapes.generate({root!r})")
        super().__init__(image_dir, ann_file, transforms=transforms, remove_empty=remove_empty,
                         with_masks=with_masks,
                         sem_seg_dir=os.path.join(root, "sem_seg", split) if with_sem_seg else None)
