#!/usr/bin/env python
"""Train a detector from a config; with no arguments, the built-in shapes demo (Mask R-CNN R34-FPN).

Examples::

    python tools/train.py                                   # shapes demo: generate, train, evaluate
    python tools/train.py --config configs/coco/mask_rcnn_r34_fpn_1x.yaml data.root=/data/coco
    python tools/train.py --config ... --resume             # continue from the newest checkpoint
    torchrun --nproc_per_node=8 tools/train.py --config ... # DistributedDataParallel

Overrides are ``key=value`` with YAML values (``solver.lr=0.01 solver.steps=[100,200]``).
Batch size is per process: the total is ``data.batch_size x processes x solver.accumulate``; set
``solver.scale_lr=true`` to scale ``solver.lr`` linearly from ``solver.base_batch_size`` images.
"""
from __future__ import annotations

import argparse
import sys

DEFAULT_CONFIG = "configs/shapes/mask_rcnn_r34_fpn.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in train.output_dir")
    parser.add_argument("--resume-from", default=None, metavar="PATH", help="resume from this checkpoint file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from resdet.config import ConfigError, load_config
    from resdet.engine import distributed as dist
    from resdet.engine.trainer import Trainer, TrainingInterrupted

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, resume=args.resume_from or args.resume)
        metrics = trainer.train()
    except TrainingInterrupted as err:
        print(str(err), file=sys.stderr)
        return 128 + err.signum
    except FloatingPointError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_distributed()
    if dist.get_rank() == 0:
        print(trainer.summary)
        keys = [k for k in ("bbox/AP", "segm/AP", "bbox/mAP50", "mIoU") if k in metrics]
        print("final: " + ", ".join(f"{k}={metrics[k]:.4f}" for k in keys) + f"; outputs in {cfg.train.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
