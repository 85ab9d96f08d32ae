"""The shipped COCO/VOC/Cityscapes recipe (ImageNet start, frozen BN, stem + layer1 frozen, class counts),
the clear offline message for the ImageNet file, and the data checks made at start (class count,
VOC validation year, missing images)."""
import glob
import os

import pytest
import torch

from resdet.backbones.weights import WeightsUnavailableError, hub_cache_path, imagenet_url, load_checkpoint
from resdet.config import ConfigError, load_config
from resdet.engine.builders import build_dataset

from helpers import SPARSE, coco_arrays, load_tool, write_coco, write_voc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "coco", "*.yaml"))) + [
    os.path.join(REPO, "configs", "voc", "faster_rcnn_r34_fpn.yaml"),
    os.path.join(REPO, "configs", "cityscapes", "mask_rcnn_r34_fpn.yaml")]


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=os.path.basename)
def test_detection_configs_start_from_imagenet_with_frozen_bn(path):
    m = load_config(path).model
    assert m.backbone_weights == imagenet_url(m.backbone)  # torchvision's file for this depth
    assert (m.norm, m.frozen_stages) == ("frozen_bn", 2)  # frozen BN; stem + layer1 frozen
    if os.path.join("configs", "coco") in path:
        assert m.num_classes == 81 and load_config(path).data.aspect_ratio_grouping


@pytest.mark.parametrize("name", ["voc/semantic_fpn_r34", "cityscapes/semantic_fpn_r34"])
def test_segmentation_configs_start_from_imagenet(name):
    m = load_config(os.path.join(REPO, "configs", f"{name}.yaml")).model
    assert m.backbone_weights == imagenet_url(m.backbone)


def test_shapes_default_stays_from_scratch():
    assert load_config(os.path.join(REPO, "configs", "shapes", "mask_rcnn_r34_fpn.yaml")).model.backbone_weights is None


def test_timm_pretrained_uses_the_same_files():
    import timm

    import resdet  # noqa: F401  (registers resdet_* with timm)

    for name in ("resnet18", "resnet50"):
        assert timm.models.get_pretrained_cfg(f"resdet_{name}").url == imagenet_url(name)


def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def no_network(url, dst, *a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def test_offline_imagenet_file_one_clear_message(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    url = imagenet_url("resnet18")
    with pytest.raises(WeightsUnavailableError) as err:
        load_checkpoint(url)
    text = str(err.value)
    for part in ("resnet18-f37072fd.pth", url, hub_cache_path(url), "model.backbone_weights=", "null"):
        assert part in text
    assert hub_cache_path(url).startswith(str(tmp_path / "torch_home"))


@pytest.fixture
def keep_resdet_logger():
    """tools/train.py sets up the "resdet" logger (stderr of this test, propagate off): undo it afterwards."""
    import logging

    log = logging.getLogger("resdet")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    for h in list(log.handlers):
        if h not in saved[0]:
            log.removeHandler(h)
            h.close()
    log.handlers[:] = saved[0]
    log.setLevel(saved[1])
    log.propagate = saved[2]


def test_offline_train_exits_nonzero_before_training_without_traceback(monkeypatch, tmp_path, capsys,
                                                                        keep_resdet_logger):

    _offline(monkeypatch, tmp_path)
    out = {"boxes": torch.tensor([[4.0, 4, 40, 40]]), "labels": torch.tensor([1])}
    root = tmp_path / "coco"
    write_coco(str(root), [(coco_arrays(1)[0], out)], [(1, "person")])
    os.symlink(root / "val2017", root / "train2017")
    os.symlink(root / "annotations" / "instances_val2017.json", root / "annotations" / "instances_train2017.json")
    rc = load_tool("train")(["--config", "configs/coco/faster_rcnn_r18_fpn_1x.yaml", f"data.root={root}",
                         "model.num_classes=2", f"train.output_dir={tmp_path / 'out'}", "data.num_workers=0"])
    err = capsys.readouterr().err
    assert rc != 0 and "resnet18-f37072fd.pth" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- data checks at start
def test_class_count_mismatch_is_one_clear_error(tmp_path):

    out = {"boxes": torch.tensor([[4.0, 4, 40, 40]]), "labels": torch.tensor([5])}
    write_coco(str(tmp_path), [(coco_arrays(1)[0], out)], SPARSE)
    cfg = load_config("configs/coco/faster_rcnn_r18_fpn_1x.yaml", [f"data.root={tmp_path}"])  # says 81
    with pytest.raises(ConfigError, match=r"4 categories .* model.num_classes=81: set model.num_classes=5"):
        build_dataset(cfg, train=False)
    cfg.model.num_classes = 3  # fewer than the data has
    with pytest.raises(ConfigError, match="set model.num_classes=5"):
        build_dataset(cfg, train=False)
    cfg.model.num_classes = 5
    assert len(build_dataset(cfg, train=False)) == 1


def test_missing_images_config_key(tmp_path):

    out = {"boxes": torch.tensor([[4.0, 4, 40, 40]]), "labels": torch.tensor([5])}
    write_coco(str(tmp_path), [(a, out) for a in coco_arrays(2)], SPARSE)
    os.remove(tmp_path / "val2017" / "000001.png")
    cfg = load_config("configs/coco/faster_rcnn_r18_fpn_1x.yaml", [f"data.root={tmp_path}", "model.num_classes=5"])
    with pytest.raises(FileNotFoundError, match="000001.png"):
        build_dataset(cfg, train=False)
    cfg = load_config("configs/coco/faster_rcnn_r18_fpn_1x.yaml",
                      [f"data.root={tmp_path}", "model.num_classes=5", "data.missing_images=skip"])
    ds = build_dataset(cfg, train=False)
    assert len(ds) == 1 and ds.skipped["missing_image"] == 1


def test_voc2012_only_devkit_validates_on_2012(tmp_path):

    root = write_voc(tmp_path / "VOCdevkit")
    (root / "VOC2012" / "ImageSets" / "Main" / "val.txt").write_text("2012_000002\n")
    cfg = load_config("configs/voc/faster_rcnn_r34_fpn.yaml",
                      [f"data.root={root}", "data.years=['2012']", "data.train_split=train", "data.val_split=val"])
    val = build_dataset(cfg, train=False)
    assert (val.year, len(val)) == ("2012", 1)
    cfg.data.val_split = "test"  # VOC2007's benchmark split: not in this devkit
    with pytest.raises(ConfigError, match=r"data.val_split='test'.*VOC2012/ImageSets/Main/test.txt"):
        build_dataset(cfg, train=False)
