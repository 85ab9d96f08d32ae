"""resdet.benchmark runs end to end on a tiny setting (the numbers themselves are not checked)."""
from resdet.benchmark import benchmark_pair, format_markdown, format_rows, normalize_depth


def test_benchmark_pair_smoke():
    rows = benchmark_pair(
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
    assert "ratio" in format_rows(rows)
    table = format_markdown(rows, gemm=100.0)
    assert table.startswith("| model |") and "GFLOP/s" in table and "%" in table


def test_normalize_depth():
    assert normalize_depth("34") == normalize_depth("r34") == normalize_depth("resnet34") == "resnet34"
    assert normalize_depth("resnext50_32x4d") == "resnext50_32x4d"


def test_benchmark_cli_times_here_and_measures_memory_in_a_child(capsys):
    from tool_loader import load_tool

    load_tool("benchmark")(["--arch", "faster", "--depth", "18", "--sizes", "64x80", "--train", "--iters", "1", "--warmup", "0",
               "--measure", "infer", "memory", "--threads", "2"])
    out = capsys.readouterr().out
    assert "| faster_rcnn_resnet18_fpn | infer 64x80 as built |" in out
    assert "| faster_rcnn_resnet18_fpn | infer peak mem 64x80 as built |" in out  # from the child process
