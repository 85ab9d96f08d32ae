#!/usr/bin/env python
"""Reliability measurements too long for the test suite (the README's crash-safety figures come from here).

    python tests/reliability_soak.py kill --kills 12      # kill -9 a training run again and again, resume each
                                                          # time; compare with an uninterrupted run
    python tests/reliability_soak.py signal --tries 8     # SIGINT/SIGTERM (and a second one 50 ms later) while
                                                          # model_final.pth is being written
    python tests/reliability_soak.py memory --size 8000   # peak RSS of tools/infer.py on one huge image

``kill``: the same tiny Mask R-CNN run (shapes data, 24 iterations, a checkpoint every 6, a COCO evaluation at
the end) is run once without interruption, then again under ``--resume`` while being killed with SIGKILL at
chosen moments: during start-up, after a random iteration before the first checkpoint, after random later
iterations, and during the final evaluation. It checks that ``metrics.jsonl`` holds every iteration once with
the uninterrupted run's losses, and that ``model_final.pth`` equals the uninterrupted one tensor for tensor.

``signal``: the demo config's R34 model (a checkpoint of about 180 MB, so that a write lasts long enough to be
hit) trained for one iteration; the signal is sent as soon as ``model_final.pth.tmp`` appears. Counts the runs
that ended with exit code 130/143, one line on stderr, the previous checkpoint intact and no partial file.

``memory``: a random-weight checkpoint scoring every box (``model.box_score_thresh=0``: 100 detections with
masks) run by ``tools/infer.py`` in a child process on one SIZE×SIZE image; prints the child's peak RSS.
``--repo DIR`` runs another checkout's tools/infer.py (e.g. the previous commit) for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/shapes/mask_rcnn_r34_fpn.yaml")
TINY = ["data.shapes.num_train=8", "data.shapes.num_val=4", "data.shapes.image_size=64", "data.batch_size=2",
        "data.test_batch_size=2", "data.num_workers=0", "model.backbone=resnet18", "model.min_size=64",
        "model.max_size=64", "model.rpn_pre_nms_top_n_train=100", "model.rpn_post_nms_top_n_train=50",
        "model.rpn_pre_nms_top_n_test=50", "model.rpn_post_nms_top_n_test=20", "model.box_batch_size_per_image=16",
        "model.options={fpn_out_channels: 32, box_representation_size: 64, mask_layers: [32], "
        "mask_predictor_channels: 32}", "solver.lr=0.01", "train.progress_bar=false", "train.num_vis_images=0"]


def _env() -> dict[str, str]:
    path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _train_cmd(root: Path, out: Path, extra: list[str], resume: bool = True) -> list[str]:
    return [sys.executable, str(REPO / "tools/train.py"), "--config", CONFIG, *(["--resume"] if resume else []),
            *TINY, f"data.root={root}", f"train.output_dir={out}", *extra]


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _kill_when(proc: subprocess.Popen, out: Path, event: tuple[str, float]) -> str:
    """SIGKILL ``proc`` at ``event``: ("time", seconds after start), ("iteration", n: once n is logged) or
    ("eval", delay: that long after the last training row). Returns what happened."""
    kind, value = event
    start, wall = time.monotonic(), time.time()
    while proc.poll() is None:
        rows = [r for r in _rows(out) if r.get("kind") == "train" and r["time"] >= wall]  # this process's rows
        done = max((r["iteration"] for r in rows), default=0)
        if (kind == "time" and time.monotonic() - start >= value) or (kind == "iteration" and done >= value):
            proc.kill()
            proc.wait()
            return f"killed at {time.monotonic() - start:.1f} s, iteration {done} logged"
        if kind == "eval" and done >= value:
            time.sleep(random.uniform(0.0, 0.6))
            proc.kill()
            proc.wait()
            return f"killed after the last iteration ({time.monotonic() - start:.1f} s), in the final stage"
        time.sleep(0.01)
    return f"finished before the kill (exit {proc.returncode})"


def soak_kill(args: argparse.Namespace) -> int:
    import torch

    work = Path(tempfile.mkdtemp(prefix="resdet_soak_"))
    root, ref, run = work / "shapes", work / "ref", work / "run"
    max_iter, period = 24, 6
    extra = [f"solver.max_iter={max_iter}", "solver.steps=[0.75]", "solver.warmup_iters=0.1",
             f"train.checkpoint_period={period}", "train.log_period=1", "eval.iou_types=[bbox,segm]"]
    t0 = time.monotonic()
    subprocess.run(_train_cmd(root, ref, extra, resume=False), env=_env(), check=True, capture_output=True)
    print(f"uninterrupted run: {time.monotonic() - t0:.0f} s")
    rng = random.Random(args.seed)
    events = [("time", rng.uniform(0.5, 3.0)), ("iteration", rng.randint(1, period - 1)),
              ("iteration", rng.randint(1, period - 1))]  # the first two: no checkpoint exists yet
    while len(events) < args.kills - 1:
        events.append(("iteration", rng.randint(1, max_iter - 1)))
    events.sort(key=lambda e: (e[0] != "time", e[1]))
    events.append(("eval", max_iter))
    kills = 0
    for event in events:
        proc = subprocess.Popen(_train_cmd(root, run, extra), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        what = _kill_when(proc, run, event)
        kills += what.startswith("killed")
        newest = sorted(p.name for p in run.glob("model_0*.pth"))
        print(f"{event}: {what}; checkpoints {newest}")
    final = subprocess.run(_train_cmd(root, run, extra), env=_env(), capture_output=True, text=True)
    print(f"final resumed run: exit {final.returncode}; {final.stdout.strip().splitlines()[-1:]}")
    rows = _rows(run)
    train = [r["iteration"] for r in rows if r["kind"] == "train"]
    evals = [r["iteration"] for r in rows if r["kind"] == "eval"]
    ref_rows = {r["iteration"]: r["loss"] for r in _rows(ref) if r["kind"] == "train"}
    same_losses = all(r["loss"] == ref_rows.get(r["iteration"]) for r in rows if r["kind"] == "train")
    a = torch.load(ref / "model_final.pth", weights_only=True)["model"]
    b = torch.load(run / "model_final.pth", weights_only=True)["model"]
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ok = (final.returncode == 0 and train == list(range(1, max_iter + 1)) and evals == [max_iter] and same_losses
          and identical)
    print(f"{kills} kills; metrics.jsonl: {len(train)} training rows for {max_iter} iterations "
          f"(duplicates: {len(train) - len(set(train))}), eval rows {evals}; losses equal to the uninterrupted "
          f"run: {same_losses}; model_final.pth identical: {identical} ({len(a)} tensors)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def soak_signal(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="resdet_signal_"))
    root = work / "shapes"
    extra = ["data.shapes.num_train=4", "data.shapes.num_val=2", "data.batch_size=2", "data.num_workers=0",
             "solver.max_iter=1", "solver.steps=[]", "solver.warmup_iters=0", "train.checkpoint_period=0",
             "train.progress_bar=false", "train.num_vis_images=0", "eval.iou_types=[bbox]",
             "model.rpn_post_nms_top_n_test=20"]
    clean = 0
    for i in range(args.tries):
        out = work / f"run{i}"
        double = i % 2 == 1
        signum = (signal.SIGINT, signal.SIGTERM)[(i // 2) % 2]
        cmd = [sys.executable, str(REPO / "tools/train.py"), f"data.root={root}", f"train.output_dir={out}", *extra]
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        hit = False
        while proc.poll() is None:
            if (out / "model_final.pth.tmp").exists():
                proc.send_signal(signum)
                if double:
                    time.sleep(0.05)
                    proc.send_signal(signum)
                hit = True
                break
            time.sleep(0.002)
        _, err = proc.communicate()
        lines = err.strip().splitlines()
        periodic = out / "model_0000001.pth"
        intact = periodic.is_file() and periodic.stat().st_size > 0
        partial = list(out.glob("*.tmp"))
        good = proc.returncode in (130, 143) and len(lines) >= 1 and "Traceback" not in err and intact and not partial
        clean += good and hit
        print(f"try {i}: {signum.name}{' x2 (50 ms)' if double else ''} during the write: {hit}; exit "
              f"{proc.returncode}; last line {lines[-1] if lines else ''!r}; previous checkpoint intact {intact}; "
              f"partial files {[p.name for p in partial]}")
    print(f"{clean} of {args.tries} tries clean (hit during the write, exit 130/143, one line, nothing lost)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if clean == args.tries else 1


_PEAK_WRAPPER = """
import runpy, sys
out, sys.argv = sys.argv[1], sys.argv[2:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code or 0
peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
open(out, "w").write(peak)
sys.exit(code)
"""


def soak_memory(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="resdet_memory_"))
    out = work / "ckpt"
    subprocess.run(_train_cmd(work / "shapes", out, ["solver.max_iter=1", "solver.steps=[]", "solver.warmup_iters=0",
                                                      "eval.evaluator=none"], resume=False),
                   env=_env(), check=True, capture_output=True)
    images = work / "images"
    images.mkdir()
    ramp = (np.arange(args.size, dtype=np.int64) * 255 // args.size).astype(np.uint8)
    picture = np.empty((args.size, args.size, 3), dtype=np.uint8)
    picture[..., 0], picture[..., 1] = ramp[None, :], ramp[:, None]
    picture[..., 2] = (ramp[None, :].astype(np.uint16) + ramp[:, None]) % 256
    Image.fromarray(picture).save(images / "huge.jpg", quality=90)
    del picture
    repo = Path(args.repo).resolve() if args.repo else REPO
    env = {**_env(), "PYTHONPATH": str(repo)}
    tool = [str(repo / "tools/infer.py"), "--checkpoint", str(out / "model_final.pth"), "--input", str(images),
            "--output", str(work / "infer"), "--score-thresh", "0", "model.box_score_thresh=0.0",
            "model.rpn_post_nms_top_n_test=1000", "model.box_detections_per_img=100"]
    # The child reports its own VmHWM: getrusage's ru_maxrss of a child counts the parent's peak at fork.
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, str(work / "peak.txt"), *tool], env=env, cwd=repo,
                          capture_output=True, text=True)
    said = (proc.stderr.strip().splitlines() if proc.returncode else proc.stdout.strip().splitlines())[-3:]
    print(f"{repo}: exit {proc.returncode} in {time.monotonic() - start:.0f} s; {said}")
    peak_kib = int((work / "peak.txt").read_text())
    print(f"peak RSS of tools/infer.py on one {args.size}x{args.size} image: {peak_kib / 2**20:.2f} GiB "
          f"({peak_kib * 1024 / 1e9:.2f} GB)")
    rc = proc.returncode
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    kill = sub.add_parser("kill")
    kill.add_argument("--kills", type=int, default=12)
    kill.add_argument("--seed", type=int, default=0)
    sig = sub.add_parser("signal")
    sig.add_argument("--tries", type=int, default=8)
    mem = sub.add_parser("memory")
    mem.add_argument("--size", type=int, default=8000)
    mem.add_argument("--repo", default=None, help="checkout whose tools/infer.py to run (default: this one)")
    for p in (kill, sig, mem):
        p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    return {"kill": soak_kill, "signal": soak_signal, "memory": soak_memory}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
