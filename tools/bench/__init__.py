"""The benchmark harness behind ``tools/benchmark.py``: resdet against torchvision (:mod:`.harness`), the ONNX
export in onnxruntime (:mod:`.onnx_runtime`), and the re-tuning of the fast-path thresholds (:mod:`.tune`),
the main job's training step against torchvision's same model (:mod:`.main_job`).

Not part of the installed library: ``tools/benchmark.py`` imports it from next to itself.
"""
