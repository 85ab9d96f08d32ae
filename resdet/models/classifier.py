"""Image classification on any resdet backbone: ``model.arch=classifier``.

The model follows the detectors' conventions: it takes a list of ``Tensor[C, H, W]`` images in [0, 1],
normalizes (and, in evaluation, optionally resizes and center-crops) them itself; in training it takes
targets with ``labels`` and returns a loss dict, in evaluation it returns one dict per image.

Shape shorthand:
    N       images in the batch
    C       image channels;  H, W  size of one image (after the optional evaluation resize / crop)
    F       channels of the backbone's last level
    K       classes (labels 0..K-1; no background class)

Label smoothing, mixup and cutmix are timm's (``timm.data.Mixup``, ``timm.loss.SoftTargetCrossEntropy``,
``timm.loss.LabelSmoothingCrossEntropy``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import create_classifier
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from resdet.backbones.cifar_resnet import CIFAR_RESNETS, build_cifar_resnet
from resdet.backbones.resnet import RESNETS, build_resnet

from .registry import register_arch
from .transform import IMAGENET_MEAN, IMAGENET_STD, ImageBatcher
from .validation import InvalidInput, check_images

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "ClassificationTransform",
           "ImageClassifier", "build_classification_backbone", "check_classification_targets", "classifier"]

# Per-channel statistics of the training images (50k, all pixels), images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def check_classification_targets(targets: Sequence[dict[str, Tensor]] | None, *, num_images: int,
                                 num_classes: int) -> Tensor:
    """The labels of classification targets as ``Tensor[N]`` int64, each checked to lie in 0..K-1.

    Each target holds ``labels``: an int64 Tensor with one element (``Tensor[]`` or ``Tensor[1]``).

    Raises:
        InvalidInput: naming the image index and the bad value.
    """
    if targets is None:
        raise ValueError("targets are required in training mode (model.train()); got None")
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    labels = []
    for i, target in enumerate(targets):
        label = target.get("labels") if isinstance(target, dict) else None
        if not isinstance(label, Tensor) or label.numel() != 1 or label.dim() > 1:
            what = tuple(label.shape) if isinstance(label, Tensor) else type(label).__name__
            raise InvalidInput(i, f"target needs 'labels', one class index as a Tensor[] or Tensor[1], got {what}")
        if label.dtype != torch.int64:
            raise InvalidInput(i, f"labels must be int64, got dtype {label.dtype}")
        labels.append(label.reshape(()))
    stacked = torch.stack(labels)
    bad = (stacked < 0) | (stacked >= num_classes)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise InvalidInput(i, f"label {int(stacked[i])} is outside 0..{num_classes - 1} (num_classes={num_classes})")
    return stacked


class ClassificationTransform(ImageBatcher):
    """Normalizes images and stacks them into a batch; in evaluation optionally resizes the shorter side to
    ``resize_size`` and takes the central ``crop_size`` square first (torchvision's ImageNet evaluation:
    256 then 224; bilinear with antialiasing, as ``torchvision.transforms.v2``).

    Args:
        image_mean: per-channel mean subtracted from images in [0, 1].
        image_std: per-channel standard deviation images are divided by.
        resize_size: evaluation only: shorter side after resizing (None: no resize).
        crop_size: evaluation only: side of the central crop (None: no crop).
        channels_last: return the batch in ``torch.channels_last`` memory format.
    """

    def __init__(self, *, image_mean: Sequence[float], image_std: Sequence[float], resize_size: int | None = None,
                 crop_size: int | None = None, channels_last: bool = False) -> None:
        super().__init__(image_mean, image_std, 1, channels_last=channels_last)
        for name, value in (("resize_size", resize_size), ("crop_size", crop_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of pixels or None, got {value}")
        self.resize_size = resize_size
        self.crop_size = crop_size

    def prepare(self, image: Tensor) -> Tensor:
        """One ``Tensor[C, H, W]``: (evaluation resize and crop,) then normalization."""
        if not self.training:
            if self.resize_size is not None:
                image = TF.resize(image, [self.resize_size], antialias=True)
            if self.crop_size is not None:
                image = TF.center_crop(image, [self.crop_size])
        return self.normalize(image)

    def forward(self, images: list[Tensor]) -> Tensor:
        """``[Tensor[C, H, W]] * N`` of one size → normalized ``Tensor[N, C, H, W]``."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return torch.stack([self.prepare(im) for im in images]).contiguous(memory_format=memory_format)


class ImageClassifier(nn.Module):
    """A backbone (any module returning named levels and answering ``output_shape()``), global pooling of
    its last level, dropout and a linear classifier ``fc``.

    Args:
        backbone: returns ``{level: Tensor[N, F, h, w]}``; the last level of ``output_shape()`` is classified.
        num_classes: K.
        transform: the input transform (normalization, evaluation resize/crop).
        global_pool: timm pooling type (``avg``, ``max``, ``avgmax``, ``catavgmax``).
        drop_rate: dropout before ``fc``.
        label_smoothing: smoothing of the one-hot targets (timm's ``LabelSmoothingCrossEntropy``, or inside
            ``mixup``'s soft targets).
        mixup: timm's ``Mixup`` applied to every training batch (its soft targets go through
            ``SoftTargetCrossEntropy``); None for plain cross entropy.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, transform: ClassificationTransform,
                 global_pool: str = "avg", drop_rate: float = 0.0, label_smoothing: float = 0.0,
                 mixup: Mixup | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        shapes = backbone.output_shape()
        self.level = list(shapes)[-1]
        self.backbone = backbone
        self.transform = transform
        self.num_classes = num_classes
        self.num_features = shapes[self.level].channels
        self.drop_rate = drop_rate
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.mixup = mixup
        if mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def logits(self, batch: Tensor) -> Tensor:
        """Normalized ``Tensor[N, C, H, W]`` → ``Tensor[N, K]``."""
        x = self.global_pool(self.backbone(batch)[self.level])  # [N, F, h, w] -> [N, F]
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Classify ``images``.

        Args:
            images: ``Tensor[C, H, W]`` float in [0, 1]; in training all of one size.
            targets: training only: per image ``labels``, an int64 class index (``Tensor[]`` or ``Tensor[1]``).

        Returns:
            Training: ``{"loss_cls": Tensor[]}``. Evaluation: per image ``scores`` (softmax,
            ``Tensor[K]``, float32) and ``labels`` (the top-1 class, ``Tensor[]`` int64).
        """
        check_images(images, in_chans=self.transform.in_chans)
        if self.training:
            labels = check_classification_targets(targets, num_images=len(images), num_classes=self.num_classes)
            sizes = sorted({tuple(im.shape[-2:]) for im in images})
            if len(sizes) > 1:
                raise InvalidInput(None, f"training images must share one size to form a batch, got sizes {sizes}; "
                                         "crop them to one size in the data pipeline (data.classification.augment)")
            batch = self.transform(images)
            if self.mixup is not None:
                if len(images) % 2:
                    raise InvalidInput(None, f"mixup/cutmix pair each image with another: the batch needs an even "
                                             f"number of images, got {len(images)} (data.batch_size)")
                batch, soft = self.mixup(batch, labels.to(batch.device))
                return {"loss_cls": self.criterion(self.logits(batch).float(), soft)}
            return {"loss_cls": self.criterion(self.logits(batch).float(), labels)}
        prepared = [self.transform.prepare(im) for im in images]
        logits = prepared[0].new_empty((len(images), self.num_classes), dtype=torch.float32)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(prepared):  # evaluation: one forward per image size
            by_size.setdefault(tuple(im.shape), []).append(i)
        memory_format = torch.channels_last if self.transform.channels_last else torch.contiguous_format
        for indices in by_size.values():
            batch = torch.stack([prepared[i] for i in indices]).contiguous(memory_format=memory_format)
            logits[indices] = self.logits(batch).float()
        scores = logits.softmax(dim=1)
        return [{"scores": s, "labels": s.argmax()} for s in scores]


def build_classification_backbone(name: str, **options: Any) -> nn.Module:
    """The trunk called ``name`` returning only its last level: a CIFAR ResNet (``cifar_resnet20`` ...,
    level ``c4``) or an ImageNet ResNet/ResNeXt/wide ResNet (``resnet18`` ... , level ``c5``)."""
    if name.startswith("cifar_resnet"):
        if options.get("weights") is not None:
            raise ValueError(f"backbone {name!r}: there is no ImageNet checkpoint for a CIFAR ResNet; start from a "
                             "resdet checkpoint with model.weights instead of model.backbone_weights")
        options.pop("weights", None)
        return build_cifar_resnet(name, out_features=("c4",), **options)
    if name not in RESNETS:
        names = sorted(RESNETS) + sorted(CIFAR_RESNETS, key=len)
        raise ValueError(f"unknown backbone {name!r}; expected one of {names}")
    if "shortcut" in options:
        raise ValueError(f"backbone {name!r}: model.options.shortcut applies to the cifar_resnet* backbones only")
    return build_resnet(name, out_features=("c5",), **options)


@register_arch("classifier", task="classification")
def classifier(
    backbone: str = "resnet50",
    num_classes: int = 1000,
    *,
    # backbone (resdet.backbones.ResNet / CifarResNet options)
    weights: str | None = None,
    norm: str | None = None,
    frozen_stages: int | None = None,
    zero_init_residual: bool = False,
    shortcut: Literal["A", "B"] | None = None,
    in_chans: int = 3,
    # input
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    resize_size: int | None = None,
    crop_size: int | None = None,
    channels_last: bool = True,
    # head and loss
    global_pool: str = "avg",
    drop_rate: float = 0.0,
    label_smoothing: float = 0.0,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mixup_prob: float = 1.0,
    mixup_switch_prob: float = 0.5,
) -> ImageClassifier:
    """An image classifier on a resdet backbone.

    Args:
        backbone: ``cifar_resnet20/32/44/56/110/1202`` or ``resnet18 … resnet152``, ``resnext50_32x4d``,
            ``wide_resnet50_2``.
        num_classes: K (no background class: labels are 0..K-1).
        weights: ImageNet checkpoint of the ResNet trunk (``model.backbone_weights``); its ``fc`` is not used.
        norm: ``bn`` (default), ``frozen_bn``, ``sync_bn`` or ``gn``.
        frozen_stages: 0 freezes nothing, 1 the stem, k the stem and the first k-1 stages.
        zero_init_residual: zero the last norm's scale in every block.
        shortcut: CIFAR ResNets: ``"A"`` (the paper's, default) or ``"B"``.
        in_chans: image channels.
        image_mean: per-channel mean of images in [0, 1]; None: CIFAR-10's for the CIFAR ResNets, ImageNet's
            otherwise.
        image_std: per-channel standard deviation, the same defaults.
        resize_size: evaluation: shorter side after resizing (ImageNet: 256); None keeps the size.
        crop_size: evaluation: central crop side (ImageNet: 224); None takes the whole image.
        channels_last: compute in ``torch.channels_last`` memory format (faster with oneDNN on CPU and
            cuDNN on GPU; measured in the README).
        global_pool: timm pooling type of the head.
        drop_rate: dropout before ``fc``.
        label_smoothing: target smoothing ε (timm's).
        mixup_alpha: Beta(α, α) of mixup (0: off); timm's ``Mixup``.
        cutmix_alpha: Beta(α, α) of cutmix (0: off).
        mixup_prob: probability that a batch is mixed at all.
        mixup_switch_prob: with both on, probability of cutmix instead of mixup for a batch.
    """
    cifar = backbone.startswith("cifar_resnet")
    options: dict[str, Any] = dict(norm=norm or "bn", zero_init_residual=zero_init_residual, in_chans=in_chans,
                                   weights=weights)
    if frozen_stages is not None:
        options["frozen_stages"] = frozen_stages
    if shortcut is not None:
        options["shortcut"] = shortcut
    trunk = build_classification_backbone(backbone, **options)
    mean = tuple(image_mean) if image_mean is not None else (CIFAR10_MEAN if cifar else IMAGENET_MEAN)
    std = tuple(image_std) if image_std is not None else (CIFAR10_STD if cifar else IMAGENET_STD)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"image_mean {list(mean)} and image_std {list(std)} need one value per channel "
                         f"(in_chans={in_chans})")
    mixup = None
    if mixup_alpha > 0 or cutmix_alpha > 0:
        mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                      switch_prob=mixup_switch_prob, label_smoothing=label_smoothing, num_classes=num_classes)
    transform = ClassificationTransform(image_mean=mean, image_std=std, resize_size=resize_size,
                                        crop_size=crop_size, channels_last=channels_last)
    model = ImageClassifier(trunk, num_classes, transform=transform, global_pool=global_pool, drop_rate=drop_rate,
                            label_smoothing=label_smoothing, mixup=mixup)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
