"""Model to export from a checkpoint: a resdet training checkpoint (its stored config) or a torchvision
Faster / Mask R-CNN checkpoint (converted with :func:`resdet.models.from_torchvision`)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["model_from_checkpoint"]


def model_from_checkpoint(
    checkpoint: str | os.PathLike, config: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> tuple[nn.Module, dict[str, Any]]:
    """The eval-mode CPU model of ``checkpoint`` and its metadata (``class_names`` when stored).

    Without ``config``, a resdet checkpoint is built from the config stored in it and any other
    detection checkpoint (``rpn.*``, ``roi_heads.*`` keys) is read as torchvision's; with ``config`` the
    config's model is built and the checkpoint loaded into it (``overrides``: ``key=value`` strings).
    """
    from resdet.engine.inference import config_for_checkpoint, load_model
    from resdet.engine.pretrained import read_state_dict

    state, is_resdet = read_state_dict(checkpoint)
    if config is None and not is_resdet:
        if not any(k.startswith(("rpn.", "roi_heads.")) for k in state):
            raise ValueError(
                f"{os.fspath(checkpoint)}: neither a resdet checkpoint nor a torchvision detection checkpoint "
                f"(no rpn.* / roi_heads.* keys); give --config for other weights"
            )
        from resdet.models import from_torchvision

        return from_torchvision(state), {}
    cfg = config_for_checkpoint(checkpoint, config, overrides)
    return load_model(cfg, checkpoint, device=torch.device("cpu"))
