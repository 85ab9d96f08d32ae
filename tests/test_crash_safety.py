"""What survives a crash and what a bad file does: weights_only loading (a crafted pickle never runs),
one-line errors naming the file, resume fallback, leftover *.tmp cleanup, metrics without redone rows,
signals during the final evaluation, learning rate changed on resume, weights-only final/best files."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from resdet.engine.checkpoint import CheckpointError, CheckpointManager, load_model_state
from resdet.engine.trainer import Trainer, TrainingInterrupted

from helpers import load_tool, tiny_cfg


class _Evil:
    """Pickles into a call of os.mkdir(marker): loading it with weights_only=False would run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def trained(shapes_root, tmp_path_factory):
    """A finished 2-iteration run with checkpoints at 1 and 2 and a final COCO evaluation."""
    out = tmp_path_factory.mktemp("trained")
    Trainer(tiny_cfg(shapes_root, out, "solver.max_iter=2", "solver.steps=[]", "solver.warmup_iters=1",
                     "train.checkpoint_period=1", "eval.iou_types=[bbox]", "train.best_metric=bbox/AP")).train()
    return out


# ------------------------------------------------------------------------------------- unsafe files
def test_malicious_pickle_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"resdet": "0", "model": {"w": torch.zeros(1)}, "payload": _Evil(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        CheckpointManager.load(evil)
    from resdet.engine.pretrained import read_state_dict

    with pytest.raises(CheckpointError, match="evil.pth"):
        read_state_dict(evil)
    for tool in ("test", "infer"):
        args = ["--checkpoint", str(evil)] + (["--input", str(tmp_path)] if tool == "infer" else [])
        assert load_tool(tool)(args) == 1
        err = capsys.readouterr().err
        assert "evil.pth" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    rc = load_tool("train")(["model.weights=" + str(evil), f"train.output_dir={tmp_path / 'o'}",
                         f"data.root={tmp_path / 'shapes'}", "data.shapes.num_train=2", "data.shapes.num_val=1",
                         "data.shapes.image_size=64"])
    assert rc == 1 and "evil.pth" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("content, words", [(b"", "empty"), (b"PK\x03\x04 not a zip", "corrupt"),
                                            (None, "truncated or corrupt")])
def test_bad_checkpoint_files_give_one_line(trained, tmp_path, capsys, content, words):
    bad = tmp_path / "bad.pth"
    if content is None:  # a real checkpoint cut in half
        data = (trained / "model_final.pth").read_bytes()
        content = data[: len(data) // 2]
    bad.write_bytes(content)
    assert load_tool("test")(["--checkpoint", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert any(w in err for w in words.split(" or "))


def test_missing_checkpoint_and_resume_from_are_one_line(tmp_path, capsys):
    assert load_tool("test")(["--checkpoint", str(tmp_path / "nope.pth")]) == 1
    assert "nope.pth" in capsys.readouterr().err
    rc = load_tool("train")(["--resume-from", str(tmp_path / "gone.pth"), f"train.output_dir={tmp_path / 'o'}",
                         f"data.root={tmp_path / 'shapes'}", "data.shapes.num_train=2", "data.shapes.num_val=1",
                         "data.shapes.image_size=64"])
    err = capsys.readouterr().err
    assert rc == 1 and "gone.pth" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_malformed_coco_json_is_one_line(tmp_path, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text("{not json")
    (tmp_path / "img").mkdir()
    rc = load_tool("train")([f"data.root={tmp_path}", "data.dataset=coco", "data.train_images=img",
                         f"data.train_ann={ann}", f"train.output_dir={tmp_path / 'o'}", "model.backbone=resnet18"])
    err = capsys.readouterr().err
    assert rc == 1 and "ann.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # --debug shows the traceback instead
    with pytest.raises(ValueError):
        load_tool("train")([f"data.root={tmp_path}", "data.dataset=coco", "data.train_images=img",
                        f"data.train_ann={ann}", f"train.output_dir={tmp_path / 'o'}", "--debug"])


@pytest.mark.parametrize("change, words", [
    (["model.arch=faster_rcnn", "model.options={fpn_out_channels: 32, box_representation_size: 64}"],
     "faster_rcnn resnet18"),
    (["model.backbone=resnet34"], "resnet34"),
    (["model.num_classes=3"], "num_classes=3"),
])
def test_wrong_architecture_names_file_and_difference(trained, shapes_root, tmp_path, change, words):
    from resdet.config import config_to_dict
    from resdet.models import build_model

    cfg = tiny_cfg(shapes_root, tmp_path, *change)
    state = CheckpointManager.load(trained / "model_final.pth")
    with pytest.raises(CheckpointError, match="model_final.pth") as err:
        load_model_state(build_model(cfg), state["model"], trained / "model_final.pth",
                         stored_config=state["config"], config=config_to_dict(cfg))
    assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="differ in shape|missing|lacks"):  # no stored config: the keys tell
        load_model_state(build_model(cfg), state["model"], trained / "model_final.pth")


# ---------------------------------------------------------------------------------- files on disk
def test_final_and_best_hold_weights_once(trained):
    final = torch.load(trained / "model_final.pth", weights_only=True)
    assert "optimizer" not in final and "rng" not in final and final["class_names"]
    resumable = torch.load(trained / "model_0000002.pth", weights_only=True)
    assert "optimizer" in resumable and "rng" in resumable
    best = trained / "model_best.pth"  # the final model is the best: the same file, written once
    assert best.is_file() and os.path.samefile(best, trained / "model_final.pth")


def test_resume_falls_back_cleans_tmp_and_drops_redone_rows(trained, shapes_root, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    newest = out / "model_0000002.pth"
    newest.write_bytes(newest.read_bytes()[:1000])  # killed / corrupt newest checkpoint
    (out / "model_0000003.pth.tmp").write_bytes(b"partial")
    before = _rows(out)
    assert any(r["iteration"] == 2 for r in before)
    trainer = Trainer(tiny_cfg(shapes_root, out, "solver.max_iter=2", "solver.steps=[]", "solver.warmup_iters=1",
                               "train.checkpoint_period=1", "eval.iou_types=[bbox]", "train.num_vis_images=0"),
                      resume=True)
    assert trainer.iteration == 1
    assert not list(out.glob("*.tmp"))
    log = (out / "log.txt").read_text()
    assert "model_0000002.pth" in log and "falling back" in log and "model_0000003.pth.tmp" in log
    assert all(r["iteration"] <= 1 and (r["iteration"] < 1 or r["kind"] == "train") for r in _rows(out))
    trainer.train()
    keys = [(r["iteration"], r["kind"]) for r in _rows(out)]
    assert len(keys) == len(set(keys)) and (2, "eval") in keys


def test_signal_in_final_evaluation_saves_and_resume_reruns_it(trained, shapes_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_cfg(shapes_root, out, "solver.max_iter=1", "solver.steps=[]", "solver.warmup_iters=0",
                   "train.checkpoint_period=0", "eval.iou_types=[bbox]", "train.num_vis_images=0")
    trainer = Trainer(cfg)
    from resdet.engine import trainer as trainer_mod

    def killed_eval(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the evaluation")

    monkeypatch.setattr(trainer_mod, "evaluate_model", killed_eval)
    with pytest.raises(TrainingInterrupted, match="final evaluation") as err:
        trainer.train()
    assert err.value.signum == signal.SIGTERM and err.value.checkpoint.name == "model_0000001.pth"
    assert not (out / "model_final.pth").exists()
    monkeypatch.undo()
    resumed = Trainer(cfg, resume=True)
    assert resumed.iteration == 1
    metrics = resumed.train()
    assert "bbox/AP" in metrics and [r["kind"] for r in _rows(out)].count("eval") == 1


def test_sigint_during_final_evaluation_is_one_line_nonzero(trained, shapes_root, tmp_path, monkeypatch, capsys):
    from resdet.engine import trainer as trainer_mod
    from resdet.engine.cli import run_guarded

    def killed_eval(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal should have stopped the evaluation")

    monkeypatch.setattr(trainer_mod, "evaluate_model", killed_eval)
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    cfg = tiny_cfg(shapes_root, out, "solver.max_iter=2", "solver.steps=[]", "solver.warmup_iters=1",
                   "eval.iou_types=[bbox]", "train.num_vis_images=0")
    rc = run_guarded(lambda: Trainer(cfg, resume=True).train() and 0)
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGINT and "SIGINT" in err and "model_0000002.pth" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_changed_lr_on_resume_is_applied(trained, shapes_root, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "model_0000002.pth").unlink()
    (out / "last_checkpoint").unlink()
    trainer = Trainer(tiny_cfg(shapes_root, out, "solver.max_iter=2", "solver.steps=[]", "solver.warmup_iters=1",
                               "solver.lr=0.005", "train.checkpoint_period=1", "eval.evaluator=none"), resume=True)
    assert trainer.iteration == 1
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.005] * len(trainer.optimizer.param_groups)
    assert "solver.lr changed on resume" in (out / "log.txt").read_text()


def test_nan_pixels_name_the_image(shapes_root, tmp_path):
    trainer = Trainer(tiny_cfg(shapes_root, tmp_path, "eval.evaluator=none"))
    image = torch.zeros(3, 8, 8)
    image[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="image_id 7 .*NaN/inf"):
        trainer._forward([image], [{"image_id": torch.tensor(7)}], last_micro=True)
