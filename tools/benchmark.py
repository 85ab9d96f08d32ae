"""Benchmark resdet's Faster / Mask R-CNN against torchvision's same architecture, side by side.

Prints resdet/torchvision ratios of inference latency (resdet as built and after
``optimize_for_inference()``), training step time, peak memory, FLOPs, achieved GFLOP/s against a GEMM
of the same run, and the MultiScaleRoIAlign operator, as a markdown table (logic in ``resdet.benchmark``).

Examples::

    python tools/benchmark.py                                  # Mask R-CNN R34-FPN, CPU: the README table
    python tools/benchmark.py --arch faster mask --depth 34 50 --iters 7
    python tools/benchmark.py --train 2x800x1066 --sizes 800x1066 --threads 2
    python tools/benchmark.py --device cuda --amp
"""
from __future__ import annotations

import argparse
import os
import sys


def _size(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers joined by 'x' (HxW or BxHxW), got {text!r}") from None


def _train(text: str) -> tuple[int, int, int]:
    value = _size(text)
    if len(value) != 3:
        raise argparse.ArgumentTypeError(f"training step must look like BATCHxHEIGHTxWIDTH, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["mask"], choices=["faster", "mask"])
    p.add_argument("--depth", "--backbone", dest="depth", nargs="+", default=["resnet34"],
                   help="backbones: 34, r50, resnet101 ... (--backbone is the same option)")
    p.add_argument("--sizes", nargs="*", type=_size, default=[(800, 1066), (320, 427)],
                   help="inference image sizes HxW (the model's min_size is set to the short side); none: skip")
    p.add_argument("--iters", type=int, default=5, help="timed inference iterations per model (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--train", nargs="*", type=_train, default=[(2, 800, 1066), (2, 512, 683), (4, 320, 427)],
                   help="training steps BxHxW to time; none: skip")
    p.add_argument("--train-iters", type=int, default=3)
    p.add_argument("--measure", nargs="+", default=["infer", "train", "memory", "flops", "roi_align"],
                   choices=["infer", "train", "memory", "flops", "roi_align"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-winograd", action="store_true",
                   help="resdet without its NNPACK/Winograd 3x3 convolutions (resdet.fast_paths(False, 'winograd'))")
    p.add_argument("--no-fast-paths", action="store_true",
                   help="resdet without any of its fast kernels (resdet.fast_paths(False))")
    p.add_argument("--onnx", action="store_true",
                   help="also time the ONNX export in onnxruntime against resdet and torchvision in PyTorch")
    p.add_argument("--rows-json", default=None, help=argparse.SUPPRESS)  # internal: the memory child's output
    return p.parse_args(argv)


def _without_measure(argv: list[str]) -> list[str]:
    """argv minus ``--measure`` and its values (the memory child gets its own)."""
    out, skipping = [], False
    for a in argv:
        if a == "--measure":
            skipping = True
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


def _memory_rows_in_child(argv: list[str]) -> list:
    """The peak-memory rows, measured by this script in a child process whose allocator maps every large
    tensor (so freed memory leaves the process and peak RSS tracks live memory). Timings stay in this
    process, under the allocator users run with."""
    import json
    import subprocess
    import tempfile

    from resdet.benchmark import Row

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        command = [sys.executable, __file__, *argv, "--measure", "memory", "--rows-json", out]
        subprocess.run(command, env=env, check=True)
        with open(out) as f:
            rows = [Row(**r) for r in json.load(f)]
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import contextlib

    import resdet

    switch = contextlib.nullcontext()
    if args.no_fast_paths or args.no_winograd:
        switch = resdet.fast_paths(False, *(() if args.no_fast_paths else ("winograd",)))
    with switch:
        _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> None:
    import torch

    from resdet import benchmark

    if args.threads:
        torch.set_num_threads(args.threads)  # before the first NNPACK call, which sizes its thread pool
    child = args.rows_json is not None
    measure = tuple(args.measure)
    memory_rows = []
    if "memory" in measure and not child:
        memory_rows = _memory_rows_in_child(_without_measure(argv))
        measure = tuple(m for m in measure if m != "memory")
    if not child:
        print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, amp {args.amp}, "
              f"winograd {not (args.no_winograd or args.no_fast_paths)}, fast paths {not args.no_fast_paths}")
    gemm = None if child else benchmark.gemm_gflops(torch.device(args.device))
    rows = []
    for arch in args.arch:
        for depth in args.depth:
            new = benchmark.benchmark_pair(
                arch, depth, sizes=tuple(args.sizes), iters=args.iters, warmup=args.warmup, train=tuple(args.train),
                train_iters=args.train_iters, device=args.device, amp=args.amp, measure=measure,
            )
            if child:
                rows += [r for r in new if "mem" in r.metric]
                continue
            print(benchmark.format_rows(new), flush=True)
            rows += new
    if child:
        import dataclasses
        import json

        with open(args.rows_json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f)
        return
    rows += memory_rows
    if memory_rows:
        print(benchmark.format_rows(memory_rows), flush=True)
    if "roi_align" in measure:
        rows.append(benchmark.bench_multiscale_roi_align(device=args.device))
    print("\nratio = resdet / torchvision; < 1 means resdet is faster / smaller\n")
    print(benchmark.format_markdown(rows, gemm))
    if args.onnx:
        from resdet.export import bench_onnxruntime, format_latency_rows

        for arch in args.arch:
            for depth in map(benchmark.normalize_depth, args.depth):
                for h, w in args.sizes:
                    rows = bench_onnxruntime(arch, depth, size=(h, w), iters=args.iters, warmup=args.warmup,
                                             threads=args.threads)
                    title = f"\n{arch}_rcnn_{depth}_fpn {h}x{w} (ratio = runner / resdet pytorch)"
                    print(format_latency_rows(rows, title))


if __name__ == "__main__":
    main()
