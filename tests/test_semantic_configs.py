"""Segmentation configs load, and build the model they name with the settings their comments promise."""
import os

import pytest

from resdet.config import load_config
from resdet.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "name, num_classes, dataset",
    [("cityscapes/semantic_fpn_r34", 19, "cityscapes"), ("voc/semantic_fpn_r34", 21, "voc"),
     ("shapes/semantic_fpn_r34", 5, "shapes")],
)
def test_semantic_configs_build(name, num_classes, dataset):
    # The ImageNet start is tested in test_coco_recipe.py; build from scratch here (no download).
    cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"), ["model.backbone_weights=null"])
    assert (cfg.model.arch, cfg.data.task, cfg.data.dataset) == ("semantic_fpn", "semantic", dataset)
    assert cfg.eval.evaluator == "sem_seg" and cfg.train.best_metric == "mIoU"
    model = build_model(cfg)
    assert model.num_classes == num_classes
    assert model.backbone.body.layer4[0].conv1.in_channels == 256  # resnet34's BasicBlock stage 4
    t = model.transform
    if dataset == "cityscapes":  # 512x1024 crops in training, full 1024x2048 images in evaluation
        assert t.crop_size == (512, 1024) and t.min_size is None and t.scale_range == (0.5, 2.0)
    if dataset == "voc":
        assert t.crop_size == (512, 512) and t.min_size == (512,)


@pytest.mark.parametrize(
    "name, num_classes, crop, min_size",
    [("cityscapes/deeplabv3plus_r50", 19, (512, 1024), None), ("voc/deeplabv3plus_r50", 21, (512, 512), (512,)),
     ("shapes/deeplabv3plus_r34", 5, None, None)],
)
def test_deeplabv3plus_configs_build(name, num_classes, crop, min_size):
    from resdet.engine.lr_schedule import resolve_schedule

    cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"), ["model.backbone_weights=null"])
    assert (cfg.model.arch, cfg.data.task, cfg.eval.evaluator) == ("deeplabv3plus", "semantic", "sem_seg")
    model = build_model(cfg)
    assert model.num_classes == num_classes and model.backbone.output_stride == 16
    assert model.classifier.aspp.rates == (6, 12, 18)
    assert model.transform.crop_size == crop and model.transform.min_size == min_size
    if crop is not None:  # the published recipes: poly 0.9, lr 0.01 for 16 images
        s = cfg.solver
        assert (s.schedule, s.poly_power, s.lr, s.base_batch_size) == ("poly", 0.9, 0.01, 16)
        assert model.transform.scale_range == (0.5, 2.0)
        # A short run keeps the warmup inside it (fractions of max_iter).
        resolve_schedule(max_iter=50, steps=s.steps, warmup_iters=s.warmup_iters, schedule=s.schedule)


def test_cityscapes_mask_rcnn_config():
    cfg = load_config(os.path.join(REPO, "configs", "cityscapes", "mask_rcnn_r34_fpn.yaml"))
    assert (cfg.model.arch, cfg.model.num_classes, cfg.data.task) == ("mask_rcnn", 9, "instance")
    assert cfg.model.weights and cfg.eval.iou_types == ["bbox", "segm"]
    assert cfg.model.min_size[-1] == 1024  # the test scale of the Mask R-CNN paper


def _write_voc_semantic(root, year, splits):
    import numpy as np
    from PIL import Image

    base = os.path.join(root, f"VOC{year}")
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, folder), exist_ok=True)
    for split, ids in splits.items():
        for file_id in ids:
            Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(os.path.join(base, "JPEGImages", f"{file_id}.jpg"))
            label = np.zeros((40, 48), np.uint8)
            label[10:20, 10:30] = 15
            Image.fromarray(label).save(os.path.join(base, "SegmentationClass", f"{file_id}.png"))
        with open(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")


def test_voc_semantic_config_reads_voc2012_train_and_val(tmp_path):
    from resdet.engine.builders import build_dataset, build_evaluator

    root = tmp_path / "VOCdevkit"
    _write_voc_semantic(root, "2012", {"train": ["2012_000001", "2012_000002"], "val": ["2012_000003"]})
    cfg = load_config(os.path.join(REPO, "configs", "voc", "semantic_fpn_r34.yaml"), [f"data.root={root}"])
    train, val = build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    assert (len(train), len(val)) == (2, 1)
    image, target = val[0]
    assert target["sem_seg"].shape == image.shape[-2:] and set(target["sem_seg"].unique().tolist()) == {0, 15}
    evaluator = build_evaluator(cfg, val)
    assert evaluator.class_names[15] == "person"


def test_voc_semantic_bad_label_and_size_name_the_file(tmp_path):
    import numpy as np
    from PIL import Image

    from resdet.data.image_io import ImageReadError
    from resdet.data.voc import VOCDataset

    root = tmp_path / "VOCdevkit"
    _write_voc_semantic(root, "2012", {"train": ["2012_000001", "2012_000002"]})
    seg = root / "VOC2012" / "SegmentationClass"
    label = np.zeros((40, 48), np.uint8)
    label[0, :3] = 30  # neither a VOC class (0..20) nor 255
    Image.fromarray(label).save(seg / "2012_000001.png")
    Image.fromarray(np.zeros((30, 48), np.uint8)).save(seg / "2012_000002.png")  # the image is 40x48
    data = VOCDataset(str(root), "2012", "train", task="semantic")
    with pytest.raises(ValueError, match=r"2012_000001\.png.*label\(s\) \[30\] at 3 pixels, expected 0\.\.20 or 255"):
        data[0]
    with pytest.raises(ImageReadError, match=r"2012_000002\.jpg.* is 40x48 .* but .*2012_000002\.png.* says 30x48"):
        data[1]
