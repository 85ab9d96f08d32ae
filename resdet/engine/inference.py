"""Evaluation and inference entry points: a config plus a checkpoint in, metrics or drawn images out."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from resdet.config import Config, apply_overrides, config_from_dict, load_config
from resdet.models import build_model

from . import distributed as dist
from .builders import build_dataset, build_evaluator, build_test_loader
from .checkpoint import unwrap_model
from .pretrained import load_pretrained, read_state_dict

__all__ = ["amp_dtype", "config_for_checkpoint", "evaluate_model", "load_model", "evaluate_checkpoint",
           "infer_images"]

_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(name: str) -> torch.dtype | None:
    """``none`` / ``bf16`` / ``fp16`` → autocast dtype."""
    return _AMP[name]


def evaluate_model(cfg: Config, model: nn.Module, dataset, *, device: torch.device,
                   output_dir: str | None = None) -> tuple[dict[str, float], str]:
    """Evaluate ``model`` on ``dataset`` (sharded over ranks); returns (metrics, printed tables)."""
    from resdet.evaluation import inference_on_dataset

    evaluator = build_evaluator(cfg, dataset, output_dir=output_dir)
    if evaluator is None:
        return {}, ""
    loader = build_test_loader(cfg, dataset, rank=dist.get_rank(), world_size=dist.get_world_size(),
                               max_images=cfg.eval.max_images)
    metrics = inference_on_dataset(unwrap_model(model), loader, evaluator, device=device,
                                   amp_dtype=amp_dtype(cfg.train.amp))
    return metrics, evaluator.summary()


def config_for_checkpoint(checkpoint: str | os.PathLike, config: str | os.PathLike | None,
                          overrides: Sequence[str] = ()) -> Config:
    """The config to evaluate ``checkpoint`` with: ``config`` when given, else the one stored in a resdet
    checkpoint (else the defaults); ``overrides`` applied last."""
    if config is not None:
        return load_config(config, overrides)
    stored = None
    if os.path.isfile(checkpoint) and not str(checkpoint).endswith(".safetensors"):
        obj = torch.load(checkpoint, map_location="cpu", weights_only=False)
        stored = obj.get("config") if isinstance(obj, dict) else None
    cfg = config_from_dict(stored) if stored else load_config(None)
    return apply_overrides(cfg, overrides)


def load_model(cfg: Config, checkpoint: str | os.PathLike, *, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``cfg``'s model and load ``checkpoint`` (a resdet checkpoint loads strictly; any other
    goes through :func:`load_pretrained` and its report is printed). Returns (eval-mode model, metadata
    with ``class_names`` and ``contiguous_to_cat_id`` when the checkpoint has them)."""
    model = build_model(cfg)
    state, is_resdet = read_state_dict(checkpoint)
    meta: dict[str, Any] = {}
    if is_resdet:
        model.load_state_dict(state)
        full = torch.load(checkpoint, map_location="cpu", weights_only=False)
        meta = {k: full[k] for k in ("class_names", "contiguous_to_cat_id") if k in full}
    else:
        print(load_pretrained(model, checkpoint))
    return model.to(device).eval(), meta


def evaluate_checkpoint(cfg: Config, checkpoint: str | os.PathLike) -> tuple[dict[str, float], str]:
    """Evaluate ``checkpoint`` on ``cfg``'s validation set (sharded when run under torchrun)."""
    device = dist.init_distributed(cfg.train.device)
    model, _ = load_model(cfg, checkpoint, device=device)
    dataset = build_dataset(cfg, train=False)
    return evaluate_model(cfg, model, dataset, device=device, output_dir=cfg.train.output_dir)


def infer_images(cfg: Config, checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike],
          output_dir: str | os.PathLike, *, score_thresh: float | None = None) -> list[dict[str, Any]]:
    """Draw ``checkpoint``'s detections on image files/folders into ``output_dir`` with ``detections.json``."""
    from .visualize import list_images, predict_files

    device = dist.init_distributed(cfg.train.device)
    model, meta = load_model(cfg, checkpoint, device=device)
    thresh = cfg.eval.vis_score_thresh if score_thresh is None else score_thresh
    return predict_files(model, list_images(inputs), Path(output_dir), device=device,
                         class_names=meta.get("class_names", ()), score_thresh=thresh)
