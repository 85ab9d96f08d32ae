"""The main job's training step (``python tools/train.py``: its config, image size, batch and dtype) against
torchvision's same model.

``build_main_job_pair`` builds resdet's model from the config exactly as the trainer does
(:func:`resdet.models.build_model`), and torchvision's ``MaskRCNN`` with the same structure: the same ResNet
and normalization (trainable BatchNorm for the shapes demo), FPN width, anchors, RPN and RoI settings, box and
mask head sizes; torchvision's initial weights are copied into resdet's model, and resdet's frozen parameters
are frozen in torchvision's too. Each side's step is what its users run: resdet's optimizer
(:func:`resdet.engine.optim.build_optimizer`, fused where torch has it) and gradient clipping, torchvision
with ``torch.optim.SGD`` and ``torch.nn.utils.clip_grad_norm_`` with the same settings, both with learning
rate 0 so that the two models keep equal weights (hence equal proposals and RoIs) at every step; the
forward runs under the config's ``train.amp`` (bf16 autocast where the CPU has native bf16).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .harness import Row, _synthetic_image, _synthetic_targets, interleaved_times

__all__ = ["DEFAULT_CONFIG", "bench_main_job", "build_main_job_pair"]

DEFAULT_CONFIG = "configs/shapes/mask_rcnn_r34_fpn.yaml"
"""The config ``python tools/train.py`` runs without arguments."""

_TYPED_SETTINGS = (
    "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
    "rpn_batch_size_per_image", "box_batch_size_per_image", "box_score_thresh", "box_nms_thresh",
    "box_detections_per_img",
)


def _torchvision_twin(cfg, rd: nn.Module) -> nn.Module:
    """torchvision's Mask R-CNN with the structure and settings of ``cfg`` (see the module docstring)."""
    import torchvision
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import FrozenBatchNorm2d

    m, opts = cfg.model, dict(cfg.model.options)
    if m.arch != "mask_rcnn" or m.norm not in ("bn", "frozen_bn"):
        raise ValueError(f"the main-job row compares Mask R-CNN with bn or frozen_bn, not {m.arch} with {m.norm}")
    norm = nn.BatchNorm2d if m.norm == "bn" else FrozenBatchNorm2d
    body = getattr(torchvision.models, m.backbone)(weights=None, norm_layer=norm)
    channels = [body.layer1[-1].conv2.out_channels * (2 ** i) for i in range(4)]
    if hasattr(body.layer1[-1], "conv3"):
        channels = [body.layer1[-1].conv3.out_channels * (2 ** i) for i in range(4)]
    width = opts.get("fpn_out_channels", 256)
    backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, channels, width)
    sizes = tuple(tuple(s) for s in opts.get("rpn_anchor_sizes", ((32,), (64,), (128,), (256,), (512,))))
    ratios = tuple(opts.get("rpn_aspect_ratios", (0.5, 1.0, 2.0)))
    rep = opts.get("box_representation_size", 1024)
    layers = tuple(opts.get("mask_layers", (256, 256, 256, 256)))
    # Every other setting under torchvision's keyword of the same name (resdet's builders use its names).
    accepted = {*inspect.signature(FasterRCNN.__init__).parameters, *inspect.signature(MaskRCNN.__init__).parameters}
    typed = {k: getattr(m, k) for k in _TYPED_SETTINGS}
    settings = {k: v for k, v in {**typed, **opts}.items() if k in accepted and k != "num_classes"}
    min_size = tuple(m.min_size) if isinstance(m.min_size, (list, tuple)) else m.min_size
    return MaskRCNN(
        backbone, num_classes=None, min_size=min_size, max_size=m.max_size,
        rpn_anchor_generator=AnchorGenerator(sizes, (ratios,) * len(sizes)),
        box_head=TwoMLPHead(width * 7 * 7, rep), box_predictor=FastRCNNPredictor(rep, m.num_classes),
        mask_head=MaskRCNNHeads(width, layers, 1),
        mask_predictor=MaskRCNNPredictor(layers[-1], opts.get("mask_predictor_channels", 256), m.num_classes),
        **settings,
    )


def build_main_job_pair(config: str = DEFAULT_CONFIG, overrides: Sequence[str] = (), *, seed: int = 0):
    """(cfg, resdet model, torchvision model): the main job's model and torchvision's twin, equal weights.

    Raises:
        ValueError: the two models' parameters do not correspond one to one (a structure this row cannot
            mirror in torchvision).
    """
    from resdet.config import apply_overrides, load_config
    from resdet.models import build_model, convert_torchvision_state_dict

    cfg = apply_overrides(load_config(config), list(overrides))
    torch.manual_seed(seed)
    rd = build_model(cfg)
    tv = _torchvision_twin(cfg, rd)
    state = convert_torchvision_state_dict(tv.state_dict())
    missing, unexpected = rd.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"torchvision's twin of {config} differs: missing {missing[:3]}, unexpected {unexpected[:3]}")
    trainable = {k for k, p in rd.named_parameters() if p.requires_grad}
    renamed = convert_torchvision_state_dict({k: p for k, p in tv.named_parameters()})
    by_tensor = {id(p): k for k, p in renamed.items()}
    for p in tv.parameters():
        p.requires_grad_(by_tensor[id(p)] in trainable)
    return cfg, rd, tv


def bench_main_job(config: str = DEFAULT_CONFIG, overrides: Sequence[str] = (), *, iters: int = 5, warmup: int = 1,
                   device: str = "cpu") -> list[Row]:
    """The main job's training step, resdet against torchvision (one row, milliseconds per step)."""
    from resdet.engine.inference import amp_dtype
    from resdet.engine.optim import build_optimizer, clip_grad_norm

    dev = torch.device(device)
    cfg, rd, tv = build_main_job_pair(config, overrides)
    for model in (rd, tv):
        model.to(dev).train()
    dtype = amp_dtype(cfg.train.amp, dev)
    s, batch = cfg.solver, cfg.data.batch_size
    size = cfg.model.min_size if isinstance(cfg.model.min_size, int) else max(cfg.model.min_size)
    g = torch.Generator().manual_seed(0)
    images = [_synthetic_image(size, size, dev, g) for _ in range(batch)]
    targets = _synthetic_targets(batch, size, size, True, dev, g)
    for t in targets:  # the config's classes, boxes inside the image
        t["labels"] = t["labels"] % (cfg.model.num_classes - 1) + 1
        t["boxes"] = t["boxes"].clamp(max=size)
    rd_opt = build_optimizer(rd, name=s.optimizer, lr=0.0, weight_decay=s.weight_decay,
                             no_decay_norm_bias=s.no_decay_norm_bias, momentum=s.momentum, nesterov=s.nesterov,
                             betas=tuple(s.betas))
    tv_params = [p for p in tv.parameters() if p.requires_grad]
    tv_opt = (torch.optim.SGD(tv_params, lr=0.0, momentum=s.momentum, nesterov=s.nesterov, weight_decay=s.weight_decay)
              if s.optimizer == "sgd" else torch.optim.AdamW(tv_params, lr=0.0, betas=tuple(s.betas),
                                                             weight_decay=s.weight_decay))

    def step(model: nn.Module, opt: torch.optim.Optimizer, clip: Callable) -> Callable[[], object]:
        params = [p for p in model.parameters() if p.requires_grad]

        def run() -> object:
            autocast = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with autocast:
                loss = sum(model(images, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.clip_grad_norm:
                clip(params, s.clip_grad_norm)
            opt.step()
            return loss
        return run

    fns = [step(rd, rd_opt, clip_grad_norm), step(tv, tv_opt, torch.nn.utils.clip_grad_norm_)]
    t = interleaved_times(fns, iters, warmup, dev)
    kind = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    name = f"{cfg.model.arch}_{cfg.model.backbone}_fpn"
    return [Row(name, f"main job b{batch} {size}x{size} {kind}", t[0] * 1e3, t[1] * 1e3, "ms", {"config": config})]
