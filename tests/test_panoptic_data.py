"""Panoptic data: the Cityscapes converter against cityscapesScripts' createPanopticImgs, and the Cityscapes /
COCO panoptic readers on files written in their real layouts (16-bit instanceIds, crowds, void, ids over all
three colour channels), with their bad-input errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from resdet.data.convert import cityscapes_to_panoptic
from resdet.data.image_io import ImageReadError
from resdet.data.panoptic import CityscapesPanopticDataset, CocoPanopticDataset
from resdet.data.panoptic_io import read_panoptic_png

from helpers import load_tool
from helpers.panoptic import write_cityscapes_gtfine, write_coco_panoptic


@pytest.fixture
def cs_root(tmp_path):
    return write_cityscapes_gtfine(tmp_path / "cityscapes")


@pytest.mark.parametrize("train_id", [False, True])
def test_converter_writes_what_create_panoptic_imgs_writes(cs_root, tmp_path, train_id, capsys):
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    ours, folder = cityscapes_to_panoptic(cs_root, "train", out_dir=str(tmp_path / "ours"), train_id=train_id)
    (tmp_path / "ref").mkdir()
    convert2panoptic(os.path.join(cs_root, "gtFine"), str(tmp_path / "ref"), train_id, ["train"])
    capsys.readouterr()
    name = os.path.basename(ours)
    assert json.load(open(ours)) == json.load(open(tmp_path / "ref" / name))
    pngs = sorted(os.listdir(folder))
    assert len(pngs) == 2 and pngs == sorted(os.listdir(tmp_path / "ref" / name[:-5]))
    for png in pngs:
        assert (np.asarray(Image.open(os.path.join(folder, png))) ==
                np.asarray(Image.open(tmp_path / "ref" / name[:-5] / png))).all()


def test_cityscapes_panoptic_reader(cs_root, capsys):
    assert load_tool("convert_cityscapes_to_panoptic")(["--root", cs_root, "--split", "train"]) == 0
    assert "2 images" in capsys.readouterr().out
    ds = CityscapesPanopticDataset(cs_root, "train", with_panoptic_gt=True)
    assert len(ds) == 2 and ds.num_things == 8 and ds.num_classes == 9 and ds.num_stuff_classes == 11
    assert ds.class_names[:8] == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert ds.class_names[8:11] == ["road", "sidewalk", "building"] and ds.contiguous_to_cat_id[9] == 7
    image, target = ds[0]  # aachen: two cars and a person; a car group and a bicycle group are crowds
    assert image.shape == (3, 32, 64)
    assert sorted(target["labels"].tolist()) == [1, 3, 3] and target["masks"].shape == (3, 32, 64)
    assert target["boxes"].tolist()[target["labels"].tolist().index(1)] == [40, 22, 44, 30]
    sem = target["sem_seg"]
    assert sem[20, 5] == 1 and sem[2, 5] == 11 and sem[11, 50] == 2  # road, sky, sidewalk (stuff 1..11)
    assert sem[15, 5] == 0 and sem[24, 55] == 0 and sem[28, 52] == 0  # things, crowds included: "any thing"
    assert sem[9, 5] == 255 and sem[0, 0] == 255  # parking and ego vehicle are void
    crowd = [s for s in target["segments_info"] if s["iscrowd"]]
    assert sorted((s["id"], s["category_id"]) for s in crowd) == [(26, 26), (33, 33)]
    assert target["panoptic_seg"][15, 5] == 26000 and target["panoptic_image_id"] == "aachen_000000_000019"
    assert ds[1][1]["labels"].tolist() == [2, 3]  # bochum: rider, car


def test_coco_panoptic_reader(tmp_path):
    ann = write_coco_panoptic(tmp_path / "coco")
    ds = CocoPanopticDataset(str(tmp_path / "coco" / "val2017"), ann, with_panoptic_gt=True)
    assert ds.thing_cat_ids == [1, 3, 8] and ds.stuff_cat_ids == [92, 118, 200]
    assert ds.contiguous_to_cat_id == {1: 1, 2: 3, 3: 8, 4: 92, 5: 118, 6: 200} and ds.num_stuff_classes == 3
    _, target = ds[0]
    assert target["image_id"] == 139 and target["labels"].tolist() == [1, 2]  # the car crowd is no instance
    assert target["sem_seg"][0, 5] == 2 and target["sem_seg"][20, 5] == 1  # sky, road
    assert target["sem_seg"][3, 25] == 0 and target["sem_seg"][0, 0] == 255  # crowd thing, void
    assert target["panoptic_seg"][0, 5] == 3290681
    assert {s["id"]: s["area"] for s in target["segments_info"]}[2001] == 40
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 24, 32)
    assert len(CocoPanopticDataset(str(tmp_path / "coco" / "val2017"), ann, remove_empty=True)) == 1


def test_training_pipeline_moves_masks_and_sem_seg_together(tmp_path):
    from resdet.data.transforms import build_transforms

    ann = write_coco_panoptic(tmp_path / "coco")
    ds = CocoPanopticDataset(str(tmp_path / "coco" / "val2017"), ann,
                             transforms=build_transforms(train=True, hflip_prob=1.0))
    _, flipped = ds[0]
    _, plain = CocoPanopticDataset(str(tmp_path / "coco" / "val2017"), ann)[0]
    assert (flipped["sem_seg"] == plain["sem_seg"].flip(-1)).all()
    assert (flipped["masks"] == plain["masks"].flip(-1)).all()
    with pytest.raises(ValueError, match="with_panoptic_gt needs transforms=None"):
        CocoPanopticDataset(str(tmp_path / "coco" / "val2017"), ann, transforms=build_transforms(train=True),
                            with_panoptic_gt=True)


def _edit_json(path, edit):
    data = json.load(open(path))
    edit(data)
    json.dump(data, open(path, "w"))


@pytest.mark.parametrize("case", ["png_id_not_in_json", "json_id_not_in_png", "unknown_category", "png_size",
                                  "image_size", "grey_png", "missing_png_folder"])
def test_bad_panoptic_input_is_one_line_naming_file_and_id(tmp_path, case):
    ann = write_coco_panoptic(tmp_path / "coco")
    png = tmp_path / "coco" / "annotations" / "panoptic_val2017" / "000000000139.png"
    build = True
    if case == "png_id_not_in_json":
        _edit_json(ann, lambda d: d["annotations"][0]["segments_info"].pop(1))
        error, match = ValueError, "000000000139.png \\(image id 139\\): segment id 2000 is in the PNG but not in"
    elif case == "json_id_not_in_png":
        _edit_json(ann, lambda d: d["annotations"][0]["segments_info"].append({"id": 77, "category_id": 1}))
        error, match = ValueError, "000000000139.png \\(image id 139\\): segment id 77 is in segments_info but"
    elif case == "unknown_category":
        _edit_json(ann, lambda d: d["annotations"][0]["segments_info"][0].update(category_id=5))
        error, build = ValueError, False
        match = "panoptic_val2017.json: image 139, segment id 1000: unknown category_id 5"
    elif case == "png_size":
        Image.fromarray(np.asarray(Image.open(png))[:-1]).save(png)
        error, match = ImageReadError, "000000000139.png' is 23x32 \\(HxW\\) but .*says 24x32 for image id 139"
    elif case == "image_size":
        jpg = tmp_path / "coco" / "val2017" / "000000000139.jpg"
        Image.open(jpg).resize((30, 24)).save(jpg)
        error, match = ImageReadError, "000000000139.jpg' is 24x30 \\(HxW\\) but .*panoptic_val2017.json says 24x32"
    elif case == "grey_png":
        Image.fromarray(np.zeros((24, 32), np.uint16)).save(png)  # a 16-bit grey PNG holds no panopticapi ids
        error, match = ImageReadError, "000000000139.png' has mode I;16"
    else:
        os.rename(png.parent, tmp_path / "moved")
        error, match, build = FileNotFoundError, "panoptic PNG folder not found: .*panoptic_val2017'", False
    with pytest.raises(error, match=match) as info:
        ds = CocoPanopticDataset(str(tmp_path / "coco" / "val2017"), ann)
        assert build
        ds[0]
    assert "\n" not in str(info.value)


def test_cityscapes_panoptic_errors_say_what_to_run(cs_root):
    with pytest.raises(FileNotFoundError, match="tools/convert_cityscapes_to_panoptic.py --root"):
        CityscapesPanopticDataset(cs_root, "val")
    cityscapes_to_panoptic(cs_root, "train")
    os.remove(os.path.join(cs_root, "leftImg8bit", "train", "bochum", "bochum_000000_000313_leftImg8bit.png"))
    match = "image id 'bochum_000000_000313' points at .*bochum_000000_000313_leftImg8bit.png"
    with pytest.raises(FileNotFoundError, match=match):
        CityscapesPanopticDataset(cs_root, "train")
    assert len(CityscapesPanopticDataset(cs_root, "train", missing_images="skip")) == 1
    assert read_panoptic_png(os.path.join(cs_root, "gtFine", "cityscapes_panoptic_train",
                                          "aachen_000000_000019_gtFine_panoptic.png"))[15, 5] == 26000
