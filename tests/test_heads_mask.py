"""Mask branch pieces: paste_masks equal to torchvision's bit for bit, mask loss targets, predictor names."""
import pytest
import torch
from torchvision.models.detection import roi_heads as tv_roi

from resdet.heads import MaskHead, MaskPredictor, mask_loss, paste_masks


def boxes_in(n: int, h: int, w: int) -> torch.Tensor:
    # Boxes may overhang the image borders (as pasted detections do after enlargement) but not lie outside.
    xy = torch.rand(n, 2) * torch.tensor([w + 8.0, h + 8.0]) - 10
    return torch.cat([xy, xy + torch.rand(n, 2) * torch.tensor([w * 0.5, h * 0.5]) + 11], dim=1)


@pytest.mark.parametrize("size,shape", [(28, (57, 83)), (28, (90, 64)), (14, (40, 41))])
def test_paste_masks_equals_torchvision(size, shape):
    masks = torch.rand(25, 1, size, size)
    boxes = boxes_in(25, *shape)
    boxes[0] = torch.tensor([3.0, 4.0, 3.2, 4.1])  # sub-pixel box
    # Boxes that round to the padded mask size (30 or 16 px): interpolate copies instead of resampling.
    boxes[1] = torch.tensor([1.5, 1.5, 28.6, 28.6]) if size == 28 else torch.tensor([0.7, 0.7, 14.6, 14.6])
    boxes[2] = torch.tensor([-3.0, -4.0, 0.5, 0.7])  # mostly outside
    ours = paste_masks(masks, boxes, shape)
    theirs = tv_roi.paste_masks_in_image(masks, boxes, shape, padding=1)
    assert ours.shape == theirs.shape == (25, 1, *shape) and ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_paste_masks_empty_and_padding():
    assert paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (30, 40)).shape == (0, 1, 30, 40)
    masks, boxes = torch.rand(4, 1, 28, 28), boxes_in(4, 50, 60)
    torch.testing.assert_close(
        paste_masks(masks, boxes, (50, 60), padding=0), tv_roi.paste_masks_in_image(masks, boxes, (50, 60), padding=0),
        rtol=0, atol=0,
    )
    with pytest.raises(ValueError, match="paste_masks expects"):
        paste_masks(torch.rand(4, 28, 28), boxes, (50, 60))


def test_mask_loss_equals_torchvision():
    gt_masks = [(torch.rand(3, 40, 50) > 0.5).to(torch.uint8), (torch.rand(2, 30, 30) > 0.5).to(torch.uint8)]
    gt_labels = [torch.tensor([1, 2, 3]), torch.tensor([2, 1])]
    proposals = [boxes_in(6, 40, 50).clamp(min=0), boxes_in(4, 30, 30).clamp(min=0)]
    matched = [torch.tensor([2, 0, 0, 2, 1, 2]), torch.tensor([1, 1, 0, 1])]
    logits = torch.randn(10, 4, 28, 28)
    ours = mask_loss(logits, proposals, gt_masks, gt_labels, matched)
    theirs = tv_roi.maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_mask_modules_names_and_shapes():
    head, predictor = MaskHead(16, (16, 16, 16, 16)), MaskPredictor(16, 8, 5)
    assert {"0.0.weight", "0.0.bias", "3.0.weight"} <= set(head.state_dict())
    assert set(predictor.state_dict()) == {
        "conv5_mask.weight", "conv5_mask.bias", "mask_fcn_logits.weight", "mask_fcn_logits.bias"
    }
    assert predictor(head(torch.randn(2, 16, 14, 14))).shape == (2, 5, 28, 28)
    # Pre-0.13 torchvision names load as well.
    old = {f"mask_fcn{i + 1}.{kind}": getattr(head[i][0], kind) for i in range(4) for kind in ("weight", "bias")}
    fresh = MaskHead(16, (16, 16, 16, 16))
    fresh.load_state_dict(old)
    assert torch.equal(fresh[2][0].weight, head[2][0].weight)


def test_mask_head_state_dict_version_decides_the_migration():
    """mask_fcn{i} keys are renamed only for layouts older than version 2 (torchvision's versioning)."""
    state = MaskHead(16, (16, 16)).state_dict()
    assert state._metadata[""]["version"] == 2
    old = type(state)({k.replace("0.0.", "mask_fcn1.").replace("1.0.", "mask_fcn2."): v for k, v in state.items()})
    old._metadata = {"": {"version": 2}}  # a version-2 file with old names is an error, not a rename
    with pytest.raises(RuntimeError, match="Unexpected key"):
        MaskHead(16, (16, 16)).load_state_dict(old)


def test_class_logits_equal_full_predictor_and_gradients():
    predictor = MaskPredictor(16, 8, 5)
    x = torch.randn(6, 16, 14, 14)
    classes = torch.tensor([0, 4, 2, 2, 1, 3])
    full = predictor(x)[torch.arange(6), classes]
    full.sin().sum().backward()
    grads = [p.grad.clone() for p in predictor.parameters()]
    predictor.zero_grad()
    ours = predictor.class_logits(x, classes)
    ours.sin().sum().backward()
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    for p, g in zip(predictor.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_class_logits_of_another_deconvolution_run_it_as_convtranspose():
    """A predictor given a deconvolution the matrix-product form does not cover (4×4, stride 2, padding 1)
    computes class logits by ``ConvTranspose2d`` + ReLU + einsum: the same numbers as the full predictor."""
    predictor = MaskPredictor(16, 8, 5)
    predictor.conv5_mask = torch.nn.ConvTranspose2d(16, 8, 4, 2, 1)
    x = torch.randn(6, 16, 14, 14)
    classes = torch.tensor([0, 4, 2, 2, 1, 3])
    einsum = torch.einsum
    used = []
    torch.einsum = lambda *args: used.append(args[0]) or einsum(*args)
    try:
        ours = predictor.class_logits(x, classes)
    finally:
        torch.einsum = einsum
    assert used == ["rdhw,rd->rhw"] and ours.shape == (6, 28, 28)
    torch.testing.assert_close(ours, predictor(x)[torch.arange(6), classes], rtol=1e-5, atol=1e-5)
