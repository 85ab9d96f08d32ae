#!/usr/bin/env python
"""Evaluate a checkpoint on a config's validation set and print the tables (COCO bbox/segm, VOC, mIoU,
panoptic PQ / SQ / RQ for All, Things, Stuff and per category, classification top-1/top-5 accuracy
and error).

Examples::

    python tools/test.py --checkpoint outputs/shapes_mask_rcnn_r34/model_final.pth
    python tools/test.py --config configs/coco/mask_rcnn_r50_fpn_1x.yaml --checkpoint tv_model.pth data.root=/data/coco
    torchrun --nproc_per_node=4 tools/test.py --config ... --checkpoint ...   # sharded, results gathered

The checkpoint may be a resdet checkpoint or a torchvision detection checkpoint (converted on load; a 91-way
torchvision COCO model predicts COCO category ids and is evaluated as such). The COCO results JSON
(``coco_bbox_results.json``, ``coco_segm_results.json`` with RLE masks, in the dataset's category ids,
ready for the COCO evaluation server) is written to ``train.output_dir``, for panoptic models also
``panoptic_results.json`` + ``panoptic_results/`` (panopticapi's format, dataset category ids); ``--json``
writes the metrics (``bbox/AP``, ``segm/AP``, ``panoptic/PQ``, ...).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None, *, own_process: bool = False) -> int:
    """Runs the tool; ``own_process``: this process is the tool's (run as a script), so it may tune the
    C allocator (``resdet.engine.malloc``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML config (default: the config stored in a resdet checkpoint)")
    parser.add_argument("--checkpoint", required=True, help="model weights to evaluate")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    from resdet.engine.cli import run_guarded

    if own_process:
        from resdet.engine.malloc import tune_malloc

        tune_malloc()
    return run_guarded(lambda: _test(args), debug=args.debug)


def _test(args: argparse.Namespace) -> int:

    from resdet.engine import distributed as dist
    from resdet.engine.inference import config_for_checkpoint, evaluate_checkpoint

    cfg = config_for_checkpoint(args.checkpoint, args.config, args.overrides)
    try:
        metrics, summary = evaluate_checkpoint(cfg, args.checkpoint)
        rank = dist.get_rank()  # before the process group is gone
    finally:
        dist.destroy_distributed()
    if rank == 0:
        print(summary)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(metrics, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(own_process=True))
