"""RegionProposalNetwork: parity with torchvision (eval proposals, train losses), empty targets, gradients."""
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection.image_list import ImageList

from resdet.heads import AnchorGenerator, RegionProposalNetwork, RPNHead

C = 16
PADDED = (96, 128)
SIZES = [(96, 120), (80, 128)]


def features(n: int = 2) -> OrderedDict:
    shapes = {f"p{level}": (PADDED[0] >> level, PADDED[1] >> level) for level in range(2, 7)}
    return OrderedDict((name, torch.randn(n, C, *hw)) for name, hw in shapes.items())


def targets(empty_second: bool = True) -> list[dict]:
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [50.0, 40.0, 110.0, 80.0]])
    first = {"boxes": boxes, "labels": torch.tensor([1, 2])}
    second = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    if not empty_second:
        second = {"boxes": torch.tensor([[0.0, 0.0, 30.0, 30.0]]), "labels": torch.tensor([1])}
    return [first, second]


def build(conv_depth: int = 1):
    kwargs = dict(pre_nms_top_n_train=300, pre_nms_top_n_test=200, post_nms_top_n_train=250, post_nms_top_n_test=120)
    ours = RegionProposalNetwork(AnchorGenerator(), RPNHead(C, 3, conv_depth=conv_depth), **kwargs)
    theirs = tv_rpn.RegionProposalNetwork(
        tv_rpn.AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5),
        tv_rpn.RPNHead(C, 3, conv_depth=conv_depth), 0.7, 0.3, 256, 0.5,
        dict(training=300, testing=200), dict(training=250, testing=120), 0.7,
    )
    ours.load_state_dict(theirs.state_dict())  # strict: the names are the same
    return ours, theirs


@pytest.mark.parametrize("conv_depth", [1, 2])
def test_rpn_parity_with_torchvision(conv_depth):
    ours, theirs = build(conv_depth)
    feats = features()
    images = torch.zeros(2, 3, *PADDED)
    tv_feats = OrderedDict(zip(["0", "1", "2", "3", "pool"], feats.values()))
    for training in (False, True):
        ours.train(training)
        theirs.train(training)
        torch.manual_seed(1)
        boxes, losses = ours(images, SIZES, feats, targets())
        torch.manual_seed(1)
        tv_boxes, tv_losses = theirs(ImageList(images, SIZES), tv_feats, targets())
        for a, b in zip(boxes, tv_boxes):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        assert losses.keys() == tv_losses.keys()
        for key in losses:
            torch.testing.assert_close(losses[key], tv_losses[key], rtol=0, atol=1e-6)
    assert sorted(losses) == ["loss_objectness", "loss_rpn_box_reg"]


def test_rpn_old_checkpoint_names_load():
    ours, theirs = build()
    state = theirs.state_dict()
    state["head.conv.weight"] = state.pop("head.conv.0.0.weight")
    state["head.conv.bias"] = state.pop("head.conv.0.0.bias")
    state._metadata["head"]["version"] = 1  # as torchvision < 0.13 wrote it
    ours.load_state_dict(state)
    assert torch.equal(ours.head.conv[0][0].weight, theirs.head.conv[0][0].weight)


def test_rpn_empty_targets_and_gradients():
    ours, _ = build()
    ours.train()
    feats = features()
    all_empty = [targets()[1], targets()[1]]
    _, losses = ours(torch.zeros(2, 3, *PADDED), SIZES, feats, all_empty)
    assert losses["loss_rpn_box_reg"].item() == 0.0 and torch.isfinite(losses["loss_objectness"])
    _, losses = ours(torch.zeros(2, 3, *PADDED), SIZES, feats, targets(empty_second=False))
    sum(losses.values()).backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rpn_batch_equals_single_and_bounds():
    ours, _ = build()
    ours.eval()
    feats = features()
    images = torch.zeros(2, 3, *PADDED)
    batch, losses = ours(images, SIZES, feats)
    assert losses == {}
    for i in range(2):
        single, _ = ours(images[i : i + 1], SIZES[i : i + 1], OrderedDict((k, v[i : i + 1]) for k, v in feats.items()))
        torch.testing.assert_close(single[0], batch[i])
        h, w = SIZES[i]
        assert batch[i].shape[0] <= 120 and bool((batch[i][:, 2] <= w).all()) and bool((batch[i][:, 3] <= h).all())


def test_rpn_needs_targets_in_training():
    ours, _ = build()
    with pytest.raises(ValueError, match="needs targets"):
        ours(torch.zeros(2, 3, *PADDED), SIZES, features())


@pytest.mark.parametrize("channels_last", [False, True])
def test_rpn_head_predictors_equal_the_two_convolutions(channels_last):
    """RPNHead runs cls_logits and bbox_pred as one matrix product in either memory layout."""
    head = RPNHead(C, 3)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    feats = list(features().values())
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    logits, deltas = head(feats)
    for f, logit, delta in zip(feats, logits, deltas):
        t = head.conv(f)
        torch.testing.assert_close(logit, head.cls_logits(t), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(delta, head.bbox_pred(t), rtol=1e-5, atol=1e-5)


def test_rpn_state_dict_version_decides_the_migration():
    """Keys are renamed only for layouts older than version 2 (torchvision's versioning of RPNHead)."""
    head = RPNHead(C, 3)
    state = head.state_dict()
    assert state._metadata[""]["version"] == 2
    old = {("conv." + k[len("conv.0.0."):] if k.startswith("conv.0.0.") else k): v for k, v in state.items()}
    RPNHead(C, 3).load_state_dict(old)  # no metadata: the old layout is migrated
    old = type(state)(old)
    old._metadata = {"": {"version": 2}}  # a version-2 file with a stray old key is an error, not a rename
    with pytest.raises(RuntimeError, match="Unexpected key"):
        RPNHead(C, 3).load_state_dict(old)
