"""Benchmark resdet's Faster / Mask R-CNN against torchvision's same architecture, side by side.

Prints resdet/torchvision ratios of inference latency (resdet as built and after
``optimize_for_inference()``), training step time, peak memory, FLOPs, achieved GFLOP/s against a GEMM
of the same run, and the MultiScaleRoIAlign operator, as a markdown table (logic in ``tools/bench/``).
``--tune`` instead re-measures the sizes from which resdet's fast kernels pay on this machine.

Examples::

    python tools/benchmark.py                                  # Mask R-CNN R34-FPN, CPU: the README table
    python tools/benchmark.py --arch faster mask --depth 34 50 --iters 7
    python tools/benchmark.py --train 2x800x1066 --sizes 800x1066 --threads 2
    python tools/benchmark.py --device cuda --amp
    python tools/benchmark.py --main-job --threads 2                    # the main job's step (tools/train.py)
    python tools/benchmark.py --main-job --main-job-overrides train.amp=none --threads 2   # ... in float32
    python tools/benchmark.py --tune --threads 2 --tune-out thresholds.json  # RESDET_FAST_PATHS_THRESHOLDS=...
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bench(name: str):
    """``tools/bench/<name>.py``: the harness lives next to this script, outside the installed library."""
    if "resdet_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("resdet_bench", HERE / "bench" / "__init__.py",
                                                      submodule_search_locations=[str(HERE / "bench")])
        package = importlib.util.module_from_spec(spec)
        sys.modules["resdet_bench"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"resdet_bench.{name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cli = bench("cli")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["mask"], choices=["faster", "mask"])
    p.add_argument("--depth", "--backbone", dest="depth", nargs="+", default=["resnet34"],
                   help="backbones: 34, r50, resnet101 ... (--backbone is the same option)")
    p.add_argument("--sizes", nargs="*", type=cli.size, default=[(800, 1066), (320, 427)],
                   help="inference image sizes HxW (the model's min_size is set to the short side); none: skip")
    p.add_argument("--iters", type=int, default=5, help="timed inference iterations per model (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--train", nargs="*", type=cli.train_step, default=[(2, 800, 1066), (2, 512, 683), (4, 320, 427)],
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
    p.add_argument("--tune", action="store_true",
                   help="only re-measure the fast-path thresholds for this machine and print them")
    p.add_argument("--tune-out", default=None, help="with --tune: write the thresholds to this JSON file")
    p.add_argument("--main-job", nargs="?", const="configs/shapes/mask_rcnn_r34_fpn.yaml", default=None,
                   metavar="CONFIG", help="only the main job's training step (its config, sizes, batch, dtype; "
                   "default: the config python tools/train.py runs) against torchvision's same model")
    p.add_argument("--main-job-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for --main-job, e.g. train.amp=none (float32)")
    p.add_argument("--rows-json", default=None, help=argparse.SUPPRESS)  # internal: the memory child's output
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    import resdet

    if args.threads:
        torch.set_num_threads(args.threads)  # before the first NNPACK call, which sizes its thread pool
    if args.tune:
        tune = bench("tune")
        table, rows = tune.tune_thresholds(iters=max(args.iters, 3))
        print(tune.format_tune_rows(rows, table))
        if args.tune_out:
            tune.write_thresholds(table, args.tune_out)
            print(f"wrote {args.tune_out}: use it with RESDET_FAST_PATHS_THRESHOLDS={args.tune_out}")
        return
    switch = contextlib.nullcontext()
    if args.no_fast_paths or args.no_winograd:
        switch = resdet.fast_paths(False, *(() if args.no_fast_paths else ("winograd",)))
    with switch:
        if args.main_job:
            _main_job(args)
        else:
            _run(args, argv)


def _main_job(args: argparse.Namespace) -> None:
    harness = bench("harness")
    rows = bench("main_job").bench_main_job(args.main_job, args.main_job_overrides, iters=args.iters,
                                            warmup=args.warmup, device=args.device)
    print(harness.format_rows(rows))
    print("\nratio = resdet / torchvision; < 1 means resdet is faster\n")
    print(harness.format_markdown(rows))


def _run(args: argparse.Namespace, argv: list[str]) -> None:
    import torch

    harness, cli = bench("harness"), bench("cli")
    child = args.rows_json is not None
    measure = tuple(args.measure)
    memory_rows = []
    if "memory" in measure and not child:
        memory_rows = cli.memory_rows_in_child(__file__, cli.without_measure(argv))
        measure = tuple(m for m in measure if m != "memory")
    if not child:
        print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, amp {args.amp}, "
              f"winograd {not (args.no_winograd or args.no_fast_paths)}, fast paths {not args.no_fast_paths}")
    gemm = None if child else harness.gemm_gflops(torch.device(args.device))
    rows = []
    for arch in args.arch:
        for depth in args.depth:
            new = harness.benchmark_pair(
                arch, depth, sizes=tuple(args.sizes), iters=args.iters, warmup=args.warmup, train=tuple(args.train),
                train_iters=args.train_iters, device=args.device, amp=args.amp, measure=measure,
            )
            if child:
                rows += [r for r in new if "mem" in r.metric]
                continue
            print(harness.format_rows(new), flush=True)
            rows += new
    if child:
        cli.write_rows(rows, args.rows_json)
        return
    rows += memory_rows
    if memory_rows:
        print(harness.format_rows(memory_rows), flush=True)
    if "roi_align" in measure:
        rows.append(harness.bench_multiscale_roi_align(device=args.device))
    print("\nratio = resdet / torchvision; < 1 means resdet is faster / smaller\n")
    print(harness.format_markdown(rows, gemm))
    if args.onnx:
        onnx = bench("onnx_runtime")
        for arch in args.arch:
            for depth in map(harness.normalize_depth, args.depth):
                for h, w in args.sizes:
                    rows = onnx.bench_onnxruntime(arch, depth, size=(h, w), iters=args.iters, warmup=args.warmup,
                                                  threads=args.threads)
                    title = f"\n{arch}_rcnn_{depth}_fpn {h}x{w} (ratio = runner / resdet pytorch)"
                    print(onnx.format_latency_rows(rows, title))


if __name__ == "__main__":
    main()
