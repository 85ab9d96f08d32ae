"""The benchmark harness behind ``tools/benchmark.py``: resdet against torchvision (:mod:`.harness`), the ONNX
export in onnxruntime (:mod:`.onnx_runtime`), and the re-tuning of the fast-path thresholds (:mod:`.tune`).

Not part of the installed library: ``tools/benchmark.py`` imports it from next to itself.
"""
