"""Semantic FPN model: training steps on Cityscapes / VOC layout fixtures, gradients, eval outputs,
batched equals one-by-one, bad input."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from resdet.models.semantic_fpn import SemanticFPN, semantic_fpn

SMALL = {"conv_dims": 32, "fpn_out_channels": 32}


def _model(backbone: str = "resnet18", num_classes: int = 5, **options) -> SemanticFPN:
    return semantic_fpn(backbone, num_classes=num_classes, **{**SMALL, **options})


def _batch(sizes, num_classes=5):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = [{"sem_seg": torch.randint(0, num_classes, (h, w), generator=g)} for h, w in sizes]
    targets[0]["sem_seg"][:4] = 255
    return images, targets


def _train_step(model: SemanticFPN, images, targets) -> float:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    before = model.sem_seg_head.predictor.weight.detach().clone()
    losses = model(images, targets)
    assert set(losses) == {"loss_sem_seg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.sem_seg_head.predictor.weight)
    return loss.item()


# ----------------------------------------------------------------------------------------------------
# fixtures in the real on-disk layouts


def _write_cityscapes(root, split="train", n=2, size=(64, 128)):
    rng = np.random.default_rng(0)
    for i in range(n):
        city = "aachen"
        stem = f"{city}_{i:06d}_000019"
        img_dir = os.path.join(root, "leftImg8bit", split, city)
        gt_dir = os.path.join(root, "gtFine", split, city)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            os.path.join(img_dir, f"{stem}_leftImg8bit.png"))
        label_ids = np.full(size, 7, np.uint8)  # road -> train id 0
        label_ids[: size[0] // 2] = 23  # sky -> train id 10
        label_ids[-8:, :16] = 26  # car -> train id 13
        label_ids[:2] = 0  # unlabeled -> 255
        Image.fromarray(label_ids).save(os.path.join(gt_dir, f"{stem}_gtFine_labelIds.png"))
    return root


def _write_voc(root, year="2012", split="train", n=2, size=(72, 96)):
    rng = np.random.default_rng(0)
    base = os.path.join(root, f"VOC{year}")
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, folder), exist_ok=True)
    ids = [f"{year}_{i:06d}" for i in range(n)]
    palette = [0] * 768
    palette[15 * 3:15 * 3 + 3] = [192, 128, 128]
    palette[255 * 3:255 * 3 + 3] = [224, 224, 192]
    for file_id in ids:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            os.path.join(base, "JPEGImages", f"{file_id}.jpg"))
        label = np.zeros(size, np.uint8)
        label[20:50, 30:70] = 15  # person
        label[19, 29:71] = 255  # object border, ignored
        png = Image.fromarray(label, mode="P")
        png.putpalette(palette)
        png.save(os.path.join(base, "SegmentationClass", f"{file_id}.png"))
    with open(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    return root


def _loader_batch(dataset, n=2):
    items = [dataset[i] for i in range(n)]
    return [im for im, _ in items], [t for _, t in items]


def test_train_step_on_cityscapes_layout(tmp_path):
    from resdet.data.cityscapes import CityscapesDataset

    ds = CityscapesDataset(str(_write_cityscapes(tmp_path / "cityscapes")), "train", task="semantic")
    images, targets = _loader_batch(ds)
    assert targets[0]["sem_seg"].dtype == torch.int64
    assert set(targets[0]["sem_seg"].unique().tolist()) == {0, 10, 13, 255}
    model = _model(num_classes=ds.num_classes)
    assert ds.num_classes == 19
    _train_step(model, images, targets)


def test_train_step_on_voc_layout(tmp_path):
    from resdet.data.voc import VOCDataset

    ds = VOCDataset(str(_write_voc(tmp_path / "VOCdevkit")), "2012", "train", task="semantic")
    images, targets = _loader_batch(ds)
    assert set(targets[0]["sem_seg"].unique().tolist()) == {0, 15, 255}
    model = _model(num_classes=ds.num_classes, min_size=64, max_size=100)  # model-side resize path
    _train_step(model, images, targets)


# ----------------------------------------------------------------------------------------------------
# invariants


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_gradients_reach_every_trainable_parameter(backbone):
    model = _model(backbone)
    model.train()
    images, targets = _batch([(64, 64), (48, 64)])
    model(images, targets)["loss_sem_seg"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert no_grad == []


@pytest.mark.parametrize("resize", [None, 48])
def test_eval_output_at_original_size(resize):
    model = _model(min_size=resize, max_size=200 if resize else None).eval()
    images, _ = _batch([(70, 50), (33, 90)])
    with torch.no_grad():
        out = model(images)
        with_logits = model(images, return_logits=True)
    for image, o, ol in zip(images, out, with_logits):
        assert set(o) == {"sem_seg"}
        assert o["sem_seg"].shape == image.shape[-2:] and o["sem_seg"].dtype == torch.int64
        assert ol["sem_seg_logits"].shape == (5, *image.shape[-2:])
        assert torch.equal(ol["sem_seg_logits"].argmax(0), o["sem_seg"])
    assert "sem_seg_logits" in _model(return_logits=True).eval()(images[:1])[0]


def test_batched_equals_one_by_one():
    model = _model().eval()
    # Different sizes that pad to the same 64×64 batch, so padding is identical either way.
    images, _ = _batch([(60, 64), (64, 50), (64, 64)])
    with torch.no_grad():
        batched = model(images, return_logits=True)
        single = [model([im], return_logits=True)[0] for im in images]
    for b, s in zip(batched, single):
        torch.testing.assert_close(b["sem_seg_logits"], s["sem_seg_logits"], rtol=1e-4, atol=1e-5)
        assert torch.equal(b["sem_seg"], s["sem_seg"])


def test_bad_input_is_named():
    model = _model().train()
    images, targets = _batch([(32, 32)])
    with pytest.raises(ValueError, match="floating point"):
        model([images[0].to(torch.uint8)], targets)
    with pytest.raises(ValueError, match="channels"):
        model([images[0][:1]], targets)
    with pytest.raises(ValueError, match="targets are required"):
        model(images)
    with pytest.raises(ValueError, match=r"sem_seg has shape \(32, 31\)"):
        model(images, [{"sem_seg": targets[0]["sem_seg"][:, :31]}])
    bad = targets[0]["sem_seg"].clone()
    bad[0, 0], bad[0, 1] = 5, -1
    with pytest.raises(ValueError, match=r"labels \[-1, 5\]"):
        model(images, [{"sem_seg": bad}])
    with pytest.raises(ValueError, match="integer"):
        model(images, [{"sem_seg": targets[0]["sem_seg"].float()}])
    with pytest.raises(ValueError, match="'sem_seg'"):
        model(images, [{"boxes": torch.zeros(0, 4)}])
    nan = images[0].clone()
    nan[1, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="image 1: 1 of 3072 pixel values are NaN/inf"):
        model([images[0], nan], targets * 2)
    with pytest.raises(ValueError, match="image 0: 1 of 3072 pixel values are NaN/inf"):
        model.eval()([nan])


def test_float64_images_run_in_float32():
    model = _model().eval()
    images, _ = _batch([(32, 40)])
    with torch.no_grad():
        expected = model(images, return_logits=True)[0]["sem_seg_logits"]
        got = model([images[0].double()], return_logits=True)[0]["sem_seg_logits"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_training_crop_and_rescale_keep_labels_aligned():
    from resdet.models.semantic_fpn import SemSegTransform

    t = SemSegTransform(crop_size=(24, 40), image_mean=(0.0,) * 3, image_std=(1.0,) * 3, size_divisible=8).train()
    label = torch.arange(50 * 60).reshape(50, 60) % 200
    image = (label.float() / 255)[None].expand(3, -1, -1)  # the image encodes its own label
    batch, sizes, targets = t([image, image[:, :16, :30]], [label, label[:16, :30]])
    assert sizes == [(24, 40), (16, 30)] and batch.shape == (2, 3, 24, 40)
    assert torch.equal((batch[0, 0] * 255).round().long(), targets[0])
    assert (targets[1, 16:] == 255).all() and (targets[1, :, 30:] == 255).all()
    t.scale_range = (0.5, 0.5)
    _, sizes, targets = t([image], [label])
    assert sizes == [(24, 30)]  # 50x60 halved, then cropped to at most 24x40
    assert set(targets.unique().tolist()) <= set(label.unique().tolist()) | {255}
    t.eval()
    _, sizes, _ = t([image])
    assert sizes == [(50, 60)]  # no crop, no rescale in evaluation
