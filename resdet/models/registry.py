"""Model registry: ``model.arch`` name → builder function, and the one place a config becomes a model.

A builder is a function ``builder(backbone, num_classes, *, option=default, ...)`` returning an
``nn.Module``. Its keyword parameters are the options ``model.options`` may set; they are checked
against its signature (names and annotated types) when a config is loaded, so a misspelt option or one
the architecture does not have fails before anything is built::

    # my_rcnn(..., **options) forwards to faster_rcnn
    @register_arch("my_rcnn", task="detection", extends=(faster_rcnn,))
    def my_rcnn(backbone: str = "resnet50", num_classes: int = 91, *, extra: int = 4, **options): ...

Then ``model.arch=my_rcnn`` works in every config and tool.
"""
from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from resdet.config.schema import ConfigError, add_config_check, coerce_value, did_you_mean

__all__ = ["TASKS", "register_arch", "arch_names", "arch_task", "get_arch", "arch_options", "renamed_options",
           "check_model_config", "check_typed_keys", "build_model"]

TASKS = ("detection", "instance", "semantic", "panoptic", "classification")
"""What an architecture predicts, which decides its evaluator, drawing and checkpoint checks:
``detection`` (boxes), ``instance`` (boxes and masks), ``semantic`` (``sem_seg``), ``panoptic``
(``panoptic_seg`` plus instances and ``sem_seg``), ``classification`` (``scores`` over classes)."""

_ARCHS: dict[str, Callable[..., nn.Module]] = {}
_EXTENDS: dict[str, tuple[Callable[..., Any], ...]] = {}
_RENAMED: dict[str, dict[str, str]] = {}
_TASK: dict[str, str] = {}

# Typed ``model.*`` keys passed to every builder that has a keyword of the same name.
_TYPED_KEYS = (
    "num_classes", "min_size", "max_size", "norm", "fpn_norm", "frozen_stages",
    "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
    "rpn_batch_size_per_image", "box_batch_size_per_image", "box_score_thresh", "box_nms_thresh",
    "box_detections_per_img",
)
_SKIP_WHEN_NONE = ("norm", "fpn_norm", "frozen_stages")  # None in the config: the builder's default


def register_arch(
    name: str, *, task: str, extends: Sequence[Callable[..., Any]] = (), renamed: dict[str, str] | None = None
) -> Callable:
    """Decorator registering a model builder under ``name``.

    Args:
        name: the ``model.arch`` value.
        task: what the model predicts, one of :data:`TASKS`.
        extends: functions the builder's ``**kwargs`` are forwarded to; their keyword parameters are
            options of this architecture too.
        renamed: old option name → new name; the builder (and the config) reject the old name with a
            message giving the new one.
    """
    renamed = dict(renamed or {})
    if task not in TASKS:
        raise ValueError(f"register_arch({name!r}): task must be one of {TASKS}, got {task!r}")

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ARCHS:
            raise ValueError(f"model arch {name!r} is already registered (by {_ARCHS[name].__qualname__})")
        if renamed:
            builder = _rejecting_old_names(builder, renamed)
        _ARCHS[name] = builder
        _EXTENDS[name] = tuple(extends)
        _RENAMED[name] = renamed
        _TASK[name] = task
        return builder

    return register


def _rejecting_old_names(builder: Callable[..., nn.Module], renamed: dict[str, str]) -> Callable[..., nn.Module]:
    @functools.wraps(builder)  # keeps the signature and type hints of ``builder`` for arch_options
    def wrapper(*args: Any, **kwargs: Any) -> nn.Module:
        for old in kwargs.keys() & renamed.keys():
            raise TypeError(f"{builder.__name__}(): option {old!r} is now called {renamed[old]!r}")
        return builder(*args, **kwargs)

    return wrapper


def arch_names() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_ARCHS)


def arch_task(name: str) -> str:
    """What architecture ``name`` predicts, one of :data:`TASKS`."""
    get_arch(name)
    return _TASK[name]


def get_arch(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; ``KeyError`` naming the registered ones otherwise."""
    if name not in _ARCHS:
        raise KeyError(f"unknown model arch {name!r}; registered: {', '.join(arch_names())}")
    return _ARCHS[name]


def arch_options(name: str) -> dict[str, Any]:
    """Keyword options of architecture ``name`` → their annotated type (``Any`` where unannotated).

    ``backbone`` is not an option: it has its own config key.
    """
    options: dict[str, Any] = {}
    for fn in (get_arch(name), *_EXTENDS[name]):
        try:
            hints = typing.get_type_hints(fn)
        except (NameError, TypeError):  # an annotation that does not resolve: names are still checked
            hints = {}
        for param in inspect.signature(fn).parameters.values():
            if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or param.name == "backbone":
                continue
            options.setdefault(param.name, hints.get(param.name, Any))
    return options


def renamed_options(name: str) -> dict[str, str]:
    """Old option name → new name, for architecture ``name``."""
    get_arch(name)
    return dict(_RENAMED[name])


def check_typed_keys(model_cfg: Any) -> None:
    """Refuse typed ``model.*`` keys that ``model_cfg.arch`` has no keyword for (e.g. the RPN settings for
    ``semantic_fpn``) when they are set away from their defaults: such a setting would do nothing.

    Raises:
        ConfigError: naming the key, its value and the architecture (and those that use the key).
    """
    accepted = arch_options(model_cfg.arch)
    defaults = type(model_cfg)()
    for key in _TYPED_KEYS:
        value = getattr(model_cfg, key)
        if key in accepted or value == getattr(defaults, key, value):
            continue
        users = [a for a in arch_names() if key in arch_options(a)]
        raise ConfigError(f"model.{key}={value!r}: model.arch={model_cfg.arch!r} does not use it (only "
                          f"{', '.join(users) or 'no registered arch'}); remove it or change model.arch")


@add_config_check
def check_model_config(cfg: Any) -> None:
    """``model.arch`` must be a registered architecture and every ``model.options`` entry a keyword of its
    builder, of the annotated type (converted in place). Raises :class:`~resdet.config.ConfigError` naming
    the key. Registered with the config layer, so that loading a config runs it once this module is imported
    (the tools import it before loading), and run again by :func:`build_model`.
    """
    m = cfg.model
    names = arch_names()
    if m.arch not in names:
        raise ConfigError(f"model.arch: {m.arch!r} is not one of {', '.join(names)}{did_you_mean(m.arch, names)}")
    accepted = arch_options(m.arch)
    for name in list(m.options):
        key = f"model.options.{name}"
        if name == "backbone":
            raise ConfigError(f"{key}: set model.backbone instead")
        if name in accepted:
            m.options[name] = coerce_value(m.options[name], accepted[name], key)
            continue
        renamed = renamed_options(m.arch)
        if name in renamed:
            raise ConfigError(f"{key}: renamed to 'model.options.{renamed[name]}'")
        owners = [a for a in names if a != m.arch and name in arch_options(a)]
        if owners:
            raise ConfigError(f"{key}: model.arch={m.arch!r} has no option {name!r} (it is an option of "
                              f"{', '.join(owners)}); remove it or change model.arch")
        hint = did_you_mean(name, sorted(accepted))
        hint = hint.replace("'", "'model.options.", 1) if hint else ""
        raise ConfigError(f"unknown config key '{key}' for model.arch={m.arch!r}{hint}")


def build_model(cfg: Any) -> nn.Module:
    """Builds ``cfg.model.arch`` from a :class:`resdet.config.Config`.

    The builder gets ``backbone``, every typed ``model.*`` key it has a keyword for, ``model.backbone_weights``
    as ``weights``, then ``model.options`` (already checked against its signature at config load). A typed key
    it has no keyword for (e.g. the RPN settings for ``semantic_fpn``) must keep its default
    (:func:`check_typed_keys`).
    """
    check_model_config(cfg)
    m = cfg.model
    check_typed_keys(m)
    builder = get_arch(m.arch)
    accepted = arch_options(m.arch)
    kwargs: dict[str, Any] = {}
    for key in _TYPED_KEYS:
        value = getattr(m, key)
        if key not in accepted or (value is None and key in _SKIP_WHEN_NONE):
            continue
        kwargs[key] = tuple(value) if key == "min_size" and isinstance(value, list) else value
    if m.backbone_weights is not None:
        kwargs["weights"] = m.backbone_weights
    kwargs.update(m.options)
    return builder(backbone=m.backbone, **kwargs)
