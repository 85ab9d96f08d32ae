"""Typed configuration: the schema (:mod:`.schema`, where every key is defined and checked) and its
loading from YAML files and ``key=value`` overrides (:mod:`.loading`). Models are built from a config by
:func:`resdet.models.build_model`."""
from . import loading, schema
from .loading import *  # noqa: F403  (the public names of both modules, listed in their __all__)
from .schema import *  # noqa: F403

__all__ = [*schema.__all__, *loading.__all__]


def __getattr__(name: str):
    if name == "build_model":  # moved with the model registry
        raise ImportError("resdet.config.build_model moved: use resdet.models.build_model(cfg)")
    raise AttributeError(f"module 'resdet.config' has no attribute {name!r}")
