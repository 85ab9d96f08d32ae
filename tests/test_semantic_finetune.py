"""Fine-tuning a semantic FPN from detection / ImageNet checkpoints: backbone + FPN load, the head stays
re-initialised, and the report says which keys came from where."""
import torch
import torchvision

from resdet.engine.pretrained import load_pretrained
from resdet.models.semantic_fpn import semantic_fpn


def _semantic(backbone="resnet18", num_classes=4, **options):
    return semantic_fpn(backbone, num_classes=num_classes, conv_dims=32, **options)


def _head_keys(model):
    return {k for k in model.state_dict() if k.startswith("sem_seg_head.") and not k.endswith("num_batches_tracked")}


def _assert_same(model, key, value):
    torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_from_resdet_detector_checkpoint(tmp_path):
    from resdet.models import faster_rcnn

    detector = faster_rcnn("resnet18", num_classes=5)
    sd = detector.state_dict()
    path = tmp_path / "detector.pth"
    torch.save({"model": sd, "resdet": {"version": "test"}, "iteration": 10}, path)
    model = _semantic()
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("sem_seg_head.")}
    report = load_pretrained(model, path)
    assert report.source == "resdet"
    shared = {k for k in model.state_dict() if k.startswith("backbone.") and not k.endswith("num_batches_tracked")}
    assert shared and shared <= set(report.loaded)
    assert {k for k in report.loaded if not k.startswith("backbone.")} == set()
    assert set(report.missing) == _head_keys(model)
    assert report.unexpected and all(k.startswith(("rpn.", "roi_heads.")) for k in report.unexpected)
    for k in ("backbone.body.layer3.0.conv1.weight", "backbone.fpn.layer_blocks.0.weight"):
        key = next(m for m in model.state_dict() if m.startswith(k.rsplit(".", 1)[0]) and m.endswith("weight"))
        _assert_same(model, key, sd[key])
    for k, v in head_before.items():  # the head keeps its fresh initialisation
        _assert_same(model, k, v)
    text = str(report)
    assert "resdet" in text and "sem_seg_head" in text and "roi_heads" in text


def test_from_torchvision_detection_checkpoint(tmp_path):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    tv = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5), num_classes=91)
    sd = tv.state_dict()
    path = tmp_path / "tv_frcnn.pth"
    torch.save(sd, path)
    model = _semantic()
    report = load_pretrained(model, path)
    assert report.source == "torchvision_detection"
    body = {k for k in model.state_dict() if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked")}
    fpn = {k for k in model.state_dict() if k.startswith("backbone.fpn.")}
    assert body <= set(report.loaded) and fpn <= set(report.loaded), str(report)
    assert set(report.missing) == _head_keys(model)
    _assert_same(model, "backbone.body.layer4.1.conv2.weight", sd["backbone.body.layer4.1.conv2.weight"])
    assert not report.skipped


def test_from_imagenet_backbone_checkpoint(tmp_path):
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(sd, path)
    model = _semantic()
    report = load_pretrained(model, path)
    assert report.source == "imagenet_backbone"
    body = {k for k in model.state_dict() if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked")}
    assert body <= set(report.loaded) and all(k.startswith("backbone.body.") for k in report.loaded)
    assert report.unexpected == [] and not report.skipped
    _assert_same(model, "backbone.body.conv1.weight", sd["conv1.weight"])


def test_other_num_classes_is_skipped_and_reinitialised(tmp_path):
    source = _semantic(num_classes=7)
    path = tmp_path / "sem7.pth"
    torch.save({"model": source.state_dict(), "resdet": {}}, path)
    model = _semantic(num_classes=4)
    report = load_pretrained(model, path)
    skipped = {k for k, _, _ in report.skipped}
    assert skipped == {"sem_seg_head.predictor.weight", "sem_seg_head.predictor.bias"}
    assert "sem_seg_head.scale_heads.p5.2.0.weight" in report.loaded
    assert report.missing == [] and report.unexpected == []


def test_cityscapes_mask_rcnn_from_coco_detector(tmp_path):
    """configs/cityscapes/mask_rcnn_r34_fpn.yaml: a COCO Mask R-CNN (91 classes) into a 9-class one."""
    from resdet.models import mask_rcnn

    coco = mask_rcnn("resnet18", num_classes=91)
    path = tmp_path / "coco_mask_rcnn.pth"
    torch.save({"model": coco.state_dict(), "resdet": "test"}, path)
    model = mask_rcnn("resnet18", num_classes=9)
    report = load_pretrained(model, path)
    skipped = {k for k, _, _ in report.skipped}
    assert skipped and all(k.startswith(("roi_heads.box_predictor.", "roi_heads.mask_predictor.")) for k in skipped)
    assert any(k.startswith("rpn.") for k in report.loaded) and any("box_head" in k for k in report.loaded)
    assert report.missing == [] and report.unexpected == []


def test_semantic_config_loads_the_fpn_of_a_detector_with_the_same_option(tmp_path):
    """Detectors and the semantic FPN name the FPN width alike, so one override makes the FPN transfer."""
    import os

    from resdet.config import load_config
    from resdet.models import build_model, faster_rcnn

    detector = faster_rcnn("resnet18", num_classes=5, fpn_out_channels=32)
    path = tmp_path / "detector.pth"
    torch.save({"model": detector.state_dict(), "resdet": {"version": "test"}, "iteration": 1}, path)
    config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "shapes", "semantic_fpn_r34.yaml")
    cfg = load_config(config, ["model.backbone=resnet18", "model.options.fpn_out_channels=32"])
    model = build_model(cfg)
    report = load_pretrained(model, path)
    fpn = {k for k in model.state_dict() if k.startswith("backbone.fpn.")}
    assert fpn and fpn <= set(report.loaded) and not report.skipped
    key = sorted(fpn)[0]
    _assert_same(model, key, detector.state_dict()[key])
