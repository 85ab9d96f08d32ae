#!/usr/bin/env python
"""Writes Cityscapes gtFine instances (8 thing classes) as COCO instance json with RLE masks.

    python tools/convert_cityscapes_to_coco.py --root cityscapes --split train --out cs_train.json

Use the json with ``CocoDataset(image_dir="cityscapes/leftImg8bit/train", ann_file=...)``. Group regions
(e.g. "cargroup") are written with ``iscrowd=1``.
"""
from __future__ import annotations

import argparse
import logging

from resdet.data.convert import cityscapes_to_coco, write_json


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder holding leftImg8bit/ and gtFine/")
    parser.add_argument("--split", default="train", help="train, val or test")
    parser.add_argument("--out", required=True, help="output json path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = cityscapes_to_coco(args.root, args.split)
    path = write_json(data, args.out)
    print(f"wrote {path}: {len(data['images'])} images, {len(data['annotations'])} annotations")
    return path


if __name__ == "__main__":
    main()
