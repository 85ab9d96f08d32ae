"""Typed configuration: the schema (:mod:`.schema`, where every key is defined and checked) and its
loading from YAML files and ``key=value`` overrides (:mod:`.loading`). Models are built from a config by
:func:`resdet.models.build_model`."""
from .loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    resolve_config_path,
    save_config,
)
from .schema import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ShapesConfig,
    SolverConfig,
    TrainConfig,
    set_key,
    validate_config,
)

__all__ = [
    "ConfigError",
    "ModelConfig",
    "ShapesConfig",
    "DataConfig",
    "SolverConfig",
    "TrainConfig",
    "EvalConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "save_config",
    "resolve_config_path",
    "set_key",
    "validate_config",
]


def __getattr__(name: str):
    if name == "build_model":  # moved with the model registry
        raise ImportError("resdet.config.build_model moved: use resdet.models.build_model(cfg)")
    raise AttributeError(f"module 'resdet.config' has no attribute {name!r}")
