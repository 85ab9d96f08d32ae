#!/usr/bin/env python
"""Writes Cityscapes panoptic ground truth from gtFine instanceIds, as cityscapesScripts' createPanopticImgs does.

    python tools/convert_cityscapes_to_panoptic.py --root cityscapes --split val

writes ``cityscapes/gtFine/cityscapes_panoptic_val.json`` and the PNG folder
``cityscapes/gtFine/cityscapes_panoptic_val/`` (19 categories with their label ids, 8 things, group regions as
``iscrowd`` segments), the files that ``data.dataset=cityscapes data.task=panoptic``,
``resdet.evaluation.pq_compute`` and cityscapesScripts' ``evalPanopticSemanticLabeling`` read. ``--train-id``
writes train-id categories (``*_trainId.json``).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder holding leftImg8bit/ and gtFine/")
    parser.add_argument("--split", nargs="+", default=["train", "val"], help="gtFine split folders")
    parser.add_argument("--out-dir", default=None, help="output folder (default: ROOT/gtFine)")
    parser.add_argument("--train-id", action="store_true", help="category ids are train ids (0..18)")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = parser.parse_args(argv)
    from resdet.data.convert import cityscapes_to_panoptic
    from resdet.engine.cli import run_guarded

    def convert() -> int:
        for split in args.split:
            path, folder = cityscapes_to_panoptic(args.root, split, out_dir=args.out_dir, train_id=args.train_id)
            with open(path) as f:
                data = json.load(f)
            segments = sum(len(a["segments_info"]) for a in data["annotations"])
            print(f"wrote {path} and {folder}/: {len(data['images'])} images, {segments} segments")
        return 0

    return run_guarded(convert, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
