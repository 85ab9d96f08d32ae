"""Latency of a model exported to ONNX, in onnxruntime, against resdet (and torchvision) in PyTorch
(``tools/benchmark.py --onnx``)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .harness import build_pair, interleaved_times

__all__ = ["LatencyRow", "bench_onnxruntime", "format_latency_rows"]


@dataclass
class LatencyRow:
    """Median latency of one runner on one image (ms) and its ratio to resdet in PyTorch."""

    runner: str
    ms: float
    ratio: float
    detections: int


def bench_onnxruntime(
    arch: str = "mask",
    depth: str = "resnet34",
    *,
    size: tuple[int, int] = (800, 1066),
    iters: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    torchvision: bool = True,
    settings: dict | None = None,
) -> list[LatencyRow]:
    """Latency of the ONNX export in onnxruntime against resdet in PyTorch (and torchvision), one process.

    All runners get the same weights (:func:`.harness.build_pair`: torchvision's random init,
    box score threshold 0 so there are 100 detections and the mask branch works as on a trained model)
    and the same image; the model's ``min_size`` is the image's short side. resdet in PyTorch runs
    ``optimize_for_inference()``; the ONNX file is exported with BatchNorm folded.

    Returns:
        Rows ``resdet pytorch``, ``resdet onnxruntime`` (+ ``torchvision pytorch``), ratios to the first.
    """
    from resdet.export import OnnxPredictor, example_image, to_onnx

    h, w = size
    settings = dict(settings or {})
    settings.setdefault("min_size", min(h, w))
    settings.setdefault("max_size", max(1333, max(h, w)))
    rd, tv = build_pair(arch, depth, **settings)
    image = example_image(h, w)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        to_onnx(rd, path, optimize=True, example=image, check=False)
        session = OnnxPredictor(path, threads=threads)
    rd = rd.optimize_for_inference()
    array = image.numpy()

    def torch_run(model: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return model([image])
        return run

    names = ["resdet pytorch", "resdet onnxruntime"] + (["torchvision pytorch"] if torchvision else [])
    fns = [torch_run(rd), lambda: session.run(array)] + ([torch_run(tv.eval())] if torchvision else [])
    counts = [len(torch_run(rd)()[0]["boxes"]), len(session.run(array)[0])]
    if torchvision:
        counts.append(len(torch_run(tv)()[0]["boxes"]))
    times = interleaved_times(fns, iters, warmup, torch.device("cpu"))
    return [LatencyRow(n, t * 1e3, t / times[0], c) for n, t, c in zip(names, times, counts)]


def format_latency_rows(rows: list[LatencyRow], title: str = "") -> str:
    """Fixed-width table of :func:`bench_onnxruntime` rows."""
    lines = [title] if title else []
    lines.append(f"{'runner':<22} {'ms':>9} {'ratio':>7} {'detections':>11}")
    lines += [f"{r.runner:<22} {r.ms:>9.1f} {r.ratio:>7.3f} {r.detections:>11}" for r in rows]
    return "\n".join(lines)
