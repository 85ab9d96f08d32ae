"""tools/benchmark.py and its harness (tools/bench/) run end to end on tiny settings (the numbers themselves are
not checked)."""
import ast
import json
import pathlib

import pytest
import torch

from resdet.layers import policy

from helpers import load_tool, load_tool_module

bench = load_tool_module("benchmark").bench
harness = bench("harness")


def test_benchmark_pair_smoke():
    rows = harness.benchmark_pair(
        "faster", "18", sizes=((64, 80),), iters=1, warmup=0, train=((1, 64, 80),),
        train_iters=1, measure=("infer", "train", "flops"),
        settings=dict(rpn_post_nms_top_n_test=50, rpn_post_nms_top_n_train=100, box_batch_size_per_image=32),
    )
    metrics = [r.metric for r in rows]
    assert metrics == [
        "params", "infer 64x80 as built", "infer 64x80 optimized", "infer GFLOPs 64x80", "train step b1 64x80"
    ]
    assert rows[0].ratio == 1.0  # same architecture, same parameter count
    assert abs(rows[3].ratio - 1.0) < 0.01  # same FLOPs
    assert "ratio" in harness.format_rows(rows)
    table = harness.format_markdown(rows, gemm=100.0)
    assert table.startswith("| model |") and "GFLOP/s" in table and "%" in table


def test_normalize_depth():
    assert harness.normalize_depth("34") == harness.normalize_depth("r34") == harness.normalize_depth("resnet34")
    assert harness.normalize_depth("resnext50_32x4d") == "resnext50_32x4d"


def test_benchmark_cli_times_here_and_measures_memory_in_a_child(capsys):
    load_tool("benchmark")(["--arch", "faster", "--depth", "18", "--sizes", "64x80", "--train", "--iters", "1",
                            "--warmup", "0", "--measure", "infer", "memory", "--threads", "2"])
    out = capsys.readouterr().out
    assert "| faster_rcnn_resnet18_fpn | infer 64x80 as built |" in out
    assert "| faster_rcnn_resnet18_fpn | infer peak mem 64x80 as built |" in out  # from the child process


def test_bench_multiscale_roi_align_small():
    row = harness.bench_multiscale_roi_align(num_rois=12, batch=2, image_size=(64, 96), channels=4, iters=1, warmup=0)
    assert row.resdet > 0 and row.torchvision > 0 and row.unit == "ms"
    assert row.extra["max_abs_out"] < 1e-4 and row.extra["max_abs_grad"] < 1e-4


def test_bench_onnxruntime_smoke():
    onnx = bench("onnx_runtime")
    rows = onnx.bench_onnxruntime("faster", "resnet18", size=(64, 80), iters=1, warmup=0, torchvision=False,
                                  settings=dict(rpn_post_nms_top_n_test=30))
    assert [r.runner for r in rows] == ["resdet pytorch", "resdet onnxruntime"]
    assert rows[0].ratio == 1.0 and rows[1].detections == rows[0].detections > 0
    assert "onnxruntime" in onnx.format_latency_rows(rows)


def test_tune_derives_thresholds_by_its_rules_and_resdet_reads_them(monkeypatch, tmp_path):
    tune = bench("tune")
    ratios = {}  # (kernel, N, C, H, W) -> ratio, made up: NNPACK wins from 128 channels on maps from 48x64 ...

    def fake_row(kernel, n, c, h, w, iters):
        if kernel == "nnpack":
            win = c >= 128 and h * w >= 48 * 64
        elif kernel == "nnpack grid":
            win = c >= 256 and n >= 32  # ... on grids from 256 channels and 32 RoIs ...
        else:
            win = c == 256  # ... and the weight gradient at 256 channels
        ratios[(kernel, n, c, h, w)] = 0.5 if win else 1.5
        return tune.TuneRow(kernel, (n, c, h, w), 0.5 if win else 1.5, 1.0)

    monkeypatch.setattr(tune, "_conv_row", fake_row)
    monkeypatch.setattr(policy, "nnpack_usable", lambda: True)
    table, rows = tune.tune_thresholds(iters=1)
    assert len(rows) == len(ratios) == 9 + 6 + 3
    assert (table.nnpack_min_channels, table.nnpack_min_pixels) == (128, 48 * 64)
    assert (table.grid_min_channels, table.grid_min_pixels, table.wgrad_channels) == (256, 32 * 196, 256)
    path = tmp_path / "thresholds.json"
    tune.write_thresholds(table, str(path))
    assert policy.load_thresholds(path) == table
    monkeypatch.setenv("RESDET_FAST_PATHS_THRESHOLDS", str(path))
    monkeypatch.setattr(policy, "_thresholds_from_env", False)
    try:
        assert policy.thresholds() == table
    finally:
        policy.set_thresholds(None)
    path.write_text(json.dumps({"nnpack_min_channel": 3}))
    with pytest.raises(ValueError, match="not a resdet thresholds file"):
        policy.load_thresholds(path)


def test_the_library_imports_no_benchmark_harness():
    """The harness is a tool (tools/bench/): nothing under resdet/ imports it or the old resdet.benchmark."""
    root = pathlib.Path(__file__).resolve().parents[1] / "resdet"
    assert not (root / "benchmark.py").exists()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "resdet.benchmark" or n.split(".")[0] in ("tools", "bench", "resdet_bench")
                           for n in names), (str(path), names)


def test_main_job_row_is_the_main_jobs_model_against_torchvisions_twin(capsys):
    main_job = bench("main_job")
    small = ["model.backbone=resnet18", "model.min_size=64", "model.max_size=64", "data.batch_size=1",
             "model.box_score_thresh=0.0", "train.amp=none"]
    cfg, rd, tv = main_job.build_main_job_pair(main_job.DEFAULT_CONFIG, small)
    assert cfg.model.options["fpn_out_channels"] == 128  # the main job's own (lighter) heads
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        ours, theirs = rd.eval()([image])[0], tv.eval()([image])[0]
    assert len(ours["boxes"]) == len(theirs["boxes"]) > 0
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ours["masks"], theirs["masks"], atol=1e-3, rtol=1e-4)
    load_tool("benchmark")(["--main-job", "--main-job-overrides", *small, "--iters", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "| mask_rcnn_resnet18_fpn | main job b1 64x64 float32 |" in out
