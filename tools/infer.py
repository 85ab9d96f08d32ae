#!/usr/bin/env python
"""Run a trained model on images or folders; write the images with drawn predictions (detectors: boxes,
labels, scores, masks; semantic models: a colour overlay with a legend; panoptic models: every segment in
its own colour, things outlined, a legend; classifiers: the top-5 classes) as PNG, plus ``detections.json``
(boxes, scores, masks as COCO RLE; semantic: the share of pixels per class; panoptic: the segments with RLE
masks; classifiers: ``top5``, also printed per image). Files that are not images are skipped and counted.

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
    parser.add_argument("--checkpoint", default=None, help="model weights (required unless --onnx)")
    parser.add_argument("--onnx", default=None, help="run this exported model (tools/export.py) with onnxruntime")
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--output", default="outputs/infer", help="folder for drawn images and detections.json")
    parser.add_argument("--score-thresh", type=float, default=None, help="default: eval.vis_score_thresh")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    if args.onnx is None and args.checkpoint is None:
        parser.error("--checkpoint is required (or --onnx FILE)")
    from resdet.engine.cli import run_guarded

    return run_guarded(lambda: _infer(args), debug=args.debug)


def _infer(args: argparse.Namespace) -> int:
    from resdet.engine.inference import config_for_checkpoint, infer_images

    if args.onnx:
        from resdet.export.runtime import infer_images_onnx

        out = infer_images_onnx(args.onnx, args.input, args.output, score_thresh=args.score_thresh)
    else:
        cfg = config_for_checkpoint(args.checkpoint, args.config, args.overrides)
        out = infer_images(cfg, args.checkpoint, args.input, args.output, score_thresh=args.score_thresh)
    results, skipped, failed = out["results"], out["skipped"], out["failed"]
    first = results[0] if results else {"detections": []}
    if "segments" in first:
        found = f"{sum(len(r['segments']) for r in results)} panoptic segments"
    elif "detections" in first:
        found = f"{sum(len(r['detections']) for r in results)} detections"
    elif "top5" in first:
        found = "top-5 classes"
        for r in results:
            print(f"{r['file']}: " + ", ".join(f"{c['class']} {c['score']:.3f}" for c in r["top5"]))
    else:
        found = "semantic maps"
    line = f"{len(results)} images, {found} -> {args.output}/ (detections.json)"
    if skipped or failed:
        line += f"; skipped {len(skipped)} non-image files and {len(failed)} undecodable images"
    print(line)
    for item in failed:
        print(f"  skipped: {item}", file=sys.stderr)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
