#!/usr/bin/env python
"""Train a detector, segmenter or classifier from a config; with no arguments, the built-in shapes demo
(Mask R-CNN R34-FPN).

Examples::

    python tools/train.py                                   # shapes demo: generate, train, evaluate
    python tools/train.py --config configs/coco/mask_rcnn_r34_fpn_1x.yaml data.root=/data/coco
    python tools/train.py --config configs/cifar10/resnet20.yaml data.root=/data/cifar10   # prints top-1 error
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
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None, *, own_process: bool = False) -> int:
    """Runs the tool; ``own_process``: this process is the tool's (run as a script), so it may tune the
    C allocator (``resdet.engine.malloc``)."""
    args = parse_args(argv)
    from resdet.engine.cli import run_guarded

    if own_process:
        from resdet.engine.malloc import tune_malloc

        tune_malloc()
    return run_guarded(lambda: _train(args), debug=args.debug)


def _train(args: argparse.Namespace) -> int:
    from resdet.config import load_config
    from resdet.engine import distributed as dist
    from resdet.engine.cli import final_line
    from resdet.engine.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    try:
        trainer = Trainer(cfg, resume=args.resume_from or args.resume)
        metrics = trainer.train()
        rank = dist.get_rank()  # before the process group is gone
    finally:
        dist.destroy_distributed()
    if rank == 0:
        if trainer.summary:
            print(trainer.summary)
        print(final_line(metrics, cfg.train.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(own_process=True))
