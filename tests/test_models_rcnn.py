"""resdet.models.faster_rcnn / mask_rcnn: losses, gradients, outputs, invariants, input validation."""
import pytest
import torch

from resdet.models import faster_rcnn, mask_rcnn

# Tiny images and few proposals: the invariants do not depend on the sizes.
TINY = dict(
    min_size=64, max_size=96, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
    box_detections_per_img=10, box_score_thresh=0.0, fpn_out_channels=64, box_representation_size=128,
)
NUM_CLASSES = 4


def _model(arch="mask", backbone="resnet18", **options):
    build = mask_rcnn if arch == "mask" else faster_rcnn
    if arch == "mask":
        options.setdefault("mask_layers", (32, 32))
        options.setdefault("mask_predictor_channels", 16)
    return build(backbone, NUM_CLASSES, **{**TINY, **options})


def _data(with_masks=True, empty_second=False):
    images = [torch.rand(3, 60, 80), torch.rand(3, 64, 48)]
    targets = []
    for i, (h, w) in enumerate([(60, 80), (64, 48)]):
        n = 0 if (empty_second and i == 1) else 2
        boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 46.0, 30.0]])[:n]
        t = {"boxes": boxes, "labels": torch.tensor([1, 3])[:n]}
        if with_masks:
            masks = torch.zeros(n, h, w, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                masks[j, y1:y2, x1:x2] = 1
            t["masks"] = masks
        targets.append(t)
    return images, targets


@pytest.mark.parametrize("arch,backbone", [("faster", "resnet18"), ("mask", "resnet18"), ("mask", "resnet50")])
def test_losses_finite_with_exact_keys_and_gradients_everywhere(arch, backbone):
    model = _model(arch, backbone).train()
    images, targets = _data(with_masks=arch == "mask")
    losses = model(images, targets)
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    if arch == "mask":
        expected.add("loss_mask")
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", ["faster", "mask"])
def test_empty_targets_train(arch):
    model = _model(arch).train()
    images, targets = _data(with_masks=arch == "mask", empty_second=True)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    images, targets = images[1:], targets[1:]  # only a background image
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_eval_outputs_shapes_and_dtypes():
    model = _model("mask").eval()
    images, _ = _data()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, image in zip(out, images):
        d = det["boxes"].shape[0]
        assert 0 < d <= 10
        assert det["boxes"].shape == (d, 4) and det["boxes"].dtype == torch.float32
        assert det["scores"].shape == (d,) and det["scores"].dtype == torch.float32
        assert det["labels"].shape == (d,) and det["labels"].dtype == torch.int64
        assert ((det["labels"] >= 1) & (det["labels"] < NUM_CLASSES)).all()
        assert det["masks"].shape == (d, 1, *image.shape[-2:]) and det["masks"].dtype == torch.float32
        assert 0 <= det["masks"].min() and det["masks"].max() <= 1
        h, w = image.shape[-2:]
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all()
    model.roi_heads.score_thresh = 1.1  # nothing passes: empty but well-shaped outputs
    with torch.no_grad():
        det = model(images[:1])[0]
    assert det["boxes"].shape == (0, 4) and det["masks"].shape == (0, 1, 60, 80)


def test_batch_equals_one_by_one():
    model = _model("mask").eval()
    images = [torch.rand(3, 60, 80), torch.rand(3, 60, 80)]  # same size: same padding
    with torch.no_grad():
        batched = model(images)
        single = [model([im])[0] for im in images]
    for a, b in zip(batched, single):
        assert torch.equal(a["labels"], b["labels"])
        for k in ("boxes", "scores", "masks"):
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_optimize_for_inference_equals_unfused(backbone):
    model = _model("mask", backbone, norm="frozen_bn").eval()
    for m in model.backbone.body.modules():
        if hasattr(m, "running_var"):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    images, _ = _data()
    with torch.no_grad():
        ref = model(images)
        out = model.optimize_for_inference()(images)
    assert not any(hasattr(m, "running_var") for m in model.backbone.body.modules())
    for a, b in zip(out, ref):
        assert torch.equal(a["labels"], b["labels"])
        for k in ("boxes", "scores", "masks"):
            torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=1e-4)


def test_optimize_for_inference_twice_is_once():
    model = _model("mask", "resnet18", norm="frozen_bn").eval()
    images, _ = _data()
    model.optimize_for_inference(channels_last=True)
    with torch.no_grad():
        once = model(images)
    model.optimize_for_inference(channels_last=True)
    head = model.roi_heads.mask_head
    assert len(head._forward_pre_hooks) == 1  # no duplicate hook
    with torch.no_grad():
        twice = model(images)
    for a, b in zip(once, twice):
        for k in a:
            assert torch.equal(a[k], b[k])
    model.optimize_for_inference(channels_last=False)  # and back: the hooks go
    assert not head._forward_pre_hooks and model.transform.channels_last is False


def _bad(index, **changes):
    images, targets = _data()
    for key, value in changes.items():
        if key == "image":
            images[index] = value
        else:
            targets[index][key] = value
    return images, targets


@pytest.mark.parametrize(
    "case,pattern",
    [
        (dict(boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 20.0, 30.0]])), r"image 1: box 1 is degenerate"),
        (dict(boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 30.0, 26.0, 30.0]])), r"image 1: box 1 is degenerate"),
        (dict(labels=torch.tensor([1, 0])), r"image 1: label 0 .* outside 1\.\.3"),
        (dict(labels=torch.tensor([4, 1])), r"image 1: label 4 .* outside 1\.\.3"),
        (dict(labels=torch.tensor([1])), r"image 1: 2 boxes but 1 labels"),
        (dict(masks=torch.zeros(3, 64, 48, dtype=torch.uint8)), r"image 1: 2 boxes but 3 masks"),
        (dict(image=torch.zeros(3, 64, 48, dtype=torch.uint8)), r"image 1: .*floating point.*uint8"),
        (dict(image=torch.rand(1, 64, 48)), r"image 1: expected 3 channels, got 1"),
        (dict(image=torch.rand(64, 48)), r"image 1: .*rank 3.*\(64, 48\)"),
        (dict(image=torch.rand(1, 3, 64, 48)), r"image 1: .*rank 3"),
        (dict(labels=torch.tensor([1, 2], dtype=torch.int32)), r"image 1: labels must be int64, got dtype torch.int32"),
        (dict(image=torch.rand(3, 64, 48).index_put_((torch.tensor([0]),) * 3, torch.tensor(float("nan")))),
         r"image 1: 1 of 9216 pixel values are NaN/inf"),
        (dict(image=torch.full((3, 64, 48), float("inf"))), r"image 1: 9216 of 9216 pixel values are NaN/inf"),
    ],
)
def test_bad_input_raises_before_any_computation(case, pattern):
    model = _model("mask").train()

    def fail(*args, **kwargs):
        raise AssertionError("computation ran before validation")

    model.transform.forward = fail
    images, targets = _bad(1, **case)
    with pytest.raises(ValueError, match=pattern):
        model(images, targets)


def test_missing_targets_and_masks_in_training():
    model = _model("mask").train()
    images, targets = _data()
    with pytest.raises(ValueError, match="targets are required in training"):
        model(images)
    del targets[0]["masks"]
    with pytest.raises(ValueError, match="image 0: target is missing 'masks'"):
        model(images, targets)


def test_builder_defaults_match_torchvision_and_unknown_options():
    model = faster_rcnn("resnet18")
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333
    assert (model.rpn.pre_nms_top_n_train, model.rpn.post_nms_top_n_test) == (2000, 1000)
    assert model.roi_heads.box_predictor.cls_score.out_features == 91
    assert model.backbone.out_features[0] == "p2" and model.num_classes == 91
    with pytest.raises(TypeError, match="min_sise"):
        faster_rcnn("resnet18", min_sise=3)
    with pytest.raises(TypeError, match=r"\['bogus'\]"):
        mask_rcnn("resnet18", bogus=1)


def test_nan_pixels_are_named_in_evaluation_too():
    model = _model("faster").eval()
    images, _ = _data()
    images[1] = images[1].clone()
    images[1][2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="image 1: 1 of 9216 pixel values are NaN/inf"):
        model(images)


@pytest.mark.parametrize("arch", ["faster", "mask"])
def test_float64_images_are_computed_in_float32(arch):
    """numpy's default dtype: the transform converts it, the convolutions see float32."""
    torch.manual_seed(0)
    model = _model(arch).eval()
    images, targets = _data(with_masks=arch == "mask")
    with torch.no_grad():
        expected = model([im.double().float() for im in images])
        got = model([im.double() for im in images])
    for e, g in zip(expected, got):
        assert g["boxes"].dtype == torch.float32
        torch.testing.assert_close(g["boxes"], e["boxes"])
    losses = model.train()([im.double() for im in images], targets)
    assert all(torch.isfinite(v) for v in losses.values())
