"""Installs resdet under one import name.

``backbones/`` and ``heads/`` live at the repository top level but install as ``resdet.backbones`` and
``resdet.heads`` (``package_dir``), so nothing shadows a user's own ``backbones`` module.
"""
from setuptools import find_packages, setup

_top_level = {"backbones": "resdet.backbones", "heads": "resdet.heads"}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = [p for p in find_packages(include=["resdet", "resdet.*"])]
    package_dir = {"resdet": "resdet"}
    for folder, name in _top_level.items():
        package_dir[name] = folder
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    # Configs ship as package data under resdet/configs.
    package_dir["resdet.configs"] = "configs"
    packages.append("resdet.configs")
    return packages, package_dir


packages, package_dir = _packages()

setup(
    name="resdet",
    version="0.1.0",
    description="ResNet-backbone detection and segmentation (Faster/Mask R-CNN, semantic and Panoptic FPN) for PyTorch",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"resdet.configs": ["*.yaml", "**/*.yaml"]},
    include_package_data=True,
    # Lower bounds are versions the test suite has run on (albumentations 2.0.2: .ci/run tests it).
    install_requires=[
        "torch>=2.14",
        "torchvision>=0.29",
        "timm>=1.0.31",
        "pycocotools>=2.0.11",
        "albumentations>=2.0.2",
        "pyyaml>=6.0.4",
        "tqdm>=4.70",
    ],
    extras_require={
        # Deployment (resdet.export, tools/export.py): ONNX files checked with onnxruntime.
        "export": ["onnx>=1.23", "onnxruntime>=1.32"],
        # tools/semantic_peer.py only: segmentation_models_pytorch, the peer the semantic models are compared with.
        "peer": ["segmentation-models-pytorch>=0.6"],
        # The test extra includes the export extra so CI runs tests/test_export.py, and the linter .ci/run runs
        # (one minor version: a newer ruff may add checks to the rule families .ruff.toml selects).
        # cityscapesscripts: the reference PQ evaluation and panoptic converter the tests compare with.
        "test": ["pytest>=9.2", "onnx>=1.23", "onnxruntime>=1.32", "ruff>=0.17.6,<0.18", "cityscapesscripts>=2.3"],
    },
)
