"""The synthetic shapes generator: deterministic per seed, valid COCO, learnable-sized objects."""
import filecmp
import os
import time

import numpy as np
import pytest
from pycocotools.coco import COCO

from resdet.data import masks_to_boxes
from resdet.data.shapes import CLASS_NAMES, ShapesDataset, generate


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_deterministic_per_seed(tmp_path):
    a = generate(str(tmp_path / "a"), num_train=6, num_val=3, image_size=64, seed=3)
    b = generate(str(tmp_path / "b"), num_train=6, num_val=3, image_size=64, seed=3)
    c = generate(str(tmp_path / "c"), num_train=6, num_val=3, image_size=64, seed=4)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b") and len(files) == 2 * 9 + 2 + 1
    for f in files:
        assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f
    assert not filecmp.cmp(a["train"].ann_file, c["train"].ann_file, shallow=False)
    assert a["val"].ann_file.endswith(os.path.join("annotations", "instances_val.json"))
    assert b["train"].image_dir == str(tmp_path / "b" / "images" / "train")


def test_reuses_matching_dataset(tmp_path):
    generate(str(tmp_path), num_train=2, num_val=1, image_size=48)
    stamp = os.path.getmtime(tmp_path / "annotations" / "instances_train.json")
    time.sleep(0.01)
    generate(str(tmp_path), num_train=2, num_val=1, image_size=48)
    assert os.path.getmtime(tmp_path / "annotations" / "instances_train.json") == stamp
    generate(str(tmp_path), num_train=3, num_val=1, image_size=48)  # other arguments: regenerated
    assert len(COCO(str(tmp_path / "annotations" / "instances_train.json")).imgs) == 3


@pytest.mark.parametrize("mask_format", ["rle", "polygon"])
def test_dataset_contents(tmp_path, mask_format):
    generate(str(tmp_path), num_train=12, num_val=2, image_size=(96, 128), seed=0, mask_format=mask_format)
    ds = ShapesDataset(str(tmp_path), "train", with_sem_seg=True)
    assert ds.class_names == list(CLASS_NAMES) and ds.num_classes == len(CLASS_NAMES) + 1 and len(ds) == 12
    counts = []
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 96, 128)
        n = len(target["labels"])
        counts.append(n)
        assert target["masks"].shape == (n, 96, 128)
        sizes = target["boxes"][:, 2:] - target["boxes"][:, :2]
        assert (sizes.max(1).values >= 12).all() and (sizes <= 96).all()
        assert np.array_equal(masks_to_boxes(target["masks"].numpy()), target["boxes"].numpy())
        sem = target["sem_seg"]
        for label, mask in zip(target["labels"], target["masks"].bool()):
            assert (sem[mask] == label).float().mean() > 0.99
        assert ((sem > 0) == target["masks"].any(0).bool()).float().mean() > 0.98
    assert 1 <= min(counts) and max(counts) <= 4 and np.mean(counts) >= 1.5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate(str(tmp_path), image_size=16)
    with pytest.raises(ValueError, match="mask_format"):
        generate(str(tmp_path), mask_format="bitmap")
    with pytest.raises(FileNotFoundError, match="generate"):
        ShapesDataset(str(tmp_path / "none"), "train")


def test_fast(tmp_path):
    start = time.perf_counter()
    generate(str(tmp_path), num_train=40, num_val=10, image_size=160)
    assert time.perf_counter() - start < 5.0  # ~500 images in a few seconds


def test_class_hues_put_each_class_in_its_own_hue_band():
    import cv2

    from resdet.data.shapes import draw_sample

    band = 180 // len(CLASS_NAMES)
    checked = 0
    for i in range(12):
        image, objects = draw_sample(np.random.default_rng(i), 96, 96, noise=0.0)
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        for label, mask in objects:
            # the vertical shading changes brightness a little; the median hue stays in the class band
            hue = float(np.median(hsv[..., 0][mask]))
            assert (label - 1) * band - 2 <= hue <= label * band + 2, (i, label, hue)
            checked += 1
    assert checked >= 12
