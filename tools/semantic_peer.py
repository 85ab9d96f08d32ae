#!/usr/bin/env python
"""resdet's semantic models against segmentation_models_pytorch's same architecture on resdet's encoder.

Trains both sides with the shipped shapes config (same data order, augmentation, transform, schedule,
loss and evaluator; only the network differs), several seeds each, one process per run, the two sides
interleaved (or, with ``--jobs``, the two sides of a seed side by side), and prints the README's table:
mIoU mean and range over seeds, training and end-to-end time, and the resdet/smp training-time ratio of
each seed. Needs ``pip install -e .[peer]``.

Examples::

    python tools/semantic_peer.py                                   # both archs, seeds 0 1 2 (~25 min idle)
    python tools/semantic_peer.py --jobs 4 train.num_threads=1      # 4 runs at once, 1 thread each
    python tools/semantic_peer.py --report                          # the table of the runs so far
    python tools/semantic_peer.py --arch semantic_fpn --seeds 0 1 2 3 4
    python tools/semantic_peer.py --arch deeplabv3plus solver.max_iter=100   # overrides go to both sides
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # semantic_peer_lib next to this file

from semantic_peer_lib import ARCHS, SIDES, read_results, run_all, run_one, table  # noqa: E402

from resdet.engine.cli import add_debug_flag, run_guarded  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--output", default="outputs/semantic_peer", help="run folders and results.jsonl go here")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once; from 2 up, each seed's resdet and smp runs start together (default 1)")
    p.add_argument("--report", action="store_true", help="print the table of --output's results.jsonl and stop")
    p.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)  # internal: one run in this process
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for both sides")
    add_debug_flag(p)
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_guarded(lambda: _main(args), debug=args.debug)


def _main(args: argparse.Namespace) -> int:
    if args.one:
        print(json.dumps(run_one(args.config, args.one, args.seed, args.output, args.overrides)))
        return 0
    out = Path(args.output)
    if args.report:
        if not (out / "results.jsonl").is_file():
            raise SystemExit(f"no results: {out / 'results.jsonl'} does not exist")
        print(table(read_results(out / "results.jsonl")))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as log:
        def record(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        try:
            rows = run_all(args.arch, args.seeds, out, args.overrides, jobs=args.jobs, log=record)
        except RuntimeError as err:  # a run failed: one line naming it and its log
            print(f"error: {err}", file=sys.stderr)
            return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
