"""The shapes generator's stuff option (the panoptic demo's data) and the default data it must leave as it was."""
from __future__ import annotations

import hashlib
import json
import os

import cv2
import numpy as np

from resdet.data.panoptic import CocoPanopticDataset
from resdet.data.panoptic_io import read_panoptic_png
from resdet.data.shapes import CLASS_NAMES, STUFF_NAMES, draw_sample, generate

# sha256 of the generator's output before the stuff option existed (same arguments as below).
DRAW_SHA = "2e72d4855ca722f62b394e244386dc6a77dcf63cb73034be5aa7d7b755a8d6f1"
FILES_SHA = "5998fd98923c27d4048853edac36c5d348aba67bab72d83ac7520c9cc2482f2c"
JPEG_SHA, JPEG_OPENCV = "451e4ac8e813cda92db1aa3116dcde6d2eea109770c70cad16ab3df104c4eb11", "5.1.0"


def test_default_data_is_unchanged(tmp_path):
    h = hashlib.sha256()
    for seed in range(3):
        image, objects = draw_sample(np.random.default_rng([seed, 0, seed]), 64, 80)
        h.update(image.tobytes())
        for label, mask in objects:
            h.update(bytes([label]))
            h.update(np.packbits(mask).tobytes())
    assert h.hexdigest() == DRAW_SHA
    generate(str(tmp_path), num_train=3, num_val=2, image_size=64, seed=5)
    h, jpeg = hashlib.sha256(), hashlib.sha256()
    for split in ("train", "val"):
        h.update((tmp_path / "annotations" / f"instances_{split}.json").read_bytes())
        for name in sorted(os.listdir(tmp_path / "sem_seg" / split)):
            h.update(cv2.imread(str(tmp_path / "sem_seg" / split / name), cv2.IMREAD_UNCHANGED).tobytes())
        for name in sorted(os.listdir(tmp_path / "images" / split)):
            jpeg.update((tmp_path / "images" / split / name).read_bytes())
    h.update((tmp_path / "shapes_meta.json").read_bytes())
    assert h.hexdigest() == FILES_SHA
    assert not (tmp_path / "annotations" / "panoptic_train.json").exists()
    if cv2.__version__ == JPEG_OPENCV:  # JPEG bytes also depend on the encoder OpenCV was built with
        assert jpeg.hexdigest() == JPEG_SHA


def test_stuff_option_writes_coco_panoptic(tmp_path):
    generate(str(tmp_path), num_train=6, num_val=2, image_size=64, seed=1, stuff_classes=True)
    assert json.load(open(tmp_path / "shapes_meta.json"))["stuff_classes"] is True
    data = json.load(open(tmp_path / "annotations" / "panoptic_train.json"))
    assert [(c["id"], c["name"], c["isthing"]) for c in data["categories"]] == (
        [(i + 1, n, 1) for i, n in enumerate(CLASS_NAMES)] + [(5 + i, n, 0) for i, n in enumerate(STUFF_NAMES)])
    stuff_seen, void = set(), 0
    for ann in data["annotations"]:
        ids = read_panoptic_png(str(tmp_path / "annotations" / "panoptic_train" / ann["file_name"]))
        sem = cv2.imread(str(tmp_path / "sem_seg" / "train" / ann["file_name"]), cv2.IMREAD_UNCHANGED)
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            assert mask.sum() == seg["area"] and (sem[mask] == seg["category_id"]).all()
            if seg["category_id"] > len(CLASS_NAMES):
                stuff_seen.add(seg["category_id"])
                assert seg["id"] == seg["category_id"]
            else:
                assert seg["id"] // 1000 == seg["category_id"]
        void += int((ids == 0).sum())
        assert ((ids == 0) == (sem == 0)).all()  # void only under shapes too hidden to be annotated
    assert stuff_seen == {5, 6, 7} and void < 0.02 * 6 * 64 * 64
    ds = CocoPanopticDataset(str(tmp_path / "images" / "train"), str(tmp_path / "annotations" / "panoptic_train.json"))
    assert ds.num_classes == 5 and ds.num_stuff_classes == 3 and len(ds) == 6
    _, target = ds[0]
    assert set(target["sem_seg"].unique().tolist()) <= {0, 1, 2, 3, 255}
    # The instance json is still written for the things (COCO AP of the instance half, the instance task).
    instances = json.load(open(tmp_path / "annotations" / "instances_train.json"))
    assert len(instances["annotations"]) == sum(
        1 for a in data["annotations"] for s in a["segments_info"] if s["category_id"] <= len(CLASS_NAMES))
    generate(str(tmp_path), num_train=6, num_val=2, image_size=64, seed=1)  # option off: written again, without
    assert "stuff_classes" not in json.load(open(tmp_path / "shapes_meta.json"))
