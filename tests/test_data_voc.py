"""VOCDataset on a VOCdevkit written here (XML, split files, palette PNGs) and the VOC → COCO converter."""
import os

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from resdet.data import VOC_CLASSES, CocoDataset, VOCDataset
from resdet.data.convert import voc_to_coco, write_json

from helpers import load_tool, write_voc, write_voc_png


@pytest.fixture
def voc_root(tmp_path):
    return write_voc(tmp_path / "VOCdevkit")


def test_detection_targets_leave_difficult_out_by_default(voc_root):
    ds = VOCDataset(str(voc_root), "2012", "train")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.class_names == list(VOC_CLASSES)
    image, target = ds[0]
    assert image.shape == (3, 48, 64)
    assert target["image_id"] == 2012000001
    assert target["boxes"].tolist() == [[10, 5, 30, 40]]  # 1-based XML -> 0-based pixel edges
    assert target["labels"].tolist() == [VOC_CLASSES.index("person") + 1]
    assert target["difficult"].tolist() == [False]
    full = ds.get_annotation(0)  # evaluation sees every object with its flag
    assert full["difficult"].tolist() == [False, True] and full["labels"][1] == VOC_CLASSES.index("dog") + 1
    kept = VOCDataset(str(voc_root), 2012, "train", keep_difficult=True)
    assert kept[0][1]["difficult"].tolist() == [False, True]


def test_semantic_targets(voc_root):
    ds = VOCDataset(str(voc_root), "2012", "train", task="semantic")
    _, target = ds[1]
    sem = target["sem_seg"]
    assert sem.shape == (48, 64) and str(sem.dtype) == "torch.int64"
    assert set(sem.unique().tolist()) == {0, VOC_CLASSES.index("cat") + 1, 255}
    assert ds.class_names[0] == "background" and len(ds.class_names) == 21


def test_instance_targets(voc_root):
    ds = VOCDataset(str(voc_root), "2012", "train", task="instance")
    _, target = ds[1]
    assert target["labels"].tolist() == [8, 8]  # cat
    assert target["masks"].shape == (2, 48, 64)
    # masks exclude the 255 outline row, boxes are the masks' tight boxes
    assert target["boxes"].tolist() == [[0, 1, 20, 20], [30, 11, 64, 48]]
    assert target["area"].tolist() == [19 * 20, 37 * 34]


def test_unknown_class_names_file_and_object(voc_root):
    write_voc(voc_root, bad_class=True)
    with pytest.raises(ValueError, match=r"2012_000001\.xml: object #1 has class 'dragon'"):
        VOCDataset(str(voc_root), "2012", "train")


def test_missing_files_named(voc_root, tmp_path):
    os.remove(voc_root / "VOC2012" / "JPEGImages" / "2012_000002.jpg")
    with pytest.raises(FileNotFoundError, match="2012_000002.jpg"):
        VOCDataset(str(voc_root), "2012", "train")
    with pytest.raises(FileNotFoundError, match="VOC2007"):
        VOCDataset(str(voc_root), "2007", "train")


@pytest.mark.parametrize("task", ["detection", "instance"])
def test_voc_to_coco_round_trip(voc_root, tmp_path, task):
    data = voc_to_coco(str(voc_root), "2012", "train", task=task)
    ann_file = write_json(data, str(tmp_path / f"voc_{task}.json"))
    coco = COCO(ann_file)
    assert len(coco.imgs) == 2 and coco.loadCats(8)[0]["name"] == "cat"
    image_dir = str(voc_root / "VOC2012" / "JPEGImages")
    via_coco = CocoDataset(image_dir, ann_file)
    direct = VOCDataset(str(voc_root), "2012", "train", task=task)
    for i in range(2):
        a, b = via_coco[i][1], direct[i][1]
        assert a["image_id"] == b["image_id"]
        assert a["labels"].tolist() == b["labels"].tolist()
        assert np.allclose(a["boxes"].numpy(), b["boxes"].numpy())
        if task == "instance":
            assert (a["masks"] == b["masks"]).all()
    if task == "detection":  # difficult objects: iscrowd=1, so COCOeval ignores them and training skips them
        assert [a["iscrowd"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[2012000001]))] == [0, 1]
        # ground truth as detections scores AP 1
        dets = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=1.0)
                for a in coco.dataset["annotations"] if not a["iscrowd"]]
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)


def test_convert_tool(voc_root, tmp_path):
    out = load_tool("convert_voc_to_coco")(["--root", str(voc_root), "--year", "2012", "--split", "train",
                                            "--out", str(tmp_path / "o.json")])
    assert len(COCO(out).getAnnIds()) == 4


def test_instance_remove_empty(voc_root):
    base = voc_root / "VOC2012"
    write_voc_png(np.zeros((48, 64), np.uint8), base / "SegmentationObject" / "2012_000002.png")
    assert len(VOCDataset(str(voc_root), "2012", "train", task="instance", remove_empty=True)) == 1
    assert len(VOCDataset(str(voc_root), "2012", "train", task="instance")) == 2
