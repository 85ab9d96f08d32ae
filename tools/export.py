#!/usr/bin/env python
"""Export a resdet model (Faster / Mask R-CNN, semantic FPN) to ONNX or TorchScript, then check the file.

The exported model takes one image ``image`` float [3, H, W] in [0, 1] (any H×W unless --input-size)
and returns ``boxes``, ``labels``, ``scores`` (+ ``masks``) or ``sem_seg`` in original image pixels.
After writing, the file is run on an image (onnxruntime / torch.jit.load) and compared with PyTorch.

Examples::

    python tools/export.py --checkpoint outputs/shapes_mask_rcnn_r34/model_final.pth --format onnx --out model.onnx
    python tools/export.py --checkpoint maskrcnn_resnet50_fpn_coco.pth --format torchscript --out model.pt
    python tools/export.py --checkpoint model.pth --format onnx --out model.onnx --input-size 800x1088 --optimize
"""
from __future__ import annotations

import argparse
import json
import sys


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HEIGHTxWIDTH, got {text!r}") from None
    return h, w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="resdet or torchvision detection checkpoint")
    parser.add_argument("--config", default=None, help="YAML config (default: the one stored in a resdet checkpoint)")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument("--out", required=True, help="output file (.onnx / .pt)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: resdet.export.DEFAULT_OPSET)")
    parser.add_argument("--input-size", type=_size, default=None,
                        help="HEIGHTxWIDTH: fixed input size (default: dynamic height and width)")
    parser.add_argument("--optimize", action="store_true", help="optimize_for_inference() before export")
    parser.add_argument("--image", default=None, help="image file for the check (default: a synthetic image)")
    parser.add_argument("--no-check", action="store_true", help="skip running and comparing the exported file")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    from resdet.engine.cli import run_guarded

    return run_guarded(lambda: _export(args), debug=args.debug)


def _export(args: argparse.Namespace) -> int:
    from resdet.export import DEFAULT_OPSET, ExportError, check_opset, to_onnx, to_torchscript
    from resdet.export.loading import model_from_checkpoint

    if args.format == "onnx" and args.opset is not None:
        check_opset(args.opset)  # before the model is loaded and traced

    model, meta = model_from_checkpoint(args.checkpoint, args.config, args.overrides)
    image = None
    if args.image:
        from resdet.engine.visualize import read_rgb

        image = read_rgb(args.image).float() / 255
        if args.input_size and tuple(image.shape[-2:]) != args.input_size:
            image = None  # a fixed-size model only takes its size: check on a synthetic image
            print(f"note: {args.image} is not {args.input_size}; checking on a synthetic image")
    common = dict(optimize=args.optimize, check=not args.no_check, check_image=image)
    try:
        if args.format == "onnx":
            metadata = {"class_names": json.dumps(list(meta["class_names"]))} if meta.get("class_names") else None
            to_onnx(model, args.out, opset=args.opset or DEFAULT_OPSET, input_size=args.input_size, metadata=metadata,
                    **common)
        else:
            if args.input_size or args.opset:
                print("note: --input-size and --opset apply to ONNX only", file=sys.stderr)
            to_torchscript(model, args.out, **common)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({type(model).__name__}, {args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
