"""CocoDataset: targets, label mapping, crowds, empty images and bad input (fixtures written here)."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from resdet.data import CocoDataset, ImageReadError, read_image


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _write(tmp_path, *, annotations=None, images=None, categories=None, image_modes=None):
    """Two 40x60 RGB images (ids 1, 2) plus one 30x30 image (id 5) without annotations."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
        {"id": 2, "file_name": "b.png", "height": 40, "width": 60},
        {"id": 5, "file_name": "c.png", "height": 30, "width": 30}]
    rng = np.random.default_rng(0)
    for info in images:
        array = rng.integers(0, 255, (info["height"], info["width"], 3), dtype=np.uint8)
        Image.fromarray(array).save(image_dir / info["file_name"])
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 10:30] = 1
    if annotations is None:
        annotations = [
            # polygon, category 7 -> label 2
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
            # RLE, category 3 -> label 1
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0,
             "segmentation": _rle(mask)},
            # crowd: out of training targets
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 30, 20], "area": 600, "iscrowd": 1,
             "segmentation": _rle(np.ones((40, 60), np.uint8))},
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [40, 20, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[40, 20, 50, 20, 50, 30, 40, 30]]},
        ]
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(image_dir), str(ann_file)


def test_targets_and_label_mapping(tmp_path):
    ds = CocoDataset(*_write(tmp_path))
    assert len(ds) == 3 and ds.cat_ids == [3, 7] and ds.class_names == ["cat", "dog"]
    assert ds.cat_id_to_contiguous == {3: 1, 7: 2} and ds.contiguous_to_cat_id == {1: 3, 2: 7}
    assert ds.num_classes == 3
    image, target = ds[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["image_id"] == 1
    assert target["boxes"].dtype == torch.float32 and target["boxes"].tolist() == [[10, 5, 30, 15]] * 2
    assert target["labels"].tolist() == [2, 1]
    assert target["masks"].shape == (2, 40, 60) and target["masks"].dtype == torch.uint8
    assert target["masks"][1].sum() == 200 and target["masks"][1, 5:15, 10:30].all()
    assert target["masks"][0, 6:14, 11:29].all() and target["masks"][0, 20:].sum() == 0  # polygon decoded


def test_crowd_left_out_of_training_but_in_ground_truth(tmp_path):
    ds = CocoDataset(*_write(tmp_path))
    _, target = ds[1]
    assert target["labels"].tolist() == [2] and target["iscrowd"].tolist() == [0]
    crowds = [a for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[2])) if a["iscrowd"]]
    assert len(crowds) == 1  # the evaluator's COCOeval(ds.coco, ...) still sees the crowd
    assert "crowd=1" in ds.summary


def test_empty_images_kept_or_removed(tmp_path):
    args = _write(tmp_path)
    _, target = CocoDataset(*args)[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["masks"].shape == (0, 30, 30)
    assert len(CocoDataset(*args, remove_empty=True)) == 2


def test_bad_boxes_are_clipped_or_dropped_and_counted(tmp_path, caplog):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [50, 30, 20, 20], "iscrowd": 0, "area": 1},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0, "area": 0},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, -4, 10], "iscrowd": 0, "area": 0},
            {"id": 4, "image_id": 99, "category_id": 3, "bbox": [5, 5, 4, 10], "iscrowd": 0, "area": 0}]
    with caplog.at_level(logging.INFO, logger="resdet.data"):
        ds = CocoDataset(*_write(tmp_path, annotations=anns))
    assert ds.skipped == {"degenerate_box": 2, "annotation_without_image": 1}
    assert "degenerate_box=2" in caplog.text and "clipped_box=1" in caplog.text
    _, target = ds[0]
    assert target["boxes"].tolist() == [[50, 30, 60, 40]]
    assert target["masks"][0].sum() == 100  # no segmentation: the clipped box is the mask


def test_unknown_category_names_file_and_index(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4], "iscrowd": 0},
            {"id": 8, "image_id": 1, "category_id": 42, "bbox": [1, 1, 4, 4], "iscrowd": 0}]
    with pytest.raises(ValueError, match=r"ann\.json: annotation #1 \(id 8\) has category_id 42"):
        CocoDataset(*_write(tmp_path, annotations=anns))


def test_missing_image_errors_or_is_skipped(tmp_path):
    image_dir, ann_file = _write(tmp_path)
    os.remove(os.path.join(image_dir, "b.png"))
    with pytest.raises(FileNotFoundError, match="b.png"):
        CocoDataset(image_dir, ann_file)
    ds = CocoDataset(image_dir, ann_file, missing_images="skip")
    assert len(ds) == 2 and ds.skipped["missing_image"] == 1


def test_unreadable_image_error_names_item_and_file(tmp_path):
    image_dir, ann_file = _write(tmp_path)
    with open(os.path.join(image_dir, "a.png"), "wb") as f:
        f.write(b"not an image")
    ds = CocoDataset(image_dir, ann_file)
    with pytest.raises(ImageReadError, match=r"CocoDataset\[0\].*a\.png"):
        ds[0]


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataset(str(tmp_path), str(tmp_path / "nope.json"))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "1"])
def test_image_modes_become_8bit_rgb(tmp_path, mode):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).convert(mode)
    path = str(tmp_path / "x.png")
    image.save(path)
    array = read_image(path)
    assert array.shape == (9, 7, 3) and array.dtype == np.uint8 and array.flags.writeable
    if mode == "I;16":  # 16-bit scaled, not truncated
        assert array.max() > 200


def test_image_size_disagreeing_with_json(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}]
    image_dir, ann_file = _write(tmp_path, images=images, annotations=[])
    info = json.loads(open(ann_file).read())
    info["images"][0]["height"] = 41
    open(ann_file, "w").write(json.dumps(info))
    with pytest.raises(ImageReadError, match="a.png.*41x60"):
        CocoDataset(image_dir, ann_file)[0]


def test_bad_polygons_counted_and_annotation_read_without_image(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "iscrowd": 0, "area": 200,
             "segmentation": [[10, 5, 30, 5], [10, 5, 30, 5, 30, 15, 10, 15]]}]
    image_dir, ann_file = _write(tmp_path, annotations=anns)
    ds = CocoDataset(image_dir, ann_file)
    assert "bad_polygon=1" in ds.summary
    os.remove(os.path.join(image_dir, "a.png"))  # evaluation ground truth needs no image decoding
    target = ds.get_annotation(0)
    assert target["labels"].tolist() == [1] and target["masks"][0].sum() > 150


def test_one_load_for_every_dataset():
    from resdet.data import CityscapesDataset, VOCDataset
    from resdet.data.base import DetectionDatasetBase

    for cls in (CocoDataset, VOCDataset, CityscapesDataset):
        assert cls.load is DetectionDatasetBase.load


def test_dark_16bit_png_keeps_its_16bit_scale(tmp_path):
    """A 16-bit image whose values stay below 256 is dark, not scaled as if it were 8-bit."""
    array = np.full((4, 5), 200, dtype=np.uint16)
    array[0, 0] = 65535
    Image.fromarray(array).save(tmp_path / "dark.png")
    image = read_image(str(tmp_path / "dark.png"))
    assert image.shape == (4, 5, 3) and image[1, 1, 0] == 1 and image[0, 0, 0] == 255  # 200/257 -> 1
    Image.fromarray(np.full((4, 5), 200, dtype=np.uint16)).save(tmp_path / "dark2.png")
    assert read_image(str(tmp_path / "dark2.png")).max() == 1
