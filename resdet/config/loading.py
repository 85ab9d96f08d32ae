"""Config loading: YAML files with one ``_base_`` level, ``key=value`` overrides, packaged configs.

A config file holds only the values that differ from the defaults in :mod:`resdet.config.schema`::

    _base_: ../base/mask_rcnn_r50_fpn.yaml     # optional, at most one level
    model: {backbone: resnet34, num_classes: 81}
    solver: {lr: 0.02, max_iter: 90000, steps: [60000, 80000]}

Command-line overrides use dotted keys and YAML scalars/lists: ``solver.lr=0.01 solver.steps=[100,200]
model.options.fpn_out_channels=128``. Every public function here ends with
:func:`~resdet.config.schema.validate_config`.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import os
from pathlib import Path
from typing import Any

import yaml

from .schema import Config, ConfigError, set_key, validate_config

__all__ = [
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "save_config",
    "resolve_config_path",
]


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _apply_dict(cfg: Config, data: dict[str, Any]) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at top level, got {type(data).__name__}")
    for key, value in data.items():
        set_key(cfg, str(key), value)
    return cfg


def config_from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Return a new config: ``base`` (default: the dataclass defaults) with a nested dict of overrides."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    return validate_config(_apply_dict(cfg, data))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse {raw!r} as YAML ({err})") from None
    if value == "None":  # Python spelling; YAML's null/~ already parse to None
        value = None
    return key.strip(), value


def _apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    for text in overrides:
        key, value = _parse_override(text)
        set_key(cfg, key, value)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``key=value`` strings (values parsed as YAML) in place and return ``cfg``."""
    return validate_config(_apply_overrides(cfg, overrides))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """Find a config by file path, or else among the configs shipped in the ``resdet.configs`` package."""
    p = Path(path)
    if p.is_file():
        return p
    rel = Path(*p.parts[1:]) if p.parts and p.parts[0] == "configs" else p
    try:
        packaged = Path(str(importlib.resources.files("resdet.configs").joinpath(str(rel))))
    except ModuleNotFoundError:
        packaged = None
    if packaged is not None and packaged.is_file():
        return packaged
    raise ConfigError(f"config file {str(path)!r} not found (as a path or under resdet.configs)")


def _read_file(path: Path) -> dict[str, Any]:
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← ``_base_`` file ← ``path`` ← ``overrides``, then checked as a whole.

    Args:
        path: YAML file (a path, or one relative to the packaged configs); None for the defaults.
        overrides: ``key=value`` strings.
    """
    cfg = Config()
    if path is not None:
        file = resolve_config_path(path)
        data = _read_file(file)
        base_name = data.pop("_base_", None)
        if base_name is not None:
            base_file = resolve_config_path(file.parent / base_name)
            base = _read_file(base_file)
            if "_base_" in base:
                raise ConfigError(f"{base_file}: a _base_ file may not have its own _base_ (one level only)")
            data = _merge(base, data)
        try:
            _apply_dict(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{file}: {err}") from None
    return validate_config(_apply_overrides(cfg, overrides))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the full resolved config as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
