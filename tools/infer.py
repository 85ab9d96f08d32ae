#!/usr/bin/env python
"""Run a trained detector on images or folders; write images with drawn boxes, labels, scores and masks,
plus ``detections.json``.

Example::

    python tools/infer.py --checkpoint outputs/shapes_mask_rcnn_r34/model_final.pth \\
        --input datasets/shapes/images/val --output outputs/infer
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML config (default: the config stored in a resdet checkpoint)")
    parser.add_argument("--checkpoint", required=True, help="model weights")
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--output", default="outputs/infer", help="folder for drawn images and detections.json")
    parser.add_argument("--score-thresh", type=float, default=None, help="default: eval.vis_score_thresh")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)

    from resdet.config import ConfigError
    from resdet.engine.inference import config_for_checkpoint, infer_images

    try:
        cfg = config_for_checkpoint(args.checkpoint, args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    results = infer_images(cfg, args.checkpoint, args.input, args.output, score_thresh=args.score_thresh)
    total = sum(len(r["detections"]) for r in results)
    print(f"{len(results)} images, {total} detections -> {args.output}/ (detections.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
