"""model.arch=classifier: the train/eval contract, timm's losses and mixup, input checks, torchvision parity,
and the classification evaluator against timm's accuracy."""
import pytest
import torch
import torchvision
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import accuracy as timm_accuracy
from torchvision.transforms import v2 as T

from resdet.config import load_config
from resdet.engine.checkpoint import CheckpointError
from resdet.engine.pretrained import load_complete, load_pretrained
from resdet.evaluation import ClassificationEvaluator
from resdet.models import arch_task, build_model, classifier
from resdet.models.validation import InvalidInput


def _batch(n, size=32, classes=10):
    return [torch.rand(3, size, size) for _ in range(n)], [{"labels": torch.tensor(i % classes)} for i in range(n)]


@pytest.mark.parametrize("backbone", ["cifar_resnet20", "resnet18"])
def test_train_loss_dict_and_eval_outputs(backbone):
    model = classifier(backbone, num_classes=7)
    images, targets = _batch(4, classes=7)
    losses = model(images, targets)
    assert list(losses) == ["loss_cls"] and losses["loss_cls"].dim() == 0
    losses["loss_cls"].backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(images + [torch.rand(3, 40, 36)])  # evaluation takes mixed sizes (one forward per size)
        alone = model([images[1]])[0]
    assert len(out) == 5 and set(out[0]) == {"scores", "labels"}
    assert out[0]["scores"].shape == (7,) and out[0]["scores"].dtype == torch.float32
    torch.testing.assert_close(out[0]["scores"].sum(), torch.tensor(1.0))
    assert out[2]["labels"].dtype == torch.int64 and int(out[2]["labels"]) == int(out[2]["scores"].argmax())
    torch.testing.assert_close(out[1]["scores"], alone["scores"], rtol=1e-4, atol=1e-6)


def test_registered_and_built_from_a_config():
    assert arch_task("classifier") == "classification"
    cfg = load_config("configs/cifar10/resnet20.yaml")
    model = build_model(cfg)
    assert type(model.backbone).__name__ == "CifarResNet" and model.fc.out_features == 10
    assert model.transform.image_mean == (0.4914, 0.4822, 0.4465)
    weight = model.backbone.layer2[0].conv1.weight  # [32, 16, 3, 3]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert sum(p.numel() for p in model.parameters()) == 269722  # ResNet-20, option A: the paper's 0.27M
    with pytest.raises(ValueError, match="shortcut applies to the cifar_resnet"):
        classifier("resnet18", shortcut="B")
    with pytest.raises(ValueError, match="no ImageNet checkpoint for a CIFAR ResNet"):
        classifier("cifar_resnet20", weights="x.pth")


def test_bad_targets_name_the_image():
    model = classifier("cifar_resnet20", num_classes=10)
    images, targets = _batch(3)
    targets[2]["labels"] = torch.tensor(10)
    with pytest.raises(InvalidInput, match=r"image 2: label 10 is outside 0\.\.9 \(num_classes=10\)"):
        model(images, targets)
    targets[2]["labels"] = torch.tensor([1, 2])
    with pytest.raises(InvalidInput, match="image 2: target needs 'labels', one class index"):
        model(images, targets)
    targets[2]["labels"] = torch.tensor(1, dtype=torch.int32)
    with pytest.raises(InvalidInput, match="labels must be int64"):
        model(images, targets)
    with pytest.raises(InvalidInput, match="must share one size"):
        model([torch.rand(3, 32, 32), torch.rand(3, 28, 32)], _batch(2)[1])


def test_label_smoothing_mixup_cutmix_are_timms():
    smooth = classifier("cifar_resnet20", label_smoothing=0.1)
    assert isinstance(smooth.criterion, LabelSmoothingCrossEntropy)
    mixed = classifier("cifar_resnet20", mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1)
    assert isinstance(mixed.criterion, SoftTargetCrossEntropy) and mixed.mixup.label_smoothing == 0.1
    images, targets = _batch(4)
    loss = mixed(images, targets)["loss_cls"]
    assert torch.isfinite(loss)
    with pytest.raises(InvalidInput, match="even number of images, got 3"):
        mixed(images[:3], targets[:3])


def test_eval_resize_and_crop_match_torchvision_preset():
    model = classifier("resnet18", num_classes=3, resize_size=40, crop_size=32, channels_last=False).eval()
    image = torch.rand(3, 50, 70)
    expected = T.Compose([T.Resize(40, antialias=True), T.CenterCrop(32),
                          T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])(image)
    torch.testing.assert_close(model.transform.prepare(image), expected)


def test_torchvision_imagenet_checkpoint_classifies_as_torchvision(tmp_path):
    """model.weights / tools/test.py with a torchvision ImageNet file: trunk and fc load, same softmax."""
    tv = torchvision.models.resnet18(num_classes=1000).eval()
    for m in tv.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    model = classifier("resnet18", num_classes=1000, channels_last=False)
    report = load_complete(model, tmp_path / "resnet18.pth")  # what tools/test.py uses: every tensor filled
    assert not report.unfilled and not report.skipped and "fc.weight" in report.loaded
    image = torch.rand(3, 64, 64)
    normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    with torch.no_grad():
        ours = model.eval()([image])[0]["scores"]
        ref = tv(normalize(image)[None]).softmax(dim=1)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    ten = classifier("resnet18", num_classes=10)  # another class count: the fc is skipped, the trunk loads
    report = load_pretrained(ten, tmp_path / "resnet18.pth")
    assert [k for k, _, _ in report.skipped] == ["fc.weight", "fc.bias"]
    with pytest.raises(CheckpointError, match="would be random"):
        load_complete(classifier("resnet18", num_classes=10), tmp_path / "resnet18.pth")


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    a = classifier("cifar_resnet20", channels_last=True).eval()
    b = classifier("cifar_resnet20", channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    images = _batch(2)[0]
    with torch.no_grad():
        torch.testing.assert_close(a(images)[0]["scores"], b(images)[0]["scores"], rtol=1e-4, atol=1e-6)


def test_evaluator_matches_timm_accuracy_and_counts_per_class():
    torch.manual_seed(0)
    evaluator = ClassificationEvaluator(12, class_names=[f"c{i}" for i in range(12)])
    all_scores, all_labels = [], []
    for n in (7, 16, 5):  # uneven batches: accuracy is per image, not per batch
        scores = torch.rand(n, 12).softmax(dim=1)
        labels = torch.randint(0, 12, (n,))
        evaluator.process([{"labels": lab} for lab in labels], [{"scores": s} for s in scores])
        all_scores.append(scores)
        all_labels.append(labels)
    scores, labels = torch.cat(all_scores), torch.cat(all_labels)
    top1, top5 = timm_accuracy(scores, labels, topk=(1, 5))  # percentages
    m = evaluator.evaluate()
    assert m["top1"] == pytest.approx(float(top1) / 100) and m["top5"] == pytest.approx(float(top5) / 100)
    assert m["top1_error"] == pytest.approx(1 - m["top1"]) and m["num_images"] == 28
    for k in range(12):
        mask = labels == k
        if mask.any():
            assert m[f"acc/c{k}"] == pytest.approx(float((scores[mask].argmax(1) == k).float().mean()))
        else:
            assert f"acc/c{k}" not in m
    assert "top-1 error" in evaluator.summary() and "c11" in evaluator.summary()


def test_evaluator_hand_case():
    evaluator = ClassificationEvaluator(3, class_names=["a", "b", "c"])
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.5, 0.3]])
    labels = [0, 1, 1, 1]  # top-1 hits: yes, no, no, yes
    evaluator.process([{"labels": torch.tensor([lab])} for lab in labels], [{"scores": s} for s in scores])
    m = evaluator.evaluate()
    assert m["top1"] == 0.5 and m["top5"] == 1.0 and m["acc/a"] == 1.0 and m["acc/b"] == pytest.approx(1 / 3)
    assert "acc/c" not in m and m["mean_class_acc"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="label 3 is outside 0..2"):
        evaluator.process([{"labels": torch.tensor(3)}], [{"scores": scores[0]}])
