"""Deployment: export resdet models to ONNX and TorchScript and run them (``tools/export.py``).

``to_onnx(model, "model.onnx")`` / ``to_torchscript(model, "model.pt")`` write a model of one image
``image`` float Tensor[3, H, W] in [0, 1] (any H×W) returning ``boxes``, ``labels``, ``scores``
(+ ``masks``) or ``sem_seg`` in original image pixels, then run the file on an image and print its
largest difference to the PyTorch model. :class:`OnnxPredictor` runs an ONNX file with onnxruntime
behind the PyTorch model's interface. onnx / onnxruntime come with ``pip install -e ".[export]"``.
"""
from .exporters import (
    DEFAULT_OPSET,
    CheckReport,
    ExportError,
    OneImageModel,
    check_opset,
    check_outputs,
    example_image,
    exportable,
    to_onnx,
    to_torchscript,
)
from .runtime import OnnxPredictor, TorchScriptPredictor

__all__ = [
    "DEFAULT_OPSET",
    "CheckReport",
    "ExportError",
    "OneImageModel",
    "OnnxPredictor",
    "TorchScriptPredictor",
    "check_opset",
    "check_outputs",
    "example_image",
    "exportable",
    "to_onnx",
    "to_torchscript",
]
