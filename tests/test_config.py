"""Config: dataclass defaults, YAML overrides with one _base_ level, key=value edits, and errors that
name the key and suggest the closest valid one."""
from __future__ import annotations

import ast
import glob
import os
import pathlib
import subprocess
import sys

import pytest

from resdet.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    resolve_config_path,
    save_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECTION_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "coco", "*_rcnn_*.yaml"))
                           + glob.glob(os.path.join(REPO, "configs", "voc", "*_rcnn_*.yaml"))
                           + glob.glob(os.path.join(REPO, "configs", "shapes", "mask_rcnn_*.yaml")))


def test_defaults_and_overrides():
    cfg = load_config(None, ["solver.lr=0.005", "solver.steps=[10, 20]", "model.min_size=[600, 800]",
                             "train.amp=bf16", "model.norm=gn", "solver.clip_grad_norm=None", "data.shapes.seed=3"])
    assert cfg.solver.lr == 0.005 and cfg.solver.steps == [10, 20]
    assert cfg.model.min_size == [600, 800] and cfg.train.amp == "bf16" and cfg.model.norm == "gn"
    assert cfg.solver.clip_grad_norm is None and cfg.data.shapes.seed == 3
    assert Config().solver.lr == 0.02  # defaults untouched
    assert apply_overrides(Config(), ["solver.lr=1"]).solver.lr == 1.0  # int accepted for float


@pytest.mark.parametrize("override, message", [
    ("solver.lrr=0.1", "unknown config key 'solver.lrr'; did you mean 'solver.lr'?"),
    ("model.backbon=resnet18", "did you mean 'model.backbone'?"),
    ("data.shapes.num_trian=3", "did you mean 'data.shapes.num_train'?"),
    ("sovler.lr=0.1", "did you mean 'solver.lr'?"),
    ("solver.max_iter=1.5", "solver.max_iter: expected an integer, got 1.5"),
    ("solver.lr=fast", "solver.lr: expected a number, got 'fast'"),
    ("train.amp=fp8", "train.amp: 'fp8' is not one of"),
    ("model.arch=mask_rnn", "did you mean 'mask_rcnn'?"),
    ("solver.steps=5", "solver.steps: expected a list"),
    ("train.progress_bar=maybe", "expected true/false"),
    ("solver.lr", "not of the form key=value"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [override])
    assert message in str(err.value)


def test_yaml_file_base_and_errors(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {backbone: resnet18, num_classes: 3}\nsolver: {lr: 0.1}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nsolver: {max_iter: 7}\n")
    cfg = load_config(tmp_path / "child.yaml", ["solver.lr=0.2"])
    assert (cfg.model.backbone, cfg.model.num_classes, cfg.solver.max_iter, cfg.solver.lr) == ("resnet18", 3, 7, 0.2)

    (tmp_path / "grandchild.yaml").write_text("_base_: child.yaml\n")
    with pytest.raises(ConfigError, match="one level only"):
        load_config(tmp_path / "grandchild.yaml")
    (tmp_path / "typo.yaml").write_text("solver: {warmup_iter: 10}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'solver.warmup_iter'; did you mean "
                                          r"'solver.warmup_iters'\?"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.options={fpn_out_channels: 64}", "solver.steps=[1]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_from_dict({"solver": {"lr": 0.3}}).solver.lr == 0.3


@pytest.mark.parametrize("path", DETECTION_CONFIGS, ids=os.path.basename)
def test_shipped_detection_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.arch in ("faster_rcnn", "mask_rcnn")
    if cfg.model.arch == "faster_rcnn":
        assert cfg.eval.iou_types == ["bbox"]


def test_configs_found_in_package():
    packaged = resolve_config_path("configs/shapes/mask_rcnn_r34_fpn.yaml")
    assert packaged.is_file()
    cwd = os.getcwd()
    try:
        os.chdir("/")  # not relative to the repository: found as package data resdet.configs
        assert resolve_config_path("configs/coco/mask_rcnn_r50_fpn_1x.yaml").is_file()
        assert load_config("shapes/mask_rcnn_r34_fpn.yaml").model.backbone == "resnet34"
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("override, message", [
    ("solver.max_iter=-3", "solver.max_iter: expected a value >= 1, got -3"),
    ("solver.max_iter=0", "solver.max_iter: expected a value >= 1, got 0"),
    ("data.batch_size=0", "data.batch_size: expected a value >= 1, got 0"),
    ("data.test_batch_size=0", "data.test_batch_size: expected a value >= 1"),
    ("solver.accumulate=0", "solver.accumulate: expected a value >= 1"),
    ("train.log_period=0", "train.log_period: expected a value >= 1"),
    ("data.num_workers=-1", "data.num_workers: expected a value >= 0"),
    ("solver.lr=-0.1", "solver.lr: expected a value >= 0"),
    ("eval.max_images=0", "eval.max_images: expected a value >= 1"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_numbers_written_as_yaml_reads_them(tmp_path):
    """``1e-4`` is a string to PyYAML (YAML 1.1) and a year may be written as a number."""
    cfg = load_config(None, ["solver.lr=1e-4", "solver.weight_decay=5E-5", "data.years=[2012]"])
    assert cfg.solver.lr == 1e-4 and cfg.solver.weight_decay == 5e-5 and cfg.data.years == ["2012"]
    (tmp_path / "c.yaml").write_text("solver: {lr: 2.5e-4, clip_grad_norm: 1e+1}\ndata: {years: [2007, '2012']}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.solver.lr, cfg.solver.clip_grad_norm, cfg.data.years) == (2.5e-4, 10.0, ["2007", "2012"])
    assert load_config(None, ["train.output_dir=1e3"]).train.output_dir == "1e3"  # text keys keep their text
    with pytest.raises(ConfigError, match=r"data.years\[0\]: expected a string, got 2012.5"):
        load_config(None, ["data.years=[2012.5]"])


SHAPES = os.path.join(REPO, "configs", "shapes", "mask_rcnn_r34_fpn.yaml")
SHAPES_SEMANTIC = os.path.join(REPO, "configs", "shapes", "semantic_fpn_r34.yaml")


def test_model_options_dotted_and_checked_against_the_builder():
    cfg = load_config(SHAPES, ["model.options.fpn_out_channels=64", "model.options.smooth_l1_beta=1"])
    assert cfg.model.options["fpn_out_channels"] == 64 and cfg.model.options["mask_layers"] == [128] * 4
    assert cfg.model.options["smooth_l1_beta"] == 1.0 and isinstance(cfg.model.options["smooth_l1_beta"], float)
    cases = [
        (["model.options.mask_layer=[8]"],
         "unknown config key 'model.options.mask_layer' for model.arch='mask_rcnn'; did you mean "
         "'model.options.mask_layers'?"),
        (["model.options.fpn_out_channels=wide"], "model.options.fpn_out_channels: expected an integer, got 'wide'"),
        (["model.options.backbone=resnet18"], "model.options.backbone: set model.backbone instead"),
        # the shapes Mask R-CNN options do not fit a Faster R-CNN: an error naming the option and the arch
        (["model.arch=faster_rcnn"],
         "model.options.mask_layers: model.arch='faster_rcnn' has no option 'mask_layers' (it is an option "
         "of mask_rcnn, panoptic_fpn)"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            load_config(SHAPES, overrides)
        assert message in str(err.value)
    # replacing the options as a whole makes the switch
    cfg = load_config(SHAPES, ["model.arch=faster_rcnn", "model.options={fpn_out_channels: 128}"])
    assert cfg.model.arch == "faster_rcnn" and cfg.model.options == {"fpn_out_channels": 128}


def test_one_option_name_across_models():
    """The semantic FPN's FPN width and backbone weights carry the detectors' names; the old ones say so."""
    from resdet.models import arch_options, semantic_fpn

    for arch in ("faster_rcnn", "mask_rcnn", "semantic_fpn"):
        assert {"fpn_out_channels", "fpn_norm", "weights", "norm", "frozen_stages"} <= set(arch_options(arch))
    cfg = load_config(SHAPES_SEMANTIC, ["model.options.fpn_out_channels=128"])
    assert cfg.model.options["fpn_out_channels"] == 128
    with pytest.raises(ConfigError, match="model.options.fpn_channels: renamed to 'model.options.fpn_out_channels'"):
        load_config(SHAPES_SEMANTIC, ["model.options.fpn_channels=128"])
    with pytest.raises(TypeError, match="'fpn_channels' is now called 'fpn_out_channels'"):
        semantic_fpn("resnet18", fpn_channels=32)


def test_registered_arch_is_buildable_from_a_config(monkeypatch):
    import torch

    from resdet.models import build_model, registry

    def tiny(backbone: str = "resnet18", num_classes: int = 3, *, width: int = 4, min_size: int = 1) -> torch.nn.Module:
        return torch.nn.Conv2d(3, width, 1)

    monkeypatch.setitem(registry._ARCHS, "tiny", tiny)
    monkeypatch.setitem(registry._EXTENDS, "tiny", ())
    monkeypatch.setitem(registry._RENAMED, "tiny", {})
    cfg = load_config(None, ["model.arch=tiny", "model.options.width=6"])
    assert build_model(cfg).out_channels == 6
    with pytest.raises(ConfigError, match="did you mean 'model.options.width'"):
        load_config(None, ["model.arch=tiny", "model.options.widht=6"])


def test_build_model_moved_to_the_registry():
    with pytest.raises(ImportError, match="resdet.models.build_model"):
        from resdet.config import build_model  # noqa: F401


def test_config_layer_imports_no_model_code():
    """resdet/config/ reads and checks configs; the model registry adds its own check (model.arch, model.options)."""
    for path in pathlib.Path(REPO, "resdet", "config").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[:2] in (["resdet", "models"], ["resdet", "heads"], ["resdet", "backbones"])
                           or n.split(".")[0] in ("torch", "torchvision") for n in names), (path.name, names)


def test_a_config_loaded_without_importing_models_is_checked_against_the_registry():
    """The registry's check reaches every load_config, also where the caller never imports resdet.models."""
    code = ("from resdet.config import ConfigError, load_config\n"
            "try:\n    load_config(None, ['model.arch=mask_rcn'])\nexcept ConfigError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("model.arch: 'mask_rcn' is not one of") and "did you mean 'mask_rcnn'" in out
