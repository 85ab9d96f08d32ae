"""Fine-tuning weights: load what fits, re-initialise what does not, and say which is which.

``load_pretrained(model, path)`` accepts

* a resdet checkpoint (``{"model": state_dict, ...}`` written by the trainer),
* a torchvision detection checkpoint (``backbone.body.*``, ``rpn.*``, ``roi_heads.*`` keys; renamed with
  ``resdet.models.torchvision_compat.convert_torchvision_state_dict`` when that gives more matches),
* a torchvision segmentation checkpoint (DeepLabV3 / FCN: ``backbone.*``, ``classifier.*``,
  ``aux_classifier.*``, the keys of resdet's DeepLab),
* an ImageNet torchvision/timm ResNet checkpoint (``conv1.*``, ``layer1.*``...; its keys go under the
  model's backbone body prefix and the classifier is dropped, except for an image classifier, whose
  ``fc`` it fills when the class counts agree).

Tensors whose shape differs from the model's (another ``num_classes``) keep the model's fresh
initialisation and are listed as skipped. That is what fine-tuning wants; evaluation and inference want
every tensor: ``load_complete(model, path)`` refuses a checkpoint that leaves any part of the model at its
random initialisation (an ImageNet backbone alone, a torchvision model of another depth or class count),
naming what is missing. The ResNet's keys follow the model: ``backbone.body.*`` of a detector load into a DeepLab's
``backbone.*`` and the other way round.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from resdet.data.label_space import checkpoint_label_space, label_space_of, remap_class_rows

from .checkpoint import CheckpointError, load_checkpoint_file, mismatch_summary

__all__ = ["LoadReport", "load_complete", "load_pretrained", "read_checkpoint", "read_state_dict"]


@dataclass
class LoadReport:
    """What ``load_pretrained`` did.

    Attributes:
        source: ``resdet``, ``torchvision_detection``, ``torchvision_segmentation`` or ``imagenet_backbone``.
        loaded: model keys filled from the checkpoint.
        skipped: ``(key, checkpoint shape, model shape)`` for shape mismatches (kept re-initialised).
        missing: model keys the checkpoint lacks (kept as initialised).
        unexpected: checkpoint keys the model lacks (ignored).
        unfilled: every model key the checkpoint did not fill apart from ``skipped`` (``missing`` lists only
            the backbone body's for an ImageNet checkpoint).
    """

    path: str
    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    class_rows: str = ""  # how per-class head rows were matched between label spaces
    unfilled: list[str] = field(default_factory=list)  # every model key left as initialised (missing or skipped
    # ones excluded), whatever the source

    @staticmethod
    def _grouped(keys: list[str], depth: int = 2) -> str:
        groups: dict[str, int] = {}
        for k in keys:
            g = ".".join(k.split(".")[:depth])
            groups[g] = groups.get(g, 0) + 1
        return ", ".join(f"{g}.* ({n})" for g, n in groups.items())

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.source})"]
        if self.class_rows:
            lines.append(self.class_rows)
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} (shape differs, re-initialised):")
            lines += [f"  {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.skipped]
        if self.missing:
            lines.append(f"missing from checkpoint {len(self.missing)} (kept initialised): "
                         f"{self._grouped(self.missing)}")
        if self.unexpected:
            lines.append(f"not in model {len(self.unexpected)} (ignored): {self._grouped(self.unexpected)}")
        return "\n".join(lines)


def read_checkpoint(path: str | os.PathLike, *, key: str = "model.weights") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint file (``weights_only=True``) into ``(flat state dict, resdet extras)``; the extras
    (``config``, ``class_names``, ...) are empty unless it is a resdet checkpoint.

    Raises:
        CheckpointError: missing, empty, truncated, corrupt or unsafe, or no state dict in it (names the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{key}: checkpoint file {path!r} does not exist")
    if not path.endswith(".safetensors"):
        obj = load_checkpoint_file(path)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "resdet" in obj:
            return dict(obj["model"]), {k: v for k, v in obj.items() if k != "model"}
    from resdet.backbones.weights import load_checkpoint

    try:
        return load_checkpoint(path), {}
    except (ValueError, RuntimeError, OSError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{key}: checkpoint {path!r} is unreadable: {detail}") from None


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], bool]:
    """Read a checkpoint file into a flat state dict; the flag says it is a resdet checkpoint."""
    state, extras = read_checkpoint(path)
    return state, bool(extras)


def _body_prefix(model_keys: list[str]) -> str:
    for k in model_keys:
        if k.endswith("conv1.weight") and "layer" not in k:
            return k[: -len("conv1.weight")]
    raise ValueError("the model has no ResNet stem (…conv1.weight) to put an ImageNet backbone checkpoint under")


def _convert_torchvision(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    try:
        from resdet.models.torchvision_compat import convert_torchvision_state_dict
    except ImportError:
        return sd
    return convert_torchvision_state_dict(sd)


def _is_torchvision_segmentation(sd: dict[str, Tensor]) -> bool:
    from resdet.models.torchvision_segmentation import is_torchvision_segmentation

    return is_torchvision_segmentation(sd)


def _match_body_prefix(sd: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """ResNet keys moved from the checkpoint's body prefix to the model's: ``backbone.body.*`` (detectors,
    semantic FPN) ↔ ``backbone.*`` (DeepLab, torchvision's segmentation models)."""
    try:
        have, want = _body_prefix(list(sd)), _body_prefix(list(target))
    except ValueError:
        return sd
    if have == want:
        return sd
    body = re.compile(rf"^{re.escape(have)}(conv1|bn1|layer\d)\.")
    return {want + k[len(have):] if body.match(k) else k: v for k, v in sd.items()}


def _count_fitting(sd: dict[str, Tensor], target: dict[str, Tensor]) -> int:
    return sum(1 for k, v in sd.items() if k in target and target[k].shape == v.shape)


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load every checkpoint tensor that fits ``model`` (in place) and report the rest."""
    sd, extras = read_checkpoint(path)
    is_resdet = bool(extras)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    target = model.state_dict()
    if is_resdet:
        source = "resdet"
    elif _is_torchvision_segmentation(sd):
        source = "torchvision_segmentation"  # DeepLabV3 / FCN: resdet's DeepLab has the same keys
    elif any(k.startswith(("rpn.", "roi_heads.", "backbone.")) for k in sd):
        source = "torchvision_detection"
        converted = _convert_torchvision(sd)
        if _count_fitting(converted, target) > _count_fitting(sd, target):
            sd = converted
    else:
        source = "imagenet_backbone"
        prefix = _body_prefix(list(target))
        # An image classifier (model.arch=classifier: backbone.* and fc.*) takes the checkpoint's fc as well.
        own_fc = bool(prefix) and "fc.weight" in target
        sd = {(k if own_fc and k.startswith("fc.") else prefix + k): v for k, v in sd.items()
              if (own_fc and k.startswith("fc.")) or not k.startswith(("fc.", "head.fc.", "classifier."))}
    if source != "imagenet_backbone":
        sd = _match_body_prefix(sd, target)
    report = LoadReport(path=os.fspath(path), source=source)
    model_space = label_space_of(model)
    source_space = checkpoint_label_space(sd, extras) if model_space else None
    if source_space is not None and source_space != model_space:  # keep the rows of shared categories
        sd, report.class_rows = remap_class_rows(sd, target, source_space, model_space)
    fitting = {}
    for k, v in sd.items():
        if k not in target:
            if not k.endswith("num_batches_tracked"):
                report.unexpected.append(k)
        elif target[k].shape != v.shape:
            report.skipped.append((k, tuple(v.shape), tuple(target[k].shape)))
        else:
            fitting[k] = v
    report.loaded = sorted(fitting)
    skipped = {k for k, _, _ in report.skipped}
    report.unfilled = [k for k in target if k not in fitting and k not in skipped
                       and not k.endswith("num_batches_tracked")]
    report.missing = list(report.unfilled)
    if source == "imagenet_backbone":  # only the body was asked for: list what is missing inside it
        prefix = _body_prefix(list(target))
        report.missing = [k for k in report.missing if k.startswith(prefix) or (own_fc and k.startswith("fc."))]
    model.load_state_dict(fitting, strict=False)
    return report


def load_complete(model: nn.Module, path: str | os.PathLike, *, key: str = "--checkpoint") -> LoadReport:
    """:func:`load_pretrained` for evaluation and inference: every tensor of ``model`` must come from the
    checkpoint, or nothing is used.

    Raises:
        CheckpointError: one line naming the file and what it lacks (an ImageNet backbone without the
            detection or segmentation heads; tensors of another shape, e.g. another depth or class count;
            parts of the model it does not hold).
    """
    report = load_pretrained(model, path)
    path = os.fspath(path)
    if report.source == "imagenet_backbone" and (report.unfilled or report.skipped):  # an image classifier whose
        # fc the ImageNet checkpoint also filled is complete
        raise CheckpointError(
            f"{key}: checkpoint {path!r} holds an ImageNet backbone only ({len(report.loaded)} tensors): the rest "
            f"of the model ({mismatch_summary([], report.unfilled)}) would be random; it can start a training "
            f"(model.backbone_weights or model.weights), not be evaluated; give a trained checkpoint (and --config "
            f"for the model it belongs to)")
    if report.skipped or report.unfilled:
        raise CheckpointError(
            f"{key}: checkpoint {path!r} ({report.source.replace('_', ' ')}) does not fit the model: "
            f"{mismatch_summary(report.skipped, report.unfilled)}; refused rather than evaluating random weights "
            f"(check --config, model.backbone and model.num_classes)")
    return report
