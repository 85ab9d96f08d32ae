#!/usr/bin/env python
"""Writes a PASCAL VOC split as COCO instance json.

    python tools/convert_voc_to_coco.py --root VOCdevkit --year 2012 --split train --out voc_train.json

Use the json with ``CocoDataset(image_dir="VOCdevkit/VOC2012/JPEGImages", ann_file=...)``. Difficult objects
are written with ``iscrowd=1`` (ignored by COCOeval, not trained on).
"""
from __future__ import annotations

import argparse
import logging

from resdet.data.convert import voc_to_coco, write_json


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the VOCdevkit folder")
    parser.add_argument("--year", default="2012", help="2007 or 2012")
    parser.add_argument("--split", default="train", help="split file name in ImageSets (train, val, trainval, test)")
    parser.add_argument("--task", default="detection", choices=["detection", "instance"],
                        help="detection: XML boxes; instance: SegmentationObject masks (RLE)")
    parser.add_argument("--out", required=True, help="output json path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = voc_to_coco(args.root, args.year, args.split, task=args.task)
    path = write_json(data, args.out)
    print(f"wrote {path}: {len(data['images'])} images, {len(data['annotations'])} annotations")
    return path


if __name__ == "__main__":
    main()
