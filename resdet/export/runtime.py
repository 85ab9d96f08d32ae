"""Run exported models (onnxruntime, TorchScript) like the PyTorch model (timing them: ``tools/benchmark.py --onnx``).

:class:`OnnxPredictor` and :class:`TorchScriptPredictor` answer ``predictor([image])`` with
``[{"boxes", "labels", "scores"(, "masks")}]`` or ``[{"sem_seg"}]``, as a resdet model in eval mode
does, so drawing and inference code takes either (``tools/infer.py --onnx``).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["OnnxPredictor", "TorchScriptPredictor", "infer_images_onnx"]


class _Predictor:
    """Shared model-like interface: ``eval()``, ``predictor(list of images) -> list of dicts``."""

    output_names: list[str]

    def predict(self, image: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def eval(self) -> _Predictor:
        return self

    def __call__(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        if isinstance(images, Tensor):
            raise ValueError("pass a list of images Tensor[3, H, W], as to the PyTorch model")
        return [self.predict(image) for image in images]

    @staticmethod
    def _check(image: Tensor) -> None:
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"expected a float image Tensor[3, H, W] in [0, 1], got {image.dtype} {tuple(image.shape)}"
            )


class OnnxPredictor(_Predictor):
    """An exported ``.onnx`` model in an onnxruntime session.

    Args:
        path: the ``.onnx`` file written by :func:`resdet.export.to_onnx`.
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads (default: onnxruntime's).
    """

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"ONNX model {self.path!r} does not exist")
        try:
            self.session = ort.InferenceSession(self.path, options, providers=list(providers))
        except Exception as err:  # noqa: BLE001 - onnxruntime's own error types (InvalidProtobuf, Fail, ...)
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{self.path!r} is not an ONNX model onnxruntime can load ({detail}); give a file "
                             f"written by tools/export.py --format onnx") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, image: np.ndarray) -> list[np.ndarray]:
        """Raw session run on a float32 array [3, H, W]; outputs in ``output_names`` order."""
        return self.session.run(None, {"image": image})

    def predict(self, image: Tensor) -> dict[str, Tensor]:
        """Outputs for one image Tensor[3, H, W] in [0, 1], as torch tensors by name."""
        self._check(image)
        outputs = self.run(image.detach().cpu().float().contiguous().numpy())
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}


class TorchScriptPredictor(_Predictor):
    """A TorchScript file written by :func:`resdet.export.to_torchscript`, loaded with ``torch.jit.load``."""

    def __init__(self, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> None:
        extra = {"output_names": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            self.module = torch.jit.load(os.fspath(path), map_location=map_location, _extra_files=extra)
        names = extra["output_names"]
        self.output_names = (names.decode() if isinstance(names, bytes) else str(names)).split(",")

    def predict(self, image: Tensor) -> dict[str, Tensor]:
        self._check(image)
        with torch.no_grad():
            outputs = self.module(image)
        return dict(zip(self.output_names, outputs))


def infer_images_onnx(path: str | os.PathLike, inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
                      *, score_thresh: float | None = None) -> dict:
    """``tools/infer.py --onnx``: an exported model's predictions drawn on image files/folders into
    ``output_dir`` with ``detections.json``, as :func:`resdet.engine.inference.infer_images` does for a
    checkpoint (class names from the file's ``class_names`` metadata; ``score_thresh`` default 0.5).

    Returns:
        ``results``, ``skipped`` (not images by suffix) and ``failed`` (undecodable), as ``infer_images``.
    """
    import json
    from pathlib import Path

    from resdet.engine.visualize import list_images, predict_files

    predictor = OnnxPredictor(path)
    class_names = json.loads(predictor.metadata.get("class_names", "[]"))
    files, skipped = list_images(inputs)
    thresh = 0.5 if score_thresh is None else score_thresh
    results, failed = predict_files(predictor, files, Path(output_dir), device=torch.device("cpu"),
                                    class_names=class_names, score_thresh=thresh)
    return {"results": results, "skipped": [str(p) for p in skipped], "failed": failed}
