"""A synthetic CIFAR-10 stand-in, written in the real CIFAR-10 layout (:func:`resdet.data.cifar.write_cifar`).

CIFAR itself cannot be downloaded here, so the demo run and the tests train on this: ten classes of
32×32 images that differ by *shape* only — filled circle, ring, filled square, square frame, triangle,
plus, X, diamond, horizontal bars, vertical bars — each drawn in a random colour, size, position and
small rotation on a random textured background. Colour says nothing about the class, so a network has to
learn the outlines (the task has learnable structure, unlike random pixels); thin distractor strokes and
pixel noise keep it from being trivial. Drawn with OpenCV at 4× the
size and area-downsampled, from one seeded generator: a seed always gives the same files.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from .cifar import write_cifar

__all__ = ["SYNTHETIC_CLASSES", "draw_synthetic", "write_synthetic_cifar10"]

SYNTHETIC_CLASSES = ("circle", "ring", "square", "frame", "triangle", "plus", "cross", "diamond", "hbars", "vbars")
_SCALE = 4  # drawing supersampling
_SIDE = 32 * _SCALE


def _polygon(points: np.ndarray, center: np.ndarray, size: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return (points @ np.array([[c, -s], [s, c]]).T * size + center).round().astype(np.int32)


def _draw_shape(canvas: np.ndarray, kind: str, rng: np.random.Generator, colour: tuple[float, ...]) -> None:
    size = rng.uniform(0.35, 0.8) * _SIDE
    center = _SIDE / 2 + rng.uniform(-0.12, 0.12, size=2) * _SIDE
    angle = np.deg2rad(rng.uniform(-15, 15))
    thick = max(_SCALE * 2, int(size * rng.uniform(0.12, 0.18)))
    square = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if kind in ("circle", "ring"):
        cv2.circle(canvas, tuple(center.round().astype(int)), int(size / 2), colour,
                   -1 if kind == "circle" else thick, cv2.LINE_AA)
    elif kind in ("square", "frame"):
        pts = _polygon(square * 0.85, center, size, angle)
        if kind == "square":
            cv2.fillPoly(canvas, [pts], colour, cv2.LINE_AA)
        else:
            cv2.polylines(canvas, [pts], True, colour, thick, cv2.LINE_AA)
    elif kind == "triangle":
        t = np.deg2rad([90, 210, 330])
        cv2.fillPoly(canvas, [_polygon(np.stack([np.cos(t), -np.sin(t)], 1) * 0.55, center, size, angle)], colour,
                     cv2.LINE_AA)
    elif kind in ("plus", "cross"):
        turn = angle + (np.pi / 4 if kind == "cross" else 0.0)
        for arm in (0.0, np.pi / 2):
            end = np.array([np.cos(turn + arm), np.sin(turn + arm)]) * size / 2
            cv2.line(canvas, tuple((center - end).round().astype(int)), tuple((center + end).round().astype(int)),
                     colour, thick, cv2.LINE_AA)
    elif kind == "diamond":
        cv2.fillPoly(canvas, [_polygon(square * 0.75, center, size, angle + np.pi / 4)], colour, cv2.LINE_AA)
    elif kind in ("hbars", "vbars"):
        turn = angle + (np.pi / 2 if kind == "vbars" else 0.0)
        along = np.array([np.cos(turn), np.sin(turn)])
        across = np.array([-along[1], along[0]])
        for offset in (-0.3, 0.0, 0.3):
            mid = center + across * offset * size
            cv2.line(canvas, tuple((mid - along * size / 2).round().astype(int)),
                     tuple((mid + along * size / 2).round().astype(int)), colour, max(_SCALE, thick // 2), cv2.LINE_AA)
    else:
        raise ValueError(f"unknown class {kind!r}, expected one of {SYNTHETIC_CLASSES}")


def draw_synthetic(label: int, rng: np.random.Generator) -> np.ndarray:
    """One 32×32 RGB uint8 image of class ``label`` (an index of :data:`SYNTHETIC_CLASSES`)."""
    base = rng.uniform(30, 225, size=3)
    tilt = rng.uniform(-40, 40, size=(2, 3))
    ys, xs = np.mgrid[0:_SIDE, 0:_SIDE].astype(np.float32) / _SIDE
    canvas = base + ys[..., None] * tilt[0] + xs[..., None] * tilt[1]
    blotches = rng.normal(0, 20, size=(4, 4, 3)).astype(np.float32)
    canvas = (canvas + cv2.resize(blotches, (_SIDE, _SIDE), interpolation=cv2.INTER_CUBIC)).astype(np.float32)
    for _ in range(int(rng.integers(0, 3))):  # thin distractor strokes of any colour and direction
        p1, p2 = rng.integers(0, _SIDE, size=(2, 2))
        cv2.line(canvas, tuple(int(v) for v in p1), tuple(int(v) for v in p2),
                 tuple(float(c) for c in rng.uniform(0, 255, size=3)), _SCALE, cv2.LINE_AA)
    colour = rng.uniform(0, 255, size=3)
    while abs(float(colour.mean() - base.mean())) < 35:  # keep the shape visible against the background
        colour = rng.uniform(0, 255, size=3)
    _draw_shape(canvas, SYNTHETIC_CLASSES[label], rng, tuple(float(c) for c in colour))
    canvas += rng.normal(0, 10, size=canvas.shape)
    small = cv2.resize(np.clip(canvas, 0, 255).astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    return np.clip(small + 0.5, 0, 255).astype(np.uint8)


def write_synthetic_cifar10(root: str | os.PathLike, *, num_train: int = 5000, num_test: int = 1000,
                            seed: int = 0) -> str:
    """Draw ``num_train`` + ``num_test`` images (classes balanced, shuffled) and write them under
    ``root/cifar-10-batches-py`` in the real CIFAR-10 layout; returns that folder."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % len(SYNTHETIC_CLASSES))
        images = np.stack([draw_synthetic(int(k), rng) for k in labels]) if n else np.zeros((0, 32, 32, 3), np.uint8)
        return images, labels

    train, test = split(num_train), split(num_test)
    return write_cifar(root, train=train, test=test, class_names=SYNTHETIC_CLASSES)
