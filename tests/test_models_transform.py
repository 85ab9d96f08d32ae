"""DetectionTransform against torchvision's GeneralizedRCNNTransform, and fuse_bn equivalence."""
import pytest
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d as TVFrozenBN

from resdet.backbones import resnet18, resnet50
from resdet.layers.fuse import fuse_bn
from resdet.models.transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, resize_boxes


def _targets(sizes):
    out = []
    for h, w in sizes:
        boxes = torch.tensor([[1.0, 2.0, w / 2, h / 2], [w / 3, h / 4, w - 1.0, h - 1.5]])
        masks = (torch.rand(2, h, w) > 0.5).to(torch.uint8)
        out.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return out


@pytest.mark.parametrize("min_size,max_size", [(64, 1000), (80, 100)])
def test_transform_matches_torchvision(min_size, max_size):
    sizes = [(50, 70), (93, 41)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    targets = _targets(sizes)
    ours = DetectionTransform(min_size, max_size, IMAGENET_MEAN, IMAGENET_STD).train()
    ref = GeneralizedRCNNTransform(min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD)).train()
    batch, image_sizes, new_targets = ours(images, targets)
    ref_list, ref_targets = ref(images, targets)
    assert torch.equal(batch, ref_list.tensors)
    assert batch.shape[-1] % 32 == 0 and batch.shape[-2] % 32 == 0
    assert image_sizes == [tuple(s) for s in ref_list.image_sizes]
    for a, b in zip(new_targets, ref_targets):
        assert torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["masks"], b["masks"])
    assert targets[0]["boxes"][0, 2] == 35.0  # caller's targets untouched


def test_postprocess_maps_boxes_back_and_pastes_masks():
    t = DetectionTransform(64, 1000).eval()
    boxes = torch.tensor([[4.0, 4.0, 20.0, 30.0]])
    result = [{"boxes": boxes.clone(), "masks": torch.rand(1, 1, 28, 28), "scores": torch.ones(1)}]
    out = t.postprocess(result, [(64, 96)], [(32, 48)])
    assert torch.allclose(out[0]["boxes"], boxes / 2)
    assert out[0]["masks"].shape == (1, 1, 32, 48)
    assert torch.equal(resize_boxes(boxes, (10, 10), (10, 10)), boxes)


def test_multi_scale_training_draws_from_min_sizes():
    t = DetectionTransform((32, 64), 1000).train()
    seen = {t(([torch.rand(3, 40, 40)]))[1][0][0] for _ in range(20)}
    assert seen == {32, 64}
    assert t.eval()([torch.rand(3, 40, 40)])[1][0] == (64, 64)


@pytest.mark.parametrize("build", [resnet18, resnet50])
@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_fuse_bn_equals_unfused(build, norm):
    model = build(norm=norm, out_features=("c2", "c3")).eval()
    for m in model.modules():  # non-trivial statistics
        if hasattr(m, "running_var"):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(1, 3, 64, 64)
    ref = model(x)
    fused = fuse_bn(model)
    assert not any(hasattr(m, "running_var") for m in fused.modules())
    out = fused(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)


def test_fuse_bn_sequential_and_skips_training_bn():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), TVFrozenBN(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    seq[1].running_var.fill_(2.0)
    x = torch.rand(2, 3, 8, 8)
    seq.train()
    fuse_bn(seq)  # the training-mode BatchNorm stays
    assert isinstance(seq[1], nn.Identity) and isinstance(seq[4], nn.BatchNorm2d)
    seq.eval()
    ref = seq(x)
    fuse_bn(seq)
    assert isinstance(seq[4], nn.Identity)
    torch.testing.assert_close(seq(x), ref, rtol=1e-5, atol=1e-5)
