"""Read ImageNet ResNet checkpoints (torchvision / timm) and load them into :class:`ResNet`.

Nothing is downloaded unless the caller passes an ``http(s)://`` URL; a URL is fetched once into
``torch.hub``'s cache (``<torch.hub.get_dir()>/checkpoints/<file name>``, the file timm's ``pretrained``
variants use too) and read from there afterwards. When the file is neither cached nor downloadable
(offline), :class:`WeightsUnavailableError` says which file is needed, its URL, where to put it and the
``model.backbone_weights=PATH`` override.
"""
import os
import re
import warnings
from typing import NamedTuple, Union

import torch
from torch import Tensor, nn

from resdet.config import ConfigError

__all__ = ["CLASSIFIER_PREFIXES", "IMAGENET_URLS", "ResNetLoadResult", "WeightsUnavailableError", "hub_cache_path",
           "imagenet_url", "load_checkpoint", "load_resnet_weights", "strip_prefix"]

_TV = "https://download.pytorch.org/models/"
# torchvision's ImageNet (IMAGENET1K_V1) checkpoints, the backbone start of torchvision's detection recipe.
IMAGENET_URLS = {
    "resnet18": _TV + "resnet18-f37072fd.pth",
    "resnet34": _TV + "resnet34-b627a593.pth",
    "resnet50": _TV + "resnet50-0676ba61.pth",
    "resnet101": _TV + "resnet101-63fe2227.pth",
    "resnet152": _TV + "resnet152-394f9c45.pth",
    "resnext50_32x4d": _TV + "resnext50_32x4d-7cdf4587.pth",
    "wide_resnet50_2": _TV + "wide_resnet50_2-95faca4d.pth",
}


class WeightsUnavailableError(ConfigError):
    """A weights URL is neither in torch.hub's cache nor downloadable."""


def imagenet_url(name: str) -> str:
    """torchvision's ImageNet checkpoint URL for a ResNet name (``resnet50`` ...)."""
    if name not in IMAGENET_URLS:
        raise KeyError(f"no torchvision ImageNet checkpoint for {name!r}; known: {sorted(IMAGENET_URLS)}")
    return IMAGENET_URLS[name]


def hub_cache_path(url: str) -> str:
    """Where ``torch.hub`` (and timm) keep the file of ``url``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))

CLASSIFIER_PREFIXES = ("fc.", "head.fc.", "classifier.")
_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_BLOCK_KEY = re.compile(r"^layer(\d)\.(\d+)\.")
_SAFETENSORS = (".safetensors",)

PathLike = Union[str, os.PathLike]


class ResNetLoadResult(NamedTuple):
    """Keys of a checkpoint load: ``loaded``, ``missing`` (model only), ``unexpected`` (checkpoint only)."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]


def strip_prefix(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from every key that starts with it (e.g. ``module.`` of DataParallel)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _is_url(path: PathLike) -> bool:
    return isinstance(path, str) and path.startswith(("http://", "https://"))


def load_checkpoint(path: PathLike) -> dict[str, Tensor]:
    """Read a checkpoint file (or URL) into a flat ``{name: Tensor}`` state dict on the CPU.

    Accepts ``.pth`` / ``.pt`` / ``.bin`` (read with ``weights_only=True``) and ``.safetensors``; a
    state dict stored plainly or under ``state_dict`` / ``model``; ``module.`` prefixes are stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsUnavailableError: a URL neither cached nor downloadable.
        ValueError: the file holds no tensor state dict.
    """
    if _is_url(path):
        url = str(path)
        local = hub_cache_path(url)
        if not os.path.exists(local):
            try:
                os.makedirs(os.path.dirname(local), exist_ok=True)
                torch.hub.download_url_to_file(url, local, progress=True)
            except Exception as err:  # offline, proxy, HTTP error, read-only cache: one message for all
                name = os.path.basename(local)
                raise WeightsUnavailableError(
                    f"model.backbone_weights: {name} is not in torch.hub's cache and could not be downloaded "
                    f"({type(err).__name__}: {err}). Download {url} and put it at {local} (or set TORCH_HOME), "
                    f"or pass model.backbone_weights=/path/to/{name}; model.backbone_weights=null trains "
                    f"from scratch") from None
        path = local
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if path.endswith(_SAFETENSORS):
        from safetensors.torch import load_file

        obj = load_file(path, device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{path!r} holds no state dict of tensors (expected a plain state dict or one under "
            f"{_WRAPPER_KEYS[:2]}), got {type(obj).__name__}"
        )
    return strip_prefix(dict(obj), "module.")


def _built_key(key: str, num_stages: int) -> bool:
    """False for keys of stages a truncated ResNet (``out_features`` below c5) does not build."""
    m = re.match(r"^layer(\d)\.", key)
    return m is None or int(m.group(1)) <= num_stages


def load_resnet_weights(model: nn.Module, path: PathLike) -> ResNetLoadResult:
    """Load an ImageNet torchvision / timm ResNet checkpoint into ``model`` (a :class:`ResNet`).

    Classifier keys (``fc.*``) and keys of stages the model does not build are dropped silently; other
    missing or unexpected keys are reported by name with a warning. Tensors of another shape, or
    residual blocks only one side has, mean a checkpoint of another depth / width and raise.

    Raises:
        ValueError: shape mismatch or block mismatch (probably a checkpoint of another depth).
    """
    source = load_checkpoint(path)
    num_stages = getattr(model, "num_stages", 4)
    source = {
        k: v for k, v in source.items() if not k.startswith(CLASSIFIER_PREFIXES) and _built_key(k, num_stages)
    }
    target = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in source.items()
        if k in target and v.shape != target[k].shape
    ]
    missing = [k for k in target if k not in source and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in source if k not in target and not k.endswith("num_batches_tracked")]
    # Whole residual blocks present on one side only (e.g. layer3.6 of a resnet101 in a resnet50).
    src_blocks = {m.group(0) for m in map(_BLOCK_KEY.match, source) if m}
    model_blocks = {m.group(0) for m in map(_BLOCK_KEY.match, target) if m}
    odd_blocks = sorted(src_blocks ^ model_blocks)
    if mismatched or odd_blocks:
        details = mismatched[:5] + [
            f"block {b[:-1]}: only in the {'checkpoint' if b in src_blocks else 'model'}" for b in odd_blocks[:5]
        ]
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not fit this {type(model).__name__} "
            f"({len(mismatched)} tensors of another shape, {len(odd_blocks)} residual blocks on one side only); "
            "it is probably a checkpoint of another depth or width (e.g. resnet50 weights for resnet18). "
            "First differences:\n  " + "\n  ".join(details)
        )
    # strict=False: FrozenBatchNorm2d drops num_batches_tracked, and reported keys are tolerated.
    model.load_state_dict(source, strict=False)
    if missing or unexpected:
        warnings.warn(
            f"loading {os.fspath(path)!r}: missing keys (kept at initialisation) {missing}; "
            f"unexpected keys (ignored) {unexpected}",
            stacklevel=2,
        )
    loaded = [k for k in source if k in target]
    return ResNetLoadResult(loaded=loaded, missing=missing, unexpected=unexpected)
