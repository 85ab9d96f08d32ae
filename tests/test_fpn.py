"""FPN shapes per top block, torchvision parity, and resnet_fpn_backbone inside torchvision detectors."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from resdet.backbones import FPN, ShapeSpec, build_resnet, build_resnet_fpn, resnet_fpn_backbone

DEPTHS = ["resnet18", "resnet50"]


def _features(shapes: dict[str, ShapeSpec], n: int = 2, size: int = 64) -> dict[str, torch.Tensor]:
    return {k: torch.randn(n, s.channels, size // s.stride, size // s.stride) for k, s in shapes.items()}


@pytest.mark.parametrize("name", DEPTHS)
@pytest.mark.parametrize(
    "top_block, source, extra",
    [("maxpool", "p5", ["p6"]), ("p6p7", "p5", ["p6", "p7"]), ("p6p7", "c5", ["p6", "p7"]), (None, "p5", [])],
)
def test_fpn_shapes_per_top_block(name, top_block, source, extra):
    with torch.device("meta"):
        in_shapes = build_resnet(name).output_shape()
    fpn = FPN(in_shapes, top_block=top_block, p6p7_source=source)
    out = fpn(_features(in_shapes, size=128))
    shapes = fpn.output_shape()
    assert list(out) == ["p2", "p3", "p4", "p5"] + extra == list(shapes)
    for k, v in out.items():
        assert v.shape == (2, 256, 128 // shapes[k].stride, 128 // shapes[k].stride), k
    if top_block == "maxpool":
        assert torch.equal(out["p6"], F.max_pool2d(out["p5"], 1, 2, 0))
    if top_block == "p6p7":
        assert fpn.extra_blocks.p6.in_channels == (256 if source == "p5" else in_shapes["c5"].channels)


def test_fpn_over_a_subset_of_levels_and_group_norm():
    in_shapes = {"c3": ShapeSpec(128, 8), "c4": ShapeSpec(256, 16)}
    fpn = FPN(in_shapes, out_channels=64, norm="gn")
    assert fpn.output_shape() == {"p3": ShapeSpec(64, 8), "p4": ShapeSpec(64, 16), "p5": ShapeSpec(64, 32)}
    out = fpn(_features(in_shapes))
    assert [v.shape[-1] for v in out.values()] == [8, 4, 2]
    assert isinstance(fpn.inner_blocks[0][1], torch.nn.GroupNorm) and fpn.inner_blocks[0][0].bias is None
    with pytest.raises(ValueError, match="unknown top_block 'p6'"):
        FPN(in_shapes, top_block="p6")
    with pytest.raises(ValueError, match="norm must be None or 'gn'"):
        FPN(in_shapes, norm="bn")
    with pytest.raises(KeyError, match="FPN expects input level 'c4'"):
        fpn({"c3": torch.randn(1, 128, 8, 8)})


def test_fpn_equals_torchvision_fpn_with_its_state_dict():
    in_shapes = {"c2": ShapeSpec(64, 4), "c3": ShapeSpec(128, 8), "c4": ShapeSpec(256, 16), "c5": ShapeSpec(512, 32)}
    tv = FeaturePyramidNetwork([64, 128, 256, 512], 256, extra_blocks=LastLevelMaxPool()).eval()
    ours = FPN(in_shapes).eval()
    ours.load_state_dict(tv.state_dict())  # strict: identical parameter names
    feats = _features(in_shapes, n=1)
    ref = tv({str(i): v for i, v in enumerate(feats.values())})
    out = ours(feats)
    for a, b in zip(ref.values(), out.values()):
        assert torch.equal(a, b)


def test_backbone_with_fpn_names_and_output_shape():
    tv = resnet_fpn_backbone("resnet18").eval()
    assert tv.out_channels == 256
    out = tv(torch.randn(1, 3, 64, 64))
    assert list(out) == ["0", "1", "2", "3", "pool"] == list(tv.output_shape())
    ours = build_resnet_fpn("resnet18", top_block="p6p7").eval()
    assert list(ours(torch.randn(1, 3, 64, 64))) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    assert list(resnet_fpn_backbone("resnet18", top_block="p6p7").output_shape()) == ["0", "1", "2", "3", "p6", "p7"]
    assert {k.split(".")[0] for k in ours.state_dict()} == {"body", "fpn"}
    assert ours.body.frozen_stages == 0  # no weights: train everything, like torchvision from scratch


def _targets(masks: bool) -> tuple[list[torch.Tensor], list[dict]]:
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = []
    for box, (h, w) in zip(([4.0, 4.0, 30.0, 30.0], [10.0, 5.0, 40.0, 40.0]), ((64, 64), (48, 64))):
        t = dict(boxes=torch.tensor([box]), labels=torch.tensor([1]))
        if masks:
            m = torch.zeros(1, h, w, dtype=torch.uint8)
            m[0, int(box[1]):int(box[3]), int(box[0]):int(box[2])] = 1
            t["masks"] = m
        targets.append(t)
    return images, targets


@pytest.mark.parametrize("name, detector", [("resnet18", MaskRCNN), ("resnet50", FasterRCNN), ("resnet18", FasterRCNN)])
def test_torchvision_detectors_train_step_and_inference(name, detector):
    # Default anchor generator and RoI poolers; only the sample counts are shrunk for CPU speed.
    model = detector(
        resnet_fpn_backbone(name),
        num_classes=3,
        min_size=64,
        max_size=64,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        box_batch_size_per_image=16,
        box_detections_per_img=5,
    )
    images, targets = _targets(masks=detector is MaskRCNN)
    model.train()
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if detector is MaskRCNN else set())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and {"boxes", "labels", "scores"} <= set(detections[0])
    if detector is MaskRCNN:
        assert detections[1]["masks"].shape[1:] == (1, 48, 64)
