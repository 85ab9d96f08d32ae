#!/usr/bin/env python
"""resdet's semantic models against segmentation_models_pytorch's same architecture on resdet's encoder.

Trains both sides with the shipped shapes config (same data order, augmentation, transform, schedule,
loss and evaluator; only the network differs), several seeds each, one process per run, the two sides
interleaved, and prints the README's table: mIoU mean and range over seeds, training and end-to-end time,
and the resdet/smp training-time ratio of each seed. Needs ``pip install -e .[peer]``.

Examples::

    python tools/semantic_peer.py                                   # both archs, seeds 0 1 2 (~25 min)
    python tools/semantic_peer.py --arch semantic_fpn --seeds 0 1 2 3 4
    python tools/semantic_peer.py --arch deeplabv3plus solver.max_iter=100   # overrides go to both sides
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # semantic_peer_lib next to this file

from semantic_peer_lib import ARCHS, SIDES, run_all, run_one, table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--output", default="outputs/semantic_peer", help="run folders and results.jsonl go here")
    p.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)  # internal: one run in this process
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for both sides")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.config, args.one, args.seed, args.output, args.overrides)))
        return 0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as log:
        def record(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        rows = run_all(args.arch, args.seeds, out, args.overrides, log=record)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
