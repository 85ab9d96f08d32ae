"""Draw predictions with torchvision.utils and run a model on image files (``tools/infer.py``)."""
from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["IMAGE_SUFFIXES", "draw_predictions", "list_images", "predict_files", "save_dataset_visualizations",
           "read_rgb", "write_rgb"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def read_rgb(path: str | os.PathLike) -> Tensor:
    """Image file → uint8 ``Tensor[3, H, W]`` RGB."""
    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # HWC -> CHW


def write_rgb(image: Tensor, path: str | os.PathLike) -> None:
    """uint8 ``Tensor[3, H, W]`` → image file (format from the suffix)."""
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)  # CHW -> HWC


def _colors(n: int) -> list[tuple[int, int, int]]:
    out = []
    for i in range(max(n, 1)):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _label_name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label - 1] if 0 < label <= len(class_names) else str(label)


def draw_predictions(image: Tensor, output: dict[str, Tensor], *, class_names: Sequence[str] = (),
                     score_thresh: float = 0.5) -> Tensor:
    """Image ``Tensor[3, H, W]`` (float in [0, 1] or uint8) with boxes, ``label score`` captions and
    masks (thresholded at 0.5) of the detections scoring at least ``score_thresh``; returns uint8."""
    img = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    img = img.cpu()
    keep = output["scores"].cpu() >= score_thresh
    boxes = output["boxes"].cpu()[keep]
    labels = output["labels"].cpu()[keep].tolist()
    scores = output["scores"].cpu()[keep].tolist()
    palette = _colors(max(len(class_names), max(labels, default=0)) + 1)
    colors = [palette[lab] for lab in labels]
    if "masks" in output and len(labels):
        masks = output["masks"].cpu()[keep][:, 0] >= 0.5  # [N, 1, H, W] probabilities -> [N, H, W] bool
        img = draw_segmentation_masks(img, masks, alpha=0.45, colors=colors)
    if len(labels):
        captions = [f"{_label_name(lab, class_names)} {s:.2f}" for lab, s in zip(labels, scores)]
        img = draw_bounding_boxes(img, boxes, labels=captions, colors=colors, width=1)
    return img


@torch.no_grad()
def save_dataset_visualizations(model: nn.Module, dataset, out_dir: str | os.PathLike, *, device: torch.device,
                                num_images: int, class_names: Sequence[str] = (),
                                score_thresh: float = 0.5) -> list[Path]:
    """Draw the predictions on the first ``num_images`` dataset images into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    paths = []
    for i in range(min(num_images, len(dataset))):
        image, target = dataset[i]
        output = model([image.to(device)])[0]
        drawn = draw_predictions(image, output, class_names=class_names, score_thresh=score_thresh)
        path = out_dir / f"pred_{int(target.get('image_id', i)):06d}.png"
        write_rgb(drawn, path)
        paths.append(path)
    model.train(was_training)
    return paths


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files among ``inputs`` (files, or folders searched non-recursively), sorted per folder."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {str(p)!r} is neither an image file nor a folder")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {list(map(str, inputs))}")
    return files


@torch.no_grad()
def predict_files(model: nn.Module, files: Sequence[Path], out_dir: str | os.PathLike, *, device: torch.device,
                  class_names: Sequence[str] = (), score_thresh: float = 0.5) -> list[dict[str, Any]]:
    """Run ``model`` on image files; write ``<stem>.png`` with drawn detections and ``detections.json``.

    Returns:
        One dict per image: ``file``, and ``detections`` (``box`` xyxy, ``label``, ``class``, ``score``)
        for detections scoring at least ``score_thresh``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    results = []
    for f in files:
        image = read_rgb(f)
        output = model([(image.float() / 255).to(device)])[0]
        output = {k: v.cpu() for k, v in output.items()}
        write_rgb(draw_predictions(image, output, class_names=class_names, score_thresh=score_thresh),
                  out_dir / f"{f.stem}.png")
        keep = output["scores"] >= score_thresh
        dets = [
            {"box": [round(float(v), 2) for v in b], "label": int(lab), "class": _label_name(int(lab), class_names),
             "score": round(float(s), 4)}
            for b, lab, s in zip(output["boxes"][keep], output["labels"][keep], output["scores"][keep])
        ]
        results.append({"file": str(f), "detections": dets})
    with open(out_dir / "detections.json", "w") as fh:
        json.dump(results, fh, indent=1)
    return results
