#!/usr/bin/env python
"""Write the synthetic CIFAR-10 stand-in (ten shape classes, 32x32, random colours and backgrounds) in the
real CIFAR-10 layout, for trying the CIFAR configs without the dataset.

Example::

    python tools/make_synthetic_cifar.py --out datasets/synthetic_cifar10 --train 5000 --test 1000
    python tools/train.py --config configs/cifar10/resnet20.yaml data.root=datasets/synthetic_cifar10 \\
        solver.max_iter=300
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write cifar-10-batches-py/ into")
    parser.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train < 5 or args.test < 1:
        parser.error("--train needs at least 5 images (five batch files) and --test at least 1")
    from resdet.data.cifar_synthetic import write_synthetic_cifar10

    folder = write_synthetic_cifar10(args.out, num_train=args.train, num_test=args.test, seed=args.seed)
    print(f"wrote {args.train} training and {args.test} test images to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
