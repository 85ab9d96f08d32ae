"""Albumentations pipelines: boxes, labels, masks and semantic maps stay together through every transform."""
import numpy as np
import pytest

from resdet.data import build_transforms, masks_to_boxes
from resdet.data.shapes import draw_sample


def _sample(seed, height=64, width=96):
    rng = np.random.default_rng(seed)
    image, objects = draw_sample(rng, height, width, num_objects=(3, 4), object_size=(0.2, 0.5))
    masks = np.stack([m for _, m in objects]).astype(np.uint8)
    n = len(objects)
    sem = np.zeros((height, width), np.int64)
    for label, mask in objects:
        sem[mask] = label
    sem[0, :] = 255
    target = {"boxes": masks_to_boxes(masks), "labels": np.array([label for label, _ in objects], np.int64),
              "masks": masks, "iscrowd": np.zeros(n, np.int64), "area": masks.sum(axis=(1, 2)).astype(np.float32),
              "difficult": np.arange(n) % 2 == 1, "sem_seg": sem, "image_id": seed}
    return image, target


def _check(image, target, tol=2.0):
    height, width = image.shape[:2]
    n = len(target["boxes"])
    for key in ("labels", "masks", "iscrowd", "area", "difficult"):
        assert len(target[key]) == n, key
    assert target["masks"].shape[1:] == (height, width) and target["sem_seg"].shape == (height, width)
    boxes = target["boxes"]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert np.abs(masks_to_boxes(target["masks"]) - boxes).max(initial=0) <= tol
    assert (target["area"] > 0).all()
    assert set(np.unique(target["sem_seg"]).tolist()) <= {0, 1, 2, 3, 4, 255}
    # each instance's pixels are labelled with its own class in the semantic map, where visible on top
    for label, mask in zip(target["labels"], target["masks"]):
        values = target["sem_seg"][mask.astype(bool)]
        assert (values == label).mean() > 0.5


PIPELINES = {
    "test_resize": dict(train=False, min_size=80, max_size=120),
    "multiscale": dict(train=True, min_size=(48, 64, 96), max_size=160),
    "flip": dict(train=True, hflip_prob=1.0),
    "color": dict(train=True, color_jitter=0.4),
    "crop": dict(train=True, random_crop=True, min_size=64),
    "lsj": dict(train=True, large_scale_jitter=(0.5, 2.0), max_size=96),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_box_mask_agreement(name):
    pipeline = build_transforms(**PIPELINES[name])
    pipeline.set_seed(0)
    dropped = 0
    for seed in range(6):
        image, target = _sample(seed)
        out_image, out = pipeline(image.copy(), target)
        assert out_image.dtype == np.uint8 and out_image.ndim == 3
        _check(out_image, out)
        dropped += len(target["boxes"]) - len(out["boxes"])
        # per-instance extras follow their instance: the kept rows are rows of the input
        assert set(zip(out["labels"].tolist(), out["difficult"].tolist())) <= set(
            zip(target["labels"].tolist(), target["difficult"].tolist()))
    if name != "lsj":
        assert dropped == 0


def test_flip_mirrors_boxes():
    image, target = _sample(3)
    _, out = build_transforms(train=True, hflip_prob=1.0)(image, target)
    width = image.shape[1]
    expected = target["boxes"][:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [width, 0, width, 0]
    assert np.allclose(out["boxes"], expected, atol=1e-3)
    assert (out["masks"] == target["masks"][:, :, ::-1]).all()


def test_resize_shortest_edge_with_cap():
    image = np.zeros((40, 80, 3), np.uint8)
    target = {"boxes": np.array([[8, 4, 40, 20]], np.float32), "labels": np.array([1])}
    out_image, out = build_transforms(train=False, min_size=32, max_size=50)(image, target)
    assert out_image.shape == (25, 50, 3)  # short side 32 would make the long side 64 > 50
    assert np.allclose(out["boxes"], [[5, 2.5, 25, 12.5]], atol=1e-3)
    out_image, _ = build_transforms(train=False, min_size=32)(image, target)
    assert out_image.shape == (32, 64, 3)
    out_image, _ = build_transforms(train=True, min_size=(20, 30), max_size=None, hflip_prob=0)(image, target)
    assert out_image.shape[0] in (20, 30)


def test_crop_drops_leaving_boxes_with_their_masks_and_labels():
    image, target = _sample(1)
    pipeline = build_transforms(train=True, large_scale_jitter=(2.5, 3.0), max_size=48, hflip_prob=0)
    pipeline.set_seed(1)
    lost = 0
    for _ in range(5):
        out_image, out = pipeline(image, target)
        assert out_image.shape == (48, 48, 3)
        _check(out_image, out)
        lost += len(target["labels"]) - len(out["labels"])
    assert lost > 0


def test_small_boxes_dropped():
    image = np.zeros((64, 64, 3), np.uint8)
    masks = np.zeros((3, 64, 64), np.uint8)
    masks[0, 10:30, 10:30] = 1
    masks[1, 40:42, 40:50] = 1  # 2 px high
    masks[2, 50:60, 5:25] = 1
    target = {"boxes": masks_to_boxes(masks), "labels": np.array([1, 2, 3]), "masks": masks,
              "area": masks.sum(axis=(1, 2)).astype(np.float32)}
    _, out = build_transforms(train=True, hflip_prob=0, min_box_size=3)(image, target)
    assert out["labels"].tolist() == [1, 3] and (out["masks"] == masks[[0, 2]]).all()
    assert out["area"].tolist() == [400, 200]


def test_padding_is_ignore_in_semantic_maps():
    image = np.full((64, 64, 3), 100, np.uint8)
    target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
              "sem_seg": np.full((64, 64), 3, np.int64)}
    out_image, out = build_transforms(train=True, large_scale_jitter=(0.5, 0.5), max_size=64,
                                       hflip_prob=0)(image, target)
    assert out_image.shape == (64, 64, 3)
    assert (out["sem_seg"][:32, :32] == 3).all() and (out["sem_seg"][32:] == 255).all()
    assert (out_image[32:] == 0).all()


def test_seeded_pipelines_repeat():
    image, target = _sample(2)
    a = build_transforms(train=True, min_size=(40, 60, 80), color_jitter=0.3, random_crop=True)
    b = build_transforms(train=True, min_size=(40, 60, 80), color_jitter=0.3, random_crop=True)
    a.set_seed(7)
    b.set_seed(7)
    for _ in range(3):
        (ia, ta), (ib, tb) = a(image, target), b(image, target)
        assert (ia == ib).all() and np.array_equal(ta["boxes"], tb["boxes"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_size"):
        build_transforms(train=True, min_size=0)
    with pytest.raises(ValueError, match="large_scale_jitter"):
        build_transforms(train=True, large_scale_jitter=(2.0, 1.0), max_size=64)
    with pytest.raises(ValueError, match="max_size"):
        build_transforms(train=True, large_scale_jitter=(0.5, 1.0))


def test_resize_uses_only_albumentations_public_api():
    import albumentations as A

    from resdet.data.transforms import ResizeShortestEdge

    assert ResizeShortestEdge.__bases__ == (A.DualTransform,)  # no internal base class (breaks on upgrades)
    masks = np.zeros((2, 40, 80), np.uint8)
    masks[0, 10:20, 20:40] = 1
    out = A.Compose([ResizeShortestEdge([20], 100)])(image=np.zeros((40, 80, 3), np.uint8), masks=masks)
    assert out["image"].shape == (20, 40, 3) and np.asarray(out["masks"]).shape == (2, 20, 40)
    assert np.asarray(out["masks"])[0].sum() == 50


def test_masks_to_boxes_pixel_edges():
    from resdet.data import masks_to_boxes

    m = np.zeros((3, 5, 6), np.uint8)
    m[0, 1, 2] = 1
    m[2, 0:3, 1:6] = 1
    assert masks_to_boxes(m).tolist() == [[2, 1, 3, 2], [0, 0, 0, 0], [1, 0, 6, 3]]
    assert masks_to_boxes(np.zeros((0, 5, 6), np.uint8)).shape == (0, 4)
