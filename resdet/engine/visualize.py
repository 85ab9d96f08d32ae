"""Draw predictions and run a model on image files (``tools/infer.py``).

Detections: masks with ``torchvision.utils.draw_segmentation_masks``, boxes with ``draw_bounding_boxes``,
captions with PIL at a size that follows the image (readable at 128 px and at 2000 px). Semantic maps: a
colour overlay per class and a legend of the classes present. Panoptic results: every segment in its own
colour (stuff in its class colour, each thing instance a shade of its class colour), things outlined and
captioned with their score, and a legend of the classes present. Classifications: the top-5 classes and
their scores (small images, e.g. CIFAR's 32×32, enlarged first so the text fits). Images are read by the
one reader of the datasets (``resdet.data.image_io.read_image``: 16-bit, palette, grayscale and RGBA files as
training sees them).
"""
from __future__ import annotations

import collections
import colorsys
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from resdet.data.image_io import ImageReadError, image_to_tensor, read_image

__all__ = ["IMAGE_SUFFIXES", "draw_classification", "draw_predictions", "draw_semantic", "draw_panoptic",
           "is_classification", "list_images", "predict_files", "save_dataset_visualizations", "read_rgb",
           "semantic_class_names", "top_classes", "write_rgb", "mask_to_rle"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

logger = logging.getLogger("resdet")


def read_rgb(path: str | os.PathLike) -> Tensor:
    """Image file → uint8 ``Tensor[3, H, W]`` RGB, read as the datasets read it.

    Raises:
        ImageReadError: missing or undecodable file (the message names it).
    """
    return torch.from_numpy(read_image(os.fspath(path))).permute(2, 0, 1)  # HWC -> CHW


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


def semantic_class_names(names: Sequence[str], num_classes: int) -> list[str]:
    """Names of semantic classes ``0..num_classes-1``: the dataset's names when they cover every class,
    ``background`` first when they name the foreground classes only, else the class ids."""
    names = list(names)
    if len(names) == num_classes:
        return names
    if len(names) == num_classes - 1:
        return ["background", *names]
    return [str(k) for k in range(num_classes)]


def _font(height: int, width: int) -> tuple[ImageFont.ImageFont, int]:
    """A font whose size follows the image (about 2.5% of the short side, 8 to 48 px) and a line width."""
    size = int(min(48, max(8, round(0.025 * min(height, width)))))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    return font, max(1, round(min(height, width) / 400))


def _captions(img: Tensor, anchors: list[tuple[float, float]], texts: list[str],
              colors: list[tuple[int, int, int]]) -> Tensor:
    """Write ``texts`` on a filled background at the (x, y) ``anchors`` of uint8 ``img`` Tensor[3, H, W]."""
    if not texts:
        return img
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())  # CHW -> HWC
    draw = ImageDraw.Draw(pil)
    font, _ = _font(pil.height, pil.width)
    for (x, y), text, color in zip(anchors, texts, colors):
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        shift = min(0, pil.width - right)  # keep the caption inside the image
        draw.rectangle((left + shift, top, right + shift, bottom), fill=color)
        draw.text((x + shift, y), text, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)  # HWC -> CHW


def _to_uint8(image: Tensor) -> Tensor:
    img = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return img.cpu()


def is_classification(output: dict[str, Tensor]) -> bool:
    """Whether ``output`` is a classifier's (``scores`` over all classes, no boxes)."""
    return ("scores" in output and output["scores"].dim() == 1
            and not {"boxes", "sem_seg", "panoptic_seg"} & output.keys())


def top_classes(output: dict[str, Tensor], class_names: Sequence[str] = (), k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` best classes of a classifier's output: ``label`` (0-based), ``class`` and ``score``."""
    scores = output["scores"].float().cpu()
    top = scores.topk(min(k, scores.numel()))
    return [{"label": int(j), "class": class_names[j] if j < len(class_names) else str(int(j)),
             "score": round(float(s), 4)} for s, j in zip(top.values.tolist(), top.indices.tolist())]


def draw_classification(image: Tensor, output: dict[str, Tensor], *, class_names: Sequence[str] = ()) -> Tensor:
    """uint8 image ``Tensor[3, H, W]`` with its top-5 classes and scores written at the top left; images
    under 160 px on a side are enlarged (nearest neighbour, by a whole factor) so the text fits."""
    img = _to_uint8(image)
    factor = -(-160 // max(1, min(img.shape[1:])))
    if factor > 1:  # [3, H, W] -> [3, H * f, W * f]
        img = img.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    top = top_classes(output, class_names)
    font, _ = _font(img.shape[1], img.shape[2])
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())  # CHW -> HWC
    draw = ImageDraw.Draw(pil)
    line = draw.textbbox((0, 0), "Hg", font=font)[3] + 2
    for i, entry in enumerate(top):
        text = f"{entry['class']} {entry['score']:.2f}"
        box = draw.textbbox((2, 2 + i * line), text, font=font)
        draw.rectangle((0, box[1] - 1, box[2] + 2, box[3] + 1), fill=(255, 255, 255) if i == 0 else (0, 0, 0))
        draw.text((2, 2 + i * line), text, fill=(0, 0, 0) if i == 0 else (255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)  # HWC -> CHW


def draw_predictions(image: Tensor, output: dict[str, Tensor], *, class_names: Sequence[str] = (),
                     score_thresh: float = 0.5) -> Tensor:
    """Image ``Tensor[3, H, W]`` (float in [0, 1] or uint8) with boxes, ``label score`` captions and
    masks (thresholded at 0.5) of the detections scoring at least ``score_thresh``; returns uint8.
    Masks are ``masks`` (Tensor[D, 1, H, W] probabilities) or ``mask_rles`` (one COCO RLE per detection, as
    ``tools/infer.py`` keeps them for large images). A panoptic output (``panoptic_seg``) is drawn by
    :func:`draw_panoptic`, a semantic one (``sem_seg``) by :func:`draw_semantic` (``class_names`` index class
    ids), a classifier's by :func:`draw_classification` (``class_names`` index labels 0..K-1)."""
    img = _to_uint8(image)
    if "panoptic_seg" in output:
        return draw_panoptic(img, output["panoptic_seg"], output["segments_info"], class_names=class_names)
    if "sem_seg" in output:
        return draw_semantic(img, output["sem_seg"], class_names=class_names)
    if is_classification(output):
        return draw_classification(img, output, class_names=class_names)
    keep = output["scores"].cpu() >= score_thresh
    boxes = output["boxes"].cpu()[keep]
    labels = output["labels"].cpu()[keep].tolist()
    scores = output["scores"].cpu()[keep].tolist()
    palette = _colors(max(len(class_names), max(labels, default=0)) + 1)
    colors = [palette[lab] for lab in labels]
    if "masks" in output and len(labels):
        masks = output["masks"].cpu()[keep][:, 0] >= 0.5  # [N, 1, H, W] probabilities -> [N, H, W] bool
        img = draw_segmentation_masks(img, masks, alpha=0.45, colors=colors)
    elif "mask_rles" in output and len(labels):
        from .compact_masks import draw_rle_masks

        rles = [r for r, k in zip(output["mask_rles"], keep.tolist()) if k]
        img = draw_rle_masks(img, rles, colors, alpha=0.45)
    if len(labels):
        _, width = _font(img.shape[1], img.shape[2])
        img = draw_bounding_boxes(img, boxes, colors=colors, width=width)
        captions = [f"{_label_name(lab, class_names)} {s:.2f}" for lab, s in zip(labels, scores)]
        img = _captions(img, [(float(b[0]) + width, float(b[1]) + width) for b in boxes], captions, colors)
    return img


def draw_semantic(image: Tensor, sem_seg: Tensor, *, class_names: Sequence[str] = (), alpha: float = 0.5) -> Tensor:
    """uint8 image ``Tensor[3, H, W]`` with a colour per class of the map ``sem_seg`` Tensor[H, W] (class 0,
    the background, left uncoloured) and a legend of the classes present; returns uint8."""
    img = _to_uint8(image)
    sem = sem_seg.cpu()
    present = [int(k) for k in torch.unique(sem).tolist() if 0 <= k < 255]
    palette = _colors(max(len(class_names), max(present, default=0) + 1))
    shown = [k for k in present if k != 0]
    if shown:
        masks = torch.stack([sem == k for k in shown])  # [C, H, W] bool
        img = draw_segmentation_masks(img, masks, alpha=alpha, colors=[palette[k] for k in shown])
    names = [class_names[k] if k < len(class_names) else str(k) for k in present]
    return _legend(img, [(name, palette[k] if k else (128, 128, 128)) for k, name in zip(present, names)])


def _legend(img: Tensor, entries: list[tuple[str, tuple[int, int, int]]]) -> Tensor:
    """uint8 ``img`` Tensor[3, H, W] with a legend at the top left: a colour swatch and a name per entry."""
    if not entries:
        return img
    font, _ = _font(img.shape[1], img.shape[2])
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())  # CHW -> HWC
    draw = ImageDraw.Draw(pil)
    line = draw.textbbox((0, 0), "Hg", font=font)[3] + 2
    y = 2
    for name, color in entries:
        box = draw.textbbox((line + 4, y), name, font=font)
        draw.rectangle((0, y, box[2] + 2, y + line), fill=(0, 0, 0))
        draw.rectangle((2, y + 2, line - 2, y + line - 2), fill=color)
        draw.text((line + 4, y), name, fill=(255, 255, 255), font=font)
        y += line
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)  # HWC -> CHW


def _shade(color: tuple[int, int, int], k: int) -> tuple[int, int, int]:
    """The k-th instance's variant of a class colour: alternately lighter and darker, up to 45 %."""
    if k == 0:
        return color
    amount = 0.15 * ((k + 1) // 2 % 3 + 1)
    target = 255 if k % 2 else 0
    return tuple(int(round(c + (target - c) * amount)) for c in color)  # type: ignore[return-value]


def draw_panoptic(image: Tensor, panoptic_seg: Tensor, segments_info: Sequence[dict[str, Any]], *,
                  class_names: Sequence[str] = (), alpha: float = 0.55) -> Tensor:
    """uint8 image ``Tensor[3, H, W]`` with the segments of ``panoptic_seg`` (Tensor[H, W] segment ids, 0
    void, left uncoloured) each in its own colour: stuff in its class colour, thing instances in shades of
    theirs, outlined in white and captioned ``class score``; a legend lists the classes present.
    ``segments_info`` entries carry ``id``, ``category_id`` (a label: ``class_names[label - 1]``),
    ``isthing`` and, for things, ``score``."""
    img = _to_uint8(image)
    seg_map = panoptic_seg.cpu()
    segments = [s for s in segments_info if bool((seg_map == int(s["id"])).any())]
    if not segments:
        return img
    labels = sorted({int(s["category_id"]) for s in segments})
    palette = _colors(max(len(class_names), max(labels)) + 1)
    seen: dict[int, int] = {}
    colors = []
    for s in segments:
        label = int(s["category_id"])
        colors.append(_shade(palette[label], seen.get(label, 0)) if s.get("isthing") else palette[label])
        seen[label] = seen.get(label, 0) + 1
    masks = torch.stack([seg_map == int(s["id"]) for s in segments])  # [S, H, W] bool
    img = draw_segmentation_masks(img, masks, alpha=alpha, colors=colors)
    things = [i for i, s in enumerate(segments) if s.get("isthing")]
    if things:
        _, width = _font(img.shape[1], img.shape[2])
        inside = masks[things].float()[:, None]  # [T, 1, H, W]
        # A pixel of a thing whose (2 * width + 1)-neighbourhood leaves the thing is on its outline.
        eroded = -torch.nn.functional.max_pool2d(-inside, 2 * width + 1, stride=1, padding=width)
        outline = ((inside > 0) & (eroded == 0))[:, 0].any(dim=0)  # [H, W]
        img = img.clone()
        img[:, outline] = 255
        anchors, texts = [], []
        for i in things:
            ys, xs = torch.nonzero(masks[i], as_tuple=True)
            anchors.append((float(xs.min()) + width, float(ys.min()) + width))
            score = segments[i].get("score")
            name = _label_name(int(segments[i]["category_id"]), class_names)
            texts.append(name if score is None else f"{name} {float(score):.2f}")
        img = _captions(img, anchors, texts, [colors[i] for i in things])
    return _legend(img, [(_label_name(label, class_names), palette[label]) for label in labels])


def _count_drawn(output: dict[str, Any], score_thresh: float) -> int:
    if "panoptic_seg" in output:
        return len(output["segments_info"])
    if "sem_seg" in output:
        return int((output["sem_seg"] != 0).any())
    if is_classification(output):
        return int(output["scores"].max() >= score_thresh)
    return int((output["scores"] >= score_thresh).sum())


@torch.no_grad()
def save_dataset_visualizations(model: nn.Module, dataset, out_dir: str | os.PathLike, *, device: torch.device,
                                num_images: int, class_names: Sequence[str] = (),
                                score_thresh: float = 0.5) -> tuple[list[Path], int]:
    """Draw the predictions on the first ``num_images`` dataset images into ``out_dir``.

    Returns:
        (written files, number of predictions drawn over all of them: detections at ``score_thresh`` or
        more; for semantic maps, images with any non-background pixel).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    paths, drawn = [], 0
    for i in range(min(num_images, len(dataset))):
        image, target = dataset[i]
        output = {k: _cpu(v) for k, v in model([image.to(device)])[0].items()}
        drawn += _count_drawn(output, score_thresh)
        picture = draw_predictions(image, output, class_names=class_names, score_thresh=score_thresh)
        path = out_dir / f"pred_{int(target.get('image_id', i)):06d}.png"
        write_rgb(picture, path)
        paths.append(path)
    model.train(was_training)
    return paths, drawn


def list_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """Image files among ``inputs`` (files, or folders searched non-recursively, sorted).

    Returns:
        (image files, skipped files: those in folders without an image suffix).

    Raises:
        FileNotFoundError: an input does not exist, or no image file was found at all.
    """
    files: list[Path] = []
    skipped: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.is_file():
                    (files if f.suffix.lower() in IMAGE_SUFFIXES else skipped).append(f)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {str(p)!r} is neither an image file nor a folder")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {list(map(str, inputs))}")
    return files, skipped


def mask_to_rle(mask: Tensor) -> dict[str, Any]:
    """Binary mask Tensor[H, W] → COCO RLE ``{"size": [H, W], "counts": str}`` (as COCO results hold)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _output_names(files: Sequence[Path]) -> list[str]:
    """One drawing name per input file: ``<stem>.png``; ``<stem>_<suffix>.png`` where two inputs share a stem
    (``000000.jpg`` and ``000000.png``), then ``_2``, ``_3`` for whatever still collides."""
    stems = collections.Counter(f.stem for f in files)
    names, used = [], set()
    for f in files:
        base = f.stem if stems[f.stem] == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower()}"
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name + ".png")
    return names


@contextlib.contextmanager
def _compact_masks(model: nn.Module) -> Iterator[bool]:
    """While inside, a resdet detector returns its masks compact (``transform.paste_masks = False``);
    yields whether it does."""
    transform = getattr(model, "transform", None)
    if not isinstance(getattr(transform, "paste_masks", None), bool):
        yield False
        return
    before = transform.paste_masks
    transform.paste_masks = False
    try:
        yield True
    finally:
        transform.paste_masks = before


def _cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, Tensor) else value


def _result_entry(path: Path, output: dict[str, Any], class_names: Sequence[str], score_thresh: float,
                  label_to_cat_id: dict[int, int] | None = None) -> dict:
    if "panoptic_seg" in output:
        seg_map = output["panoptic_seg"]
        segments = []
        for s in output["segments_info"]:
            label = int(s["category_id"])
            entry = {"id": int(s["id"]), "label": label,
                     "category_id": label_to_cat_id.get(label) if label_to_cat_id else label,
                     "class": _label_name(label, class_names), "isthing": bool(s.get("isthing")),
                     "area": int(s.get("area", int((seg_map == s["id"]).sum())))}
            if s.get("score") is not None:
                entry["score"] = round(float(s["score"]), 4)
            entry["segmentation"] = mask_to_rle(seg_map == int(s["id"]))
            segments.append(entry)
        return {"file": str(path), "size": list(seg_map.shape), "segments": segments}
    if "sem_seg" in output:
        sem = output["sem_seg"]
        ids, counts = torch.unique(sem, return_counts=True)
        fractions = {(class_names[k] if k < len(class_names) else str(k)): round(int(n) / sem.numel(), 5)
                     for k, n in zip(ids.tolist(), counts.tolist()) if k != 255}
        return {"file": str(path), "size": list(sem.shape), "class_fractions": fractions}
    if is_classification(output):
        return {"file": str(path), "top5": top_classes(output, class_names)}
    keep = output["scores"] >= score_thresh
    dets = []
    for j in torch.nonzero(keep).flatten().tolist():
        label = int(output["labels"][j])
        det = {"box": [round(float(v), 2) for v in output["boxes"][j]], "label": label,
               "category_id": label_to_cat_id.get(label) if label_to_cat_id else label,
               "class": _label_name(label, class_names), "score": round(float(output["scores"][j]), 4)}
        if "masks" in output:
            det["segmentation"] = mask_to_rle(output["masks"][j, 0] >= 0.5)
        elif "mask_rles" in output:
            det["segmentation"] = output["mask_rles"][j]
        dets.append(det)
    return {"file": str(path), "detections": dets}


@torch.no_grad()
def predict_files(model: nn.Module, files: Sequence[Path], out_dir: str | os.PathLike, *, device: torch.device,
                  class_names: Sequence[str] = (), score_thresh: float = 0.5,
                  label_to_cat_id: dict[int, int] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Run ``model`` on image files; write one drawing per file (``<stem>.png``, ``<stem>_<suffix>.png`` when
    two files share a stem) and ``detections.json``.

    A resdet detector's masks stay compact (over their boxes) and become RLE one at a time, so an image of
    H × W pixels never needs D × H × W floats (:mod:`resdet.engine.compact_masks`).

    Args:
        class_names: detectors and panoptic models: label k is ``class_names[k - 1]``; semantic models and
            classifiers: one name per class id.
        label_to_cat_id: the model's label space (label → dataset category id); None: labels are the ids.

    Returns:
        (one dict per image: ``file``, ``output`` (the drawing) and ``detections`` — ``box`` xyxy, ``label``,
        ``category_id``, ``class``, ``score`` and for masks ``segmentation`` as COCO RLE — of those scoring at
        least ``score_thresh``; for semantic models ``class_fractions`` instead, the share of pixels per class;
        for panoptic models ``segments`` — ``id``, ``label``, ``category_id``, ``class``, ``isthing``, ``area``,
        ``score`` (things) and ``segmentation`` RLE;
        for classifiers ``top5``, the five best classes with ``label``, ``class`` and ``score``;
        the files that could not be decoded, each as ``"path: reason"``, skipped).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    results, failed = [], []
    with _compact_masks(model) as compact:
        for f, name in zip(files, _output_names(files)):
            try:
                array = read_image(os.fspath(f))
            except ImageReadError as err:
                failed.append(str(err))
                logger.warning("skipped: %s", err)
                continue
            image = torch.from_numpy(array).permute(2, 0, 1)  # HWC -> CHW uint8
            output = model([image_to_tensor(array).to(device)])[0]
            output = {k: _cpu(v) for k, v in output.items()}
            if compact and "masks" in output:
                from .compact_masks import masks_to_rles

                keep = output["scores"] >= score_thresh  # only drawn detections need their masks
                output = {k: v[keep] for k, v in output.items()}
                output["mask_rles"] = masks_to_rles(output.pop("masks"), output["boxes"], image.shape[-2:])
            write_rgb(draw_predictions(image, output, class_names=class_names, score_thresh=score_thresh),
                      out_dir / name)
            entry = _result_entry(f, output, class_names, score_thresh, label_to_cat_id)
            results.append({"file": entry.pop("file"), "output": str(out_dir / name), **entry})
    with open(out_dir / "detections.json", "w") as fh:
        json.dump(results, fh, indent=1)
    return results, failed
