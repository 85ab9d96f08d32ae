"""Evaluation and inference entry points: a config plus a checkpoint in, metrics or drawn images out."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from resdet.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config
from resdet.data.label_space import TORCHVISION_COCO_NUM_CLASSES, LabelSpace, check_label_space, label_space_of
from resdet.models import arch_task, build_model

from . import distributed as dist
from .builders import build_dataset, build_evaluator, build_test_loader
from .checkpoint import CheckpointError, load_checkpoint_file, load_model_state, unwrap_model
from .pretrained import load_complete, read_checkpoint

__all__ = ["amp_dtype", "bf16_native", "config_for_checkpoint", "evaluate_model", "load_model", "evaluate_checkpoint",
           "infer_images"]

_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16, or a CPU whose oneDNN has bf16
    kernels (AVX512-BF16 or AMX). Elsewhere bf16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def amp_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """``none`` / ``bf16`` / ``fp16`` → autocast dtype; ``auto`` → bf16 where ``device`` computes it
    natively (:func:`bf16_native`), else None (float32)."""
    if name == "auto":
        return torch.bfloat16 if bf16_native(device) else None
    return _AMP[name]


def evaluate_model(cfg: Config, model: nn.Module, dataset, *, device: torch.device,
                   output_dir: str | None = None) -> tuple[dict[str, float], str]:
    """Evaluate ``model`` on ``dataset`` (sharded over ranks); returns (metrics, printed tables)."""
    from resdet.evaluation import inference_on_dataset

    evaluator = build_evaluator(cfg, dataset, output_dir=output_dir, label_space=label_space_of(model))
    if evaluator is None:
        return {}, ""
    loader = build_test_loader(cfg, dataset, rank=dist.get_rank(), world_size=dist.get_world_size(),
                               max_images=cfg.eval.max_images)
    metrics = inference_on_dataset(unwrap_model(model), loader, evaluator, device=device,
                                   amp_dtype=amp_dtype(cfg.train.amp, device))
    return metrics, evaluator.summary()


def config_for_checkpoint(checkpoint: str | os.PathLike, config: str | os.PathLike | None,
                          overrides: Sequence[str] = ()) -> Config:
    """The config to evaluate ``checkpoint`` with: ``config`` when given, else the one stored in a resdet
    checkpoint (else the defaults); ``overrides`` applied last."""
    if config is not None:
        return load_config(config, overrides)
    if not os.path.isfile(checkpoint):
        raise CheckpointError(f"--checkpoint {os.fspath(checkpoint)!r} does not exist")
    stored = None
    if not str(checkpoint).endswith(".safetensors"):
        obj = load_checkpoint_file(checkpoint)
        stored = obj.get("config") if isinstance(obj, dict) else None
    cfg = config_from_dict(stored) if stored else load_config(None)
    return apply_overrides(cfg, overrides)


def _checkpoint_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Classes (with background) of a detection checkpoint's box predictor, None when it has none."""
    for key in ("roi_heads.box_predictor.cls_score.weight", "module.roi_heads.box_predictor.cls_score.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def load_model(cfg: Config, checkpoint: str | os.PathLike, *, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``cfg``'s model and load ``checkpoint``; the model's ``label_space`` says which dataset
    category id each predicted label stands for.

    A resdet checkpoint loads strictly and brings its label space. Any other goes through
    :func:`load_complete` (its report is printed; a checkpoint that leaves part of the model random, such as
    an ImageNet backbone alone, is refused); a torchvision COCO detection checkpoint (a 91-way box
    predictor) is evaluated as published: the model is built with its 91 classes whatever
    ``model.num_classes`` says, and its labels are COCO category ids (:meth:`LabelSpace.torchvision_coco`).

    Returns:
        (eval-mode model, metadata with ``class_names`` and ``contiguous_to_cat_id`` when the checkpoint
        has them).
    """
    state, extras = read_checkpoint(checkpoint, key="--checkpoint")
    meta: dict[str, Any] = {}
    if cfg.model.backbone_weights is not None:  # the checkpoint brings every weight: no ImageNet file needed
        cfg = copy.deepcopy(cfg)
        cfg.model.backbone_weights = None
    if extras:
        model = build_model(cfg)
        load_model_state(model, state, checkpoint, stored_config=extras.get("config"), config=config_to_dict(cfg))
        meta = {k: extras[k] for k in ("class_names", "contiguous_to_cat_id") if k in extras}
        model.label_space = LabelSpace.from_checkpoint(extras)
    else:
        space = None
        detector = arch_task(cfg.model.arch) in ("detection", "instance")
        if detector and _checkpoint_classes(state) == TORCHVISION_COCO_NUM_CLASSES:
            space = LabelSpace.torchvision_coco()
            if cfg.model.num_classes != space.num_classes:
                print(f"{os.fspath(checkpoint)}: torchvision COCO checkpoint (91-way predictor, labels are COCO "
                      f"category ids): evaluated with its 91 classes instead of model.num_classes="
                      f"{cfg.model.num_classes}")
                cfg = copy.deepcopy(cfg)
                cfg.model.num_classes = space.num_classes
        model = build_model(cfg)
        print(load_complete(model, checkpoint))
        model.label_space = space
    if model.label_space is not None:
        meta["class_names"] = list(model.label_space.class_names)
    return model.to(device).eval(), meta


def evaluate_checkpoint(cfg: Config, checkpoint: str | os.PathLike) -> tuple[dict[str, float], str]:
    """Evaluate ``checkpoint`` on ``cfg``'s validation set (sharded when run under torchrun); the COCO
    results JSON goes to ``train.output_dir``."""
    device = dist.init_distributed(cfg.train.device)
    model, _ = load_model(cfg, checkpoint, device=device)
    space = label_space_of(model)
    dataset = build_dataset(cfg, train=False, check_classes=space is None)
    if space is not None:
        check_label_space(space, dataset)
    return evaluate_model(cfg, model, dataset, device=device, output_dir=cfg.train.output_dir)


def infer_images(cfg: Config, checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike],
                 output_dir: str | os.PathLike, *, score_thresh: float | None = None) -> dict[str, Any]:
    """Draw ``checkpoint``'s predictions on image files/folders into ``output_dir`` with ``detections.json``.

    Returns:
        ``results`` (one entry per written image), ``skipped`` (files in the folders that are not images by
        their suffix) and ``failed`` (files that could not be decoded, ``"path: reason"``).
    """
    from .visualize import list_images, predict_files, semantic_class_names

    files, skipped = list_images(inputs)
    device = dist.init_distributed(cfg.train.device)
    model, meta = load_model(cfg, checkpoint, device=device)
    thresh = cfg.eval.vis_score_thresh if score_thresh is None else score_thresh
    names = list(meta.get("class_names", ()))
    if arch_task(cfg.model.arch) == "semantic":
        names = semantic_class_names(names, cfg.model.num_classes)
    space = label_space_of(model)
    results, failed = predict_files(model, files, Path(output_dir), device=device, class_names=names,
                                    score_thresh=thresh, label_to_cat_id=space.label_to_cat_id() if space else None)
    return {"results": results, "skipped": [str(p) for p in skipped], "failed": failed}
