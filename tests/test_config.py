"""Config: dataclass defaults, YAML overrides with one _base_ level, key=value edits, and errors that
name the key and suggest the closest valid one."""
from __future__ import annotations

import glob
import os

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
