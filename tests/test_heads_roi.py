"""RoIHeads (box + mask): torchvision parity, empty targets, gradients, loss options, batch vs single."""
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection import mask_rcnn as tv_mrcnn
from torchvision.models.detection import roi_heads as tv_roi
from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign

from resdet.heads import (
    ConvFCHead,
    FastRCNNPredictor,
    MaskHead,
    MaskPredictor,
    MultiScaleRoIAlign,
    RoIHeads,
    TwoMLPHead,
)

C, K, D = 32, 4, 64
SIZES = [(96, 120), (80, 128)]


def features(n: int = 2) -> OrderedDict:
    return OrderedDict((f"p{level}", torch.randn(n, C, 96 >> level, 128 >> level)) for level in range(2, 7))


def proposals() -> list[torch.Tensor]:
    out = []
    for n, (h, w) in zip((120, 80), SIZES):
        xy = torch.rand(n, 2) * torch.tensor([w * 0.8, h * 0.8])
        boxes = torch.cat([xy, xy + torch.rand(n, 2) * 50 + 4], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(max=w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(max=h)
        out.append(boxes)
    return out


def targets(empty_second: bool = True) -> list[dict]:
    masks = torch.zeros(2, 96, 120, dtype=torch.uint8)
    masks[0, 20:90, 10:60] = 1
    masks[1, 40:80, 50:110] = 1
    first = {
        "boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [50.0, 40.0, 110.0, 80.0]]),
        "labels": torch.tensor([1, 3]),
        "masks": masks,
    }
    second = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 80, 128, dtype=torch.uint8)}
    if not empty_second:
        second = {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([2]),
                  "masks": torch.ones(1, 80, 128, dtype=torch.uint8)}
    return [first, second]


def build(variant: str = "v1", with_mask: bool = True, **options):
    if variant == "v1":
        ours_box, tv_box = TwoMLPHead(C * 49, D), tv_frcnn.TwoMLPHead(C * 49, D)
        ours_mask, tv_mask = MaskHead(C, (C,) * 4), tv_mrcnn.MaskRCNNHeads(C, [C] * 4, 1)
    else:  # torchvision's v2 models: 4conv1fc and mask head with BatchNorm
        ours_box = ConvFCHead((C, 7, 7), (C,) * 4, (D,), norm="bn")
        tv_box = tv_frcnn.FastRCNNConvFCHead((C, 7, 7), [C] * 4, [D], norm_layer=nn.BatchNorm2d)
        ours_mask = MaskHead(C, (C,) * 4, norm="bn")
        tv_mask = tv_mrcnn.MaskRCNNHeads(C, [C] * 4, 1, norm_layer=nn.BatchNorm2d)
    mask = {}
    if with_mask:
        mask = dict(
            mask_roi_pool=MultiScaleRoIAlign(output_size=14), mask_head=ours_mask, mask_predictor=MaskPredictor(C, C, K)
        )
    ours = RoIHeads(MultiScaleRoIAlign(), ours_box, FastRCNNPredictor(D, K), detections_per_img=25, **mask, **options)
    tv_pool = ["0", "1", "2", "3"]
    theirs = tv_roi.RoIHeads(
        TVMultiScaleRoIAlign(tv_pool, 7, 2), tv_box, tv_frcnn.FastRCNNPredictor(D, K),
        0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 25,
        **({"mask_roi_pool": TVMultiScaleRoIAlign(tv_pool, 14, 2), "mask_head": tv_mask,
            "mask_predictor": tv_mrcnn.MaskRCNNPredictor(C, C, K)} if with_mask else {}),
    )
    ours.load_state_dict(theirs.state_dict())  # strict: the names are the same
    return ours, theirs


def run(module, feats, props, tgts, training: bool, seed: int = 1):
    module.train(training)
    for m in module.modules():  # BatchNorm in eval so both see the same statistics
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    torch.manual_seed(seed)
    with torch.set_grad_enabled(training):
        return module(feats, [p.clone() for p in props], SIZES, tgts)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_roi_heads_parity_with_torchvision(variant):
    ours, theirs = build(variant)
    feats, props = features(), proposals()
    tv_feats = OrderedDict(zip(["0", "1", "2", "3", "pool"], feats.values()))
    dets, _ = run(ours, feats, props, None, training=False)
    tv_dets, _ = run(theirs, tv_feats, props, None, training=False)
    assert len(dets[0]["boxes"]) > 0
    for a, b in zip(dets, tv_dets):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)
    _, losses = run(ours, feats, props, targets(), training=True)
    _, tv_losses = run(theirs, tv_feats, props, targets(), training=True)
    assert sorted(losses) == sorted(tv_losses) == ["loss_box_reg", "loss_classifier", "loss_mask"]
    for key in losses:
        torch.testing.assert_close(losses[key], tv_losses[key], rtol=0, atol=1e-6)


def test_roi_heads_gradients_reach_every_parameter():
    ours, _ = build("v1")
    _, losses = run(ours, features(), proposals(), targets(empty_second=False), training=True)
    sum(losses.values()).backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_roi_heads_empty_targets_train_as_negatives():
    ours, _ = build("v1")
    empty = [targets()[1], targets()[1]]
    empty[0] = dict(empty[0], masks=torch.zeros(0, 96, 120, dtype=torch.uint8))
    _, losses = run(ours, features(), proposals(), empty, training=True)
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    assert torch.isfinite(losses["loss_classifier"]) and losses["loss_classifier"].item() > 0
    sum(losses.values()).backward()  # the zero losses stay connected to the graph


@pytest.mark.parametrize("box_loss", ["l1", "giou"])
def test_roi_heads_box_loss_options(box_loss):
    ours, _ = build("v1", with_mask=False, box_loss=box_loss)
    _, losses = run(ours, features(), proposals(), targets(), training=True)
    assert sorted(losses) == ["loss_box_reg", "loss_classifier"]
    assert torch.isfinite(losses["loss_box_reg"]) and losses["loss_box_reg"].item() > 0


def test_convfc_head_gn_shapes_and_names():
    head = ConvFCHead((C, 7, 7), (C,) * 4, (D,), norm="gn")
    assert head(torch.randn(3, C, 7, 7)).shape == (3, D)
    names = set(head.state_dict())
    assert {"0.0.weight", "0.1.weight", "3.0.weight", "5.weight"} <= names and "0.0.bias" not in names


def test_roi_heads_batch_equals_single():
    ours, _ = build("v1")
    feats, props = features(), proposals()
    batch, _ = run(ours, feats, props, None, training=False)
    for i in range(2):
        with torch.no_grad():
            single = ours(OrderedDict((k, v[i : i + 1]) for k, v in feats.items()), [props[i]], SIZES[i : i + 1])[0][0]
        for key in ("boxes", "scores", "labels", "masks"):
            torch.testing.assert_close(single[key], batch[i][key])
        assert batch[i]["masks"].shape[1:] == (1, 28, 28) and batch[i]["labels"].dtype == torch.int64
