"""CityscapesDataset on a leftImg8bit/gtFine tree written here, and the Cityscapes → COCO converter."""
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from resdet.data import CITYSCAPES_THING_NAMES, CITYSCAPES_TRAIN_ID_NAMES, CityscapesDataset, CocoDataset
from resdet.data.cityscapes_labels import label_ids_to_train_ids
from resdet.data.convert import cityscapes_to_coco, write_json

from helpers import load_tool, write_cityscapes


@pytest.fixture
def cs_root(tmp_path):
    return write_cityscapes(tmp_path / "cityscapes")


def test_label_table():
    assert len(CITYSCAPES_TRAIN_ID_NAMES) == 19 and CITYSCAPES_TRAIN_ID_NAMES[0] == "road"
    assert CITYSCAPES_TRAIN_ID_NAMES[18] == "bicycle"
    assert CITYSCAPES_THING_NAMES == ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
    ids = np.array([[7, 26, 29, 0, -1, 300]])
    assert label_ids_to_train_ids(ids).tolist() == [[0, 13, 255, 255, 255, 255]]


def test_semantic_targets(cs_root):
    ds = CityscapesDataset(str(cs_root), "train", task="semantic")
    assert len(ds) == 2 and ds.num_classes == 19
    image, target = ds[0]
    assert image.shape == (3, 32, 64)
    sem = target["sem_seg"]
    assert sem[20, 5] == 0 and sem[2, 5] == 10 and sem[9, 5] == 255 and sem[0, 0] == 255
    assert sem[15, 5] == 13 and sem[25, 41] == 11
    assert target["boxes"].shape == (0, 4)


def test_instance_targets_leave_crowds_out(cs_root):
    ds = CityscapesDataset(str(cs_root), "train", task="instance")
    assert ds.num_classes == 9
    _, target = ds[0]
    assert target["labels"].tolist() == [1, 3, 3]  # person (24000) then cars (26000, 26001)
    assert target["boxes"].tolist() == [[40, 22, 44, 30], [2, 12, 12, 20], [20, 12, 30, 20]]
    assert target["masks"].shape == (3, 32, 64) and target["masks"].sum() == 32 + 80 + 80
    crowd_labels, crowd_masks = ds.crowd_masks(0)
    assert crowd_labels.tolist() == [3] and crowd_masks.sum() == 40
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 32, 64)
    assert len(CityscapesDataset(str(cs_root), "train", task="instance", remove_empty=True)) == 1


def test_missing_annotation_named(cs_root):
    os.remove(cs_root / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_labelIds.png")
    with pytest.raises(FileNotFoundError, match="bochum_000000_000313_gtFine_labelIds.png"):
        CityscapesDataset(str(cs_root), "train")
    with pytest.raises(FileNotFoundError, match="leftImg8bit/val"):
        CityscapesDataset(str(cs_root), "val")


def test_cityscapes_to_coco_round_trip(cs_root, tmp_path):
    ann_file = write_json(cityscapes_to_coco(str(cs_root), "train"), str(tmp_path / "cs.json"))
    coco = COCO(ann_file)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[0]))
    assert sorted((a["category_id"], a["iscrowd"]) for a in anns) == [(1, 0), (3, 0), (3, 0), (3, 1)]
    via_coco = CocoDataset(str(cs_root / "leftImg8bit" / "train"), ann_file)
    direct = CityscapesDataset(str(cs_root), "train", task="instance")
    for i in range(2):
        a, b = via_coco[i][1], direct[i][1]
        assert sorted(a["labels"].tolist()) == sorted(b["labels"].tolist())
        order_a, order_b = np.lexsort(a["boxes"].numpy().T), np.lexsort(b["boxes"].numpy().T)
        assert np.allclose(a["boxes"].numpy()[order_a], b["boxes"].numpy()[order_b])
        assert (a["masks"].numpy()[order_a] == b["masks"].numpy()[order_b]).all()


def test_convert_tool(cs_root, tmp_path):
    out = load_tool("convert_cityscapes_to_coco")(["--root", str(cs_root), "--split", "train",
                                                   "--out", str(tmp_path / "o.json")])
    assert len(COCO(out).getAnnIds()) == 4
