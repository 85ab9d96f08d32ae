"""The paths a user walks with the tools: semantic inference drawing, skipped files, 16-bit images, label
sizes, RLE masks, short schedules, progress lines without a bar, runs without evaluation, torchrun output,
and the CI script leaving the user's environment alone."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, SEMANTIC_CONFIG, detection_overrides, load_tool, semantic_overrides


def test_read_rgb_scales_16_bit_png(tmp_path):
    from resdet.engine.visualize import read_rgb

    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(tmp_path / "deep.png")
    image = read_rgb(tmp_path / "deep.png")
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    assert int(image.max()) == round(4000 * 255 / 65535)  # not clipped to white


def test_caption_size_follows_the_image():
    from resdet.engine.visualize import _font, draw_predictions

    small, large = _font(128, 128)[0], _font(2000, 2000)[0]
    assert small.size <= 10 and large.size >= 40
    image = torch.zeros(3, 128, 128, dtype=torch.uint8)
    out = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1]),
           "scores": torch.tensor([0.9])}
    drawn = draw_predictions(image, out, class_names=["circle"])
    covered = (drawn != 0).any(0).float().mean().item()
    assert covered < 0.2  # the caption no longer covers the picture


def test_semantic_names_add_background():
    from resdet.engine.visualize import semantic_class_names

    assert semantic_class_names(["a", "b"], 3) == ["background", "a", "b"]
    assert semantic_class_names(["x", "a", "b"], 3) == ["x", "a", "b"]
    assert semantic_class_names([], 2) == ["0", "1"]


def test_schedule_fractions_and_late_steps():
    from resdet.engine.lr_schedule import resolve_schedule

    assert resolve_schedule(max_iter=60, steps=[0.75, 0.9], warmup_iters=0.1) == ((45, 54), 6)
    assert resolve_schedule(max_iter=800, steps=[600, 750], warmup_iters=100) == ((600, 750), 100)
    with pytest.raises(ValueError, match=r"solver.steps .*beyond solver.max_iter=60.*warmup_iters=100"):
        resolve_schedule(max_iter=60, steps=[600, 750], warmup_iters=100)
    assert resolve_schedule(max_iter=60, steps=[600], warmup_iters=0, schedule="cosine") == ((), 0)


def test_short_run_with_long_schedule_is_one_line(tmp_path, capsys):
    rc = load_tool("train")(detection_overrides(tmp_path / "shapes") + [
        "solver.max_iter=60", "solver.steps=[600,750]", "solver.warmup_iters=100",
        f"train.output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "solver.max_iter=60" in err and "fractions" in err and len(err.strip().splitlines()) == 1


def test_semantic_train_test_infer_with_names(tmp_path, capsys):
    root, out = tmp_path / "shapes", tmp_path / "out"
    rc = load_tool("train")(["--config", SEMANTIC_CONFIG, *semantic_overrides(root, out), "solver.max_iter=2",
                         "solver.warmup_iters=1", "train.num_vis_images=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    table = printed[printed.rindex("class  "):]
    assert "background" in table and "circle" in table and "cross" in table
    assert list((out / "vis").glob("*.png"))

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    val = sorted((root / "images" / "val").iterdir())[0]
    (inputs / val.name).write_bytes(val.read_bytes())
    Image.fromarray(np.full((64, 64), 3000, np.uint16)).save(inputs / "deep16.png")
    (inputs / "notes.txt").write_text("not an image")
    (inputs / "broken.jpg").write_text("not a jpeg either")
    rc = load_tool("infer")(["--checkpoint", str(out / "model_final.pth"), "--input", str(inputs),
                         "--output", str(tmp_path / "infer")])
    captured = capsys.readouterr()
    assert rc == 0 and "skipped 1 non-image files and 1 undecodable images" in captured.out
    assert "broken.jpg" in captured.err and "Traceback" not in captured.err
    written = sorted(p.name for p in (tmp_path / "infer").glob("*.png"))
    assert written == sorted([val.stem + ".png", "deep16.png"])
    results = json.load(open(tmp_path / "infer" / "detections.json"))
    assert len(results) == 2
    for entry in results:
        assert set(entry["class_fractions"]) <= {"background", "circle", "square", "triangle", "cross"}
        assert abs(sum(entry["class_fractions"].values()) - 1) < 1e-3


def test_detections_json_has_rle_masks_and_progress_lines(tmp_path, capsys):
    from pycocotools import mask as mask_util

    root, out = tmp_path / "shapes", tmp_path / "out"
    rc = load_tool("train")(detection_overrides(root) + [
        "solver.max_iter=2", "solver.warmup_iters=1", "solver.steps=[]",
        "train.log_period=1", f"train.output_dir={out}", "train.num_vis_images=1",
        "train.progress_bar=false", "eval.vis_score_thresh=1.01",
        "eval.iou_types=[bbox]"])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in (printed, (out / "log.txt").read_text()):
        assert "iter 1/2" in text and "iter 2/2" in text and "s/it" in text and "ETA" in text and "lr " in text
    assert "no prediction reached eval.vis_score_thresh=1.01" in printed
    rc = load_tool("infer")(["--checkpoint", str(out / "model_final.pth"), "--input", str(root / "images" / "val"),
                         "--output", str(tmp_path / "infer"), "--score-thresh", "0.0"])
    assert rc == 0
    capsys.readouterr()
    dets = [d for e in json.load(open(tmp_path / "infer" / "detections.json")) for d in e["detections"]]
    assert dets
    for d in dets:
        mask = mask_util.decode({"size": d["segmentation"]["size"], "counts": d["segmentation"]["counts"].encode()})
        assert mask.shape == (64, 64)


def test_no_evaluator_has_no_empty_final_line(tmp_path, capsys):
    rc = load_tool("train")(detection_overrides(tmp_path / "shapes") + [
        "solver.max_iter=1", "solver.warmup_iters=0", "solver.steps=[]",
        f"train.output_dir={tmp_path / 'o'}", "eval.evaluator=none",
        "train.progress_bar=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "final: ;" not in printed and "no evaluation" in printed


def test_only_rank_zero_prints_and_writes_json(tmp_path, capsys, monkeypatch):
    """Rank 1 of a torchrun job: the rank is read while the process group exists (after it is destroyed,
    every process would call itself rank 0)."""
    from resdet.engine import distributed as dist
    from resdet.engine import inference

    state = {"rank": 1}
    monkeypatch.setattr(dist, "get_rank", lambda: state["rank"])
    monkeypatch.setattr(dist, "destroy_distributed", lambda: state.update(rank=0))
    monkeypatch.setattr(inference, "config_for_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr(inference, "evaluate_checkpoint", lambda cfg, ckpt: ({"mIoU": 0.5}, "SUMMARY TABLE"))
    rc = load_tool("test")(["--checkpoint", "x.pth", "--json", str(tmp_path / "m.json")])
    assert rc == 0 and "SUMMARY TABLE" not in capsys.readouterr().out
    assert not (tmp_path / "m.json").exists()


def test_ci_script_keeps_the_users_venv(tmp_path):
    """.ci/run in a copy of the repository with stand-in python3/pip/pytest: the user's .venv survives,
    the README's install and test commands run in a venv of its own, pytest's exit code comes out."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / ".ci" / "run").write_text(open(os.path.join(REPO, ".ci", "run")).read())
    (repo / ".venv").mkdir()
    (repo / ".venv" / "mine").write_text("user's environment")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # python3 -m venv DIR: create DIR/bin/{pip,python} that log their arguments; python exits 3 for pytest
    (bin_dir / "python3").write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\necho "pip $*" >> {log}\\n' > "$3/bin/pip"
  printf '#!/bin/sh\\necho "python $*" >> {log}\\nexit 3\\n' > "$3/bin/python"
  chmod +x "$3/bin/pip" "$3/bin/python"
  echo "venv $3" >> {log}
fi
""")
    (bin_dir / "python3").chmod(0o755)
    proc = subprocess.run(["bash", str(repo / ".ci" / "run")], env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert (repo / ".venv" / "mine").read_text() == "user's environment"
    calls = log.read_text().splitlines()
    assert calls[0].startswith("venv ") and ".venv" not in calls[0].split()[-1].split("/")
    assert calls[1] == 'pip install -e .[test]' and calls[2] == "python -m pytest -q tests"
