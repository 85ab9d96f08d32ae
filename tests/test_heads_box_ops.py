"""Box coder, matcher, sampler, anchors and pooler: exact values on hand cases and torchvision parity."""
import math
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign

from resdet.heads import (
    AnchorGenerator,
    BalancedPositiveNegativeSampler,
    BoxCoder,
    Matcher,
    MultiScaleRoIAlign,
    box_regression_loss,
)


def random_boxes(n: int, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2) * size
    return torch.cat([xy, xy + torch.rand(n, 2) * size + 1.0], dim=1)


def test_anchor_grid_hand_case():
    gen = AnchorGenerator(sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),))
    # Base anchors of 32 px: ratio 0.5 -> 45.25 x 22.63 -> rounded halves (23, 11); ratio 2 transposed.
    base = [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]
    anchors = gen((8, 12), [torch.zeros(1, 1, 2, 3)])  # stride 4 in y and x
    expected = [
        [x1 + 4 * x, y1 + 4 * y, x2 + 4 * x, y2 + 4 * y] for y in range(2) for x in range(3) for x1, y1, x2, y2 in base
    ]
    assert anchors.tolist() == expected
    assert gen.num_anchors_per_location() == [3]


def test_anchors_equal_torchvision_multi_level():
    sizes, ratios = ((32, 40), (64,), (128,)), ((0.5, 1.0, 2.0), (1.0, 3.0), (0.25, 1.0))
    feats = [torch.zeros(2, 1, 25, 34), torch.zeros(2, 1, 13, 17), torch.zeros(2, 1, 7, 9)]
    ours = AnchorGenerator(sizes, ratios)((100, 136), feats)
    theirs = TVAnchorGenerator(sizes, ratios)(ImageList(torch.zeros(2, 3, 100, 136), [(100, 136)] * 2), feats)
    assert torch.equal(ours, theirs[0]) and torch.equal(ours, theirs[1])


def test_box_coder_round_trip():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref, gt = random_boxes(500).double() + torch.tensor([0, 0, 10, 10]), random_boxes(500).double()  # ratios < 62.5
    torch.testing.assert_close(coder.decode(coder.encode(gt, ref), ref), gt, rtol=0, atol=1e-9)
    # Dyadic hand case: exact in binary floating point.
    ref1, gt1 = torch.tensor([[0.0, 0.0, 8.0, 4.0]]), torch.tensor([[2.0, 1.0, 18.0, 9.0]])
    deltas = coder.encode(gt1, ref1)
    torch.testing.assert_close(deltas, torch.tensor([[7.5, 7.5, 5 * math.log(2), 5 * math.log(2)]]))
    assert torch.equal(coder.decode(deltas, ref1), gt1)


def test_box_coder_matches_torchvision_and_clamps():
    weights = (10.0, 10.0, 5.0, 5.0)
    ours, theirs = BoxCoder(weights), tv_utils.BoxCoder(weights)
    ref, gt = random_boxes(200), random_boxes(200)
    assert torch.equal(ours.encode(gt, ref), theirs.encode_single(gt, ref))
    deltas = torch.randn(200, 3, 4) * 4  # class-specific [R, K, 4]
    expected = theirs.decode_single(deltas.reshape(200, 12), ref).reshape(200, 3, 4)
    assert torch.equal(ours.decode(deltas, ref[:, None]), expected)
    huge = ours.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    torch.testing.assert_close(huge[0, 2] - huge[0, 0], torch.tensor(1000.0 / 16))  # exp(clip) * width 1


def test_matcher_hand_case():
    iou = torch.tensor([[0.9, 0.4, 0.1, 0.5], [0.2, 0.6, 0.25, 0.65]])
    assert Matcher(0.7, 0.3)(iou).tolist() == [0, -2, -1, -2]
    # Low-quality matches: gt 1's best prediction (column 3) is matched although below 0.7.
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, -2, -1, 1]
    with pytest.raises(ValueError, match="at least one gt"):
        Matcher(0.7, 0.3)(torch.zeros(0, 4))


def test_matcher_equals_torchvision():
    iou = torch.rand(7, 300).round(decimals=1)  # many ties
    for low_quality in (False, True):
        ours = Matcher(0.7, 0.3, low_quality)(iou)
        assert torch.equal(ours, tv_utils.Matcher(0.7, 0.3, low_quality)(iou))


@pytest.mark.parametrize("num_pos,num_neg,exp_pos,exp_neg", [(100, 1000, 64, 192), (10, 1000, 10, 246), (5, 20, 5, 20)])
def test_sampler_fractions(num_pos, num_neg, exp_pos, exp_neg):
    labels = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(30)])
    labels = labels[torch.randperm(len(labels))]
    pos, neg = BalancedPositiveNegativeSampler(256, 0.25)([labels])
    assert int(pos[0].sum()) == exp_pos and int(neg[0].sum()) == exp_neg
    assert bool((labels[pos[0]] == 1).all()) and bool((labels[neg[0]] == 0).all())


def test_sampler_draws_like_torchvision():
    labels = [torch.randint(-1, 2, (500,)), torch.randint(-1, 3, (300,))]
    torch.manual_seed(3)
    ours = BalancedPositiveNegativeSampler(64, 0.5)(labels)
    torch.manual_seed(3)
    theirs = tv_utils.BalancedPositiveNegativeSampler(64, 0.5)(labels)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        assert torch.equal(a, b.bool())


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "giou"])
def test_box_losses_zero_at_target(kind):
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref, gt = random_boxes(20), random_boxes(20)
    assert float(box_regression_loss(kind, coder, coder.encode(gt, ref), gt, ref)) == pytest.approx(0, abs=1e-4)
    assert float(box_regression_loss(kind, coder, torch.randn(20, 4), gt, ref)) > 0
    assert float(box_regression_loss(kind, coder, torch.zeros(0, 4), gt[:0], ref[:0])) == 0


@pytest.mark.parametrize("aligned", [False, True])
def test_pooler_equals_torchvision(aligned):
    feats = OrderedDict((f"p{level}", torch.randn(2, 8, 128 >> level, 96 >> level)) for level in range(2, 7))
    boxes = [random_boxes(40, 60.0), random_boxes(30, 40.0) * 2]
    sizes = [(128, 90), (120, 96)]
    ours = MultiScaleRoIAlign(output_size=7, sampling_ratio=2, aligned=aligned, impl="torchvision")(feats, boxes, sizes)
    sparse = MultiScaleRoIAlign(output_size=7, sampling_ratio=2, aligned=aligned)(feats, boxes, sizes)
    torch.testing.assert_close(sparse, ours, rtol=0, atol=1e-5)  # the sparse op sums in another order
    tv_feats = OrderedDict(zip(["0", "1", "2", "3", "pool"], feats.values()))
    if not aligned:
        theirs = TVMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(tv_feats, boxes, sizes)
        assert torch.equal(ours, theirs)
    assert ours.shape == (70, 8, 7, 7)


def test_box_math_stays_float32_under_bf16():
    """A bf16 right edge of 802.3 would be 804.0; decoding, anchors and the detector output stay float32."""
    from resdet.heads.anchors import AnchorGenerator
    from resdet.models import faster_rcnn

    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[10.0, 20.0, 802.3, 600.0]])
    out = coder.decode(torch.zeros(1, 4, dtype=torch.bfloat16), ref)
    assert out.dtype == torch.float32 and out[0, 2].item() == ref[0, 2].item()
    assert coder.encode(ref.bfloat16(), ref).dtype == torch.float32
    anchors = AnchorGenerator(((32,),), ((1.0,),))((64, 64), [torch.zeros(1, 8, 16, 16, dtype=torch.bfloat16)])
    assert anchors.dtype == torch.float32
    torch.manual_seed(0)
    model = faster_rcnn("resnet18", num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0,
                        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        det = model([torch.rand(3, 64, 64)])[0]
    assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32 and len(det["boxes"])
