"""Small configs and tool arguments: models and data that run a few iterations in seconds."""
from __future__ import annotations

import os

from resdet.config import apply_overrides, load_config

from . import REPO


def tiny_cfg(root, out, *overrides):
    """A Mask R-CNN R18 small enough to run a few iterations in seconds on 64-px shapes."""
    cfg = load_config("configs/shapes/mask_rcnn_r34_fpn.yaml")
    return apply_overrides(cfg, [
        f"data.root={root}", "data.shapes.num_train=6", "data.shapes.num_val=4", "data.shapes.image_size=64",
        "data.batch_size=2", "data.test_batch_size=2", "data.num_workers=0",
        "model.backbone=resnet18", "model.min_size=64", "model.max_size=64",
        "model.rpn_pre_nms_top_n_train=100", "model.rpn_post_nms_top_n_train=50",
        "model.rpn_pre_nms_top_n_test=50", "model.rpn_post_nms_top_n_test=20", "model.box_batch_size_per_image=16",
        "model.options={fpn_out_channels: 32, box_representation_size: 64, mask_layers: [32], "
        "mask_predictor_channels: 32}",
        "solver.max_iter=4", "solver.steps=[3]", "solver.warmup_iters=2", "solver.lr=0.01",
        f"train.output_dir={out}", "train.log_period=1", "train.checkpoint_period=2", "train.keep_last=5",
        "train.num_vis_images=1", "train.progress_bar=false", *overrides,
    ])


def detection_overrides(root):
    return [f"data.root={root}", "data.shapes.num_train=4", "data.shapes.num_val=2", "data.shapes.image_size=64",
            "data.batch_size=2", "data.num_workers=0", "model.backbone=resnet18", "model.min_size=64",
            "model.max_size=64", "model.rpn_post_nms_top_n_train=50", "model.rpn_post_nms_top_n_test=20",
            "model.box_batch_size_per_image=16",
            "model.options={fpn_out_channels: 32, box_representation_size: 64, mask_layers: [32], "
            "mask_predictor_channels: 32}"]


SEMANTIC_CONFIG = os.path.join(REPO, "configs", "shapes", "semantic_fpn_r34.yaml")


def semantic_overrides(root, out):
    return [f"data.root={root}", "data.shapes.num_train=4", "data.shapes.num_val=2", "data.shapes.image_size=64",
            "data.batch_size=2", "data.test_batch_size=2", "data.num_workers=0", "model.backbone=resnet18",
            "model.options={min_size: null, max_size: null, fpn_out_channels: 32, conv_dims: 32}",
            f"train.output_dir={out}", "train.progress_bar=false"]
