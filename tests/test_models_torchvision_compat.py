"""resdet detectors built from torchvision's Faster / Mask R-CNN give torchvision's detections."""
import pytest
import torch
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    MaskRCNN,
    fasterrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d

from resdet.models import GeneralizedRCNN, convert_torchvision_state_dict, from_torchvision

# Keyword options with the same names and meaning in torchvision and resdet; few proposals keep it fast.
SMALL = dict(
    min_size=96, max_size=128, box_score_thresh=0.0, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
    box_detections_per_img=8,
)


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 80, 110, generator=g), torch.rand(3, 96, 72, generator=g)]


def _small_tv(arch, num_classes: int) -> nn.Module:
    """torchvision detector on a ResNet-18 FPN with frozen BatchNorm (and a 2-conv, 64-channel mask head)."""
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3, norm_layer=FrozenBatchNorm2d)
    if arch is MaskRCNN:
        heads = dict(mask_head=MaskRCNNHeads(256, [64, 64], 1), mask_predictor=MaskRCNNPredictor(64, 32, num_classes))
        box_predictor = FastRCNNPredictor(1024, num_classes)
        return _spread(MaskRCNN(body, num_classes=None, box_predictor=box_predictor, **heads, **SMALL))
    return _spread(FasterRCNN(body, num_classes=num_classes, **SMALL))


def _spread(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, and class scores spread apart so detection order is stable."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    cls = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls.weight.normal_(0, 0.01, generator=g)
        cls.bias.copy_(torch.linspace(0, 4, cls.out_features))
    return model.eval()


def _assert_same(ours, ref, atol=1e-4, rtol=1e-4, mask_atol=None):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert set(a) == set(b)
        assert len(b["boxes"]) > 0
        assert torch.equal(a["labels"], b["labels"])
        for key in ("boxes", "scores", "masks"):
            if key in b:
                tol = mask_atol if key == "masks" and mask_atol is not None else atol
                torch.testing.assert_close(a[key], b[key], atol=tol, rtol=rtol)


def _run(model, images):
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("arch", [FasterRCNN, MaskRCNN])
def test_frozen_bn_parity_and_fused(arch):
    tv = _small_tv(arch, 6)
    images = _images()
    ref = _run(tv, images)
    ours = from_torchvision(tv)
    assert isinstance(ours, GeneralizedRCNN) and ours.has_masks == (arch is MaskRCNN)
    if arch is MaskRCNN:
        assert len(ours.roi_heads.mask_head) == 2 and ours.roi_heads.mask_predictor.conv5_mask.out_channels == 32
    assert ours.backbone.body.frozen_stages == 2
    _assert_same(_run(ours, images), ref)
    # Folded BatchNorm + channels-last: equal within float tolerance.
    _assert_same(_run(ours.optimize_for_inference(), images), ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("builder", [fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn])
def test_torchvision_resnet50_builders_parity(builder):
    torch.manual_seed(0)
    options = {**SMALL, "min_size": 64}
    tv = _spread(builder(weights=None, weights_backbone=None, num_classes=5, **options))  # BatchNorm2d, eval
    images = _images()[:1]
    ref = _run(tv, images)
    # norm="bn" keeps torchvision's BatchNorm kernels: the same numbers. (The default frozen BatchNorm
    # computes the same affine map in another rounding order, which a random ResNet-50 amplifies.)
    # resdet's CPU RoIAlign sums each bin in another order (pooled features ~400 here, differences of
    # an ulp); through this random ResNet-50 that moves boxes by ~4e-5 px and pasted masks by up to ~2e-4.
    _assert_same(_run(from_torchvision(tv, norm="bn"), images), ref, mask_atol=5e-4)
    _assert_same(_run(from_torchvision(tv.state_dict(), norm="bn", **options), images), ref, mask_atol=5e-4)


def _old_layout(sd):
    """torchvision's pre-0.13 key names, used by the published COCO v1 checkpoints."""
    out = {}
    for k, v in sd.items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for part in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                k = k.replace(f"fpn.{part}.{i}.0.", f"fpn.{part}.{i}.")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        out[k] = v
    return out


def test_state_dict_old_layout_and_eps():
    tv = _small_tv(MaskRCNN, 4)
    old = _old_layout(tv.state_dict())
    assert "roi_heads.mask_head.mask_fcn1.weight" in old and "rpn.head.conv.weight" in old
    converted = convert_torchvision_state_dict(old)
    assert set(converted) == set(tv.state_dict())
    ours = from_torchvision(old, bn_eps=1e-5, **SMALL)
    _assert_same(_run(ours, _images()), _run(tv, _images()))
    # A frozen-BatchNorm checkpoint defaults to eps 0 (torchvision's published COCO v1 weights).
    assert from_torchvision(old, **SMALL).backbone.body.bn1.eps == 0.0


def test_v2_mask_rcnn_parity():
    torch.manual_seed(0)
    options = {**SMALL, "min_size": 64}
    tv = _spread(maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3, **options))
    images = _images()[:1]
    ours = from_torchvision(tv, norm="bn")
    assert ours.rpn.head.conv[1][0].weight.shape == (256, 256, 3, 3)  # conv_depth 2
    _assert_same(_run(ours, images), _run(tv, images))


def test_unknown_option_and_bad_checkpoint():
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    tv = FasterRCNN(body, num_classes=3)
    with pytest.raises(TypeError, match="mask_layers"):
        from_torchvision(tv, mask_layers=(256,))
    sd = tv.state_dict()
    sd.pop("roi_heads.box_predictor.bbox_pred.bias")
    with pytest.raises(ValueError, match="bbox_pred.bias"):
        from_torchvision(sd)
