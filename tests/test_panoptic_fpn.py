"""Panoptic FPN: the combination step on hand-made instances, the joint losses, eval outputs in original
pixels, the crop-training transform, checkpoint compatibility with Mask R-CNN, and input checks."""
from __future__ import annotations

import pytest
import torch

from resdet.models import arch_options, arch_task, combine_panoptic, mask_rcnn, panoptic_fpn
from resdet.models.panoptic_transform import PanopticTransform, boxes_from_masks
from resdet.models.validation import InvalidInput

SMALL = dict(min_size=64, max_size=96, fpn_out_channels=32, sem_seg_conv_dims=32, rpn_post_nms_top_n_train=50,
             rpn_post_nms_top_n_test=20, box_batch_size_per_image=16, box_representation_size=64,
             mask_layers=(16,), mask_predictor_channels=16)


def _box_mask(h, w, y1, y2, x1, x2):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y1:y2, x1:x2] = True
    return m


def test_combine_follows_detectron2_rules():
    h, w = 20, 20
    masks = torch.stack([_box_mask(h, w, 0, 10, 0, 10),    # score 0.9: placed first
                         _box_mask(h, w, 0, 10, 2, 10),    # 0.8: 80/80 already taken -> dropped
                         _box_mask(h, w, 5, 15, 5, 15),    # 0.7: 25/100 taken -> takes its 75 free pixels
                         _box_mask(h, w, 15, 20, 15, 20),  # 0.4: below the score threshold
                         torch.zeros(h, w, dtype=torch.bool)])  # 0.95 but empty: skipped
    scores = torch.tensor([0.9, 0.8, 0.7, 0.4, 0.95])
    labels = torch.tensor([1, 2, 2, 1, 1])
    sem = torch.zeros(h, w, dtype=torch.long)
    sem[:, 15:] = 1   # stuff 1: 100 pixels, 75 of them free after the things... all free here
    sem[18:, :15] = 2  # stuff 2: 30 free pixels -> below the area threshold
    panoptic, segments = combine_panoptic(masks, scores, labels, sem, num_things=2, overlap_thresh=0.5,
                                          stuff_area_thresh=40, score_thresh=0.5)
    assert [(s["category_id"], s["isthing"], s["area"]) for s in segments] == [(1, True, 100), (2, True, 75),
                                                                                 (3, False, 100)]
    assert segments[1]["instance_id"] == 2 and segments[0]["score"] == pytest.approx(0.9)
    assert panoptic.dtype == torch.int32 and int((panoptic == 2).sum()) == 75 and int((panoptic == 3).sum()) == 100
    assert int((panoptic == 0).sum()) == h * w - 275  # stuff 2 too small, class 0 ("thing") never stuff
    assert torch.equal(panoptic[0:10, 0:10], torch.ones(10, 10, dtype=torch.int32))


def test_registered_with_mask_rcnn_options():
    assert arch_task("panoptic_fpn") == "panoptic"
    options = arch_options("panoptic_fpn")
    assert {"num_stuff_classes", "sem_seg_loss_weight", "combine_stuff_area_thresh", "mask_layers",
            "rpn_anchor_sizes", "crop_size"} <= set(options)


def _targets(images, num_stuff=2):
    targets = []
    for im in images:
        h, w = im.shape[-2:]
        masks = _box_mask(h, w, 10, 30, 10, 40)[None].to(torch.uint8)
        sem = torch.ones(h, w, dtype=torch.long)
        sem[: h // 3] = num_stuff
        sem[masks[0].bool()] = 0
        sem[0, 0] = 255
        targets.append({"boxes": torch.tensor([[10.0, 10, 40, 30]]), "labels": torch.tensor([1]), "masks": masks,
                        "sem_seg": sem})
    return targets


def test_train_losses_and_eval_outputs():
    torch.manual_seed(0)
    model = panoptic_fpn("resnet18", num_classes=3, num_stuff_classes=2, combine_score_thresh=0.0,
                         combine_stuff_area_thresh=1, **SMALL)
    images = [torch.rand(3, 60, 80), torch.rand(3, 64, 50)]
    losses = model(images, _targets(images))
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask",
                           "loss_sem_seg"}
    sum(losses.values()).backward()
    assert model.sem_seg_head.predictor.weight.grad.abs().sum() > 0
    # The semantic loss carries its weight (0.5 by default): the same model with weight 1 gives twice as much.
    model.sem_seg_head.loss_weight = 1.0
    torch.manual_seed(1)
    full = model(images, _targets(images))["loss_sem_seg"]
    model.sem_seg_head.loss_weight = 0.5
    torch.manual_seed(1)
    half = model(images, _targets(images))["loss_sem_seg"]
    assert float(half.detach()) == pytest.approx(0.5 * float(full.detach()), rel=1e-5)

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        size = tuple(image.shape[-2:])
        assert out["panoptic_seg"].shape == size and out["sem_seg"].shape == size
        assert out["masks"].shape[-2:] == size and out["boxes"].shape[1] == 4
        ids, counts = torch.unique(out["panoptic_seg"], return_counts=True)
        area = dict(zip(ids.tolist(), counts.tolist()))
        assert {s["id"] for s in out["segments_info"]} == set(area) - {0}
        for s in out["segments_info"]:
            assert area[s["id"]] == s["area"]
            assert (1 <= s["category_id"] <= 2) if s["isthing"] else (3 <= s["category_id"] <= 4)


def test_crop_training_transform_recomputes_boxes_and_pads_with_ignore():
    t = PanopticTransform(min_size=40, max_size=80, scale_range=(1.0, 1.0), crop_size=(16, 20)).train()
    image = torch.rand(3, 40, 80)
    masks = torch.stack([_box_mask(40, 80, 0, 40, 0, 80), _box_mask(40, 80, 2, 6, 70, 74)]).to(torch.uint8)
    target = {"boxes": torch.tensor([[0.0, 0, 80, 40], [70, 2, 74, 6]]), "labels": torch.tensor([1, 2]),
              "masks": masks, "sem_seg": torch.ones(40, 80, dtype=torch.long)}
    torch.manual_seed(3)
    batch, sizes, targets, sem = t([image, torch.rand(3, 8, 8)], [target, {**target, "masks": masks[:, :8, :8],
                                                                     "sem_seg": torch.ones(8, 8, dtype=torch.long)}])
    assert sizes[0] == (16, 20) and batch.shape[-2:] == (32, 32)
    out = targets[0]
    assert torch.equal(out["boxes"], boxes_from_masks(out["masks"].bool()))  # boxes follow the cropped masks
    assert (out["boxes"][:, 2:] > out["boxes"][:, :2]).all() and len(out["labels"]) in (1, 2)
    assert out["masks"].shape[-2:] == (16, 20)
    assert (sem[0, 16:] == 255).all() and (sem[0, :, 20:] == 255).all() and (sem[0, :16, :20] == 1).all()
    assert boxes_from_masks(_box_mask(5, 6, 1, 3, 2, 5)[None]).tolist() == [[2.0, 1.0, 5.0, 3.0]]


def test_mask_rcnn_checkpoint_keys_fit_the_instance_half():
    options = {k: v for k, v in SMALL.items() if k != "sem_seg_conv_dims"}
    detector = mask_rcnn("resnet18", num_classes=3, **options)
    model = panoptic_fpn("resnet18", num_classes=3, num_stuff_classes=2, **SMALL)
    missing, unexpected = model.load_state_dict(detector.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("sem_seg_head.") for k in missing)


def test_bad_semantic_target_names_the_image():
    model = panoptic_fpn("resnet18", num_classes=3, num_stuff_classes=2, **SMALL)
    images = [torch.rand(3, 40, 40), torch.rand(3, 40, 40)]
    targets = _targets(images)
    targets[1]["sem_seg"][5, 5] = 7
    with pytest.raises(InvalidInput, match=r"image 1: sem_seg has labels \[7\], expected 0..2 or 255"):
        model(images, targets)
    del targets[0]["masks"]
    with pytest.raises(InvalidInput, match="image 0: target is missing 'masks'"):
        model(images, targets)
