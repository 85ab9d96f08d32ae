"""The reliability matrix (issue 21): every case a new user hit ends with the right result or one line naming
the file, annotation, key or rank and what was expected, and nothing already written is lost.

Signals during any checkpoint write (a second one 50 ms later included), metrics rows after a restart with
no checkpoint, compact masks on the inference path, refusal of checkpoints that lack the model's heads,
undefined metrics, interrupted shapes generation, infer outputs with one stem, COCO polygons and RLEs, ONNX
files, opsets, a full disk, an output folder that is a file, typed keys an architecture ignores, and the
shipped schedules at ``solver.max_iter=100``. (A signal that reaches one DDP rank during an evaluation:
tests/test_engine_ddp.py; ``kill -9`` at every stage: tests/reliability_soak.py.)
"""
from __future__ import annotations

import io
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resdet.config import config_to_dict, load_config
from resdet.engine import checkpoint as ckpt_mod
from resdet.engine.checkpoint import CheckpointManager
from resdet.engine.cli import final_line, run_guarded
from resdet.engine.trainer import Trainer

from helpers import load_tool
from reliability_soak import TINY

SHAPES = "configs/shapes/mask_rcnn_r34_fpn.yaml"


def _cfg(root, out, *overrides):
    return load_config(SHAPES, [*TINY, f"data.root={root}", f"train.output_dir={out}", "data.shapes.num_train=4",
                                "data.shapes.num_val=2", "eval.evaluator=none", "solver.steps=[]",
                                "solver.warmup_iters=0", "train.log_period=1", "train.amp=none", *overrides])


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A resdet checkpoint of a tiny random Mask R-CNN that scores every box, with a label space of
    non-contiguous category ids (no training: inference only needs weights, config and labels)."""
    import resdet
    from resdet.models import build_model

    folder = tmp_path_factory.mktemp("ckpt")
    cfg = _cfg(folder / "shapes", folder, "model.box_score_thresh=0.0")
    names = ["circle", "square", "triangle", "cross"]
    state = {"resdet": resdet.__version__, "model": build_model(cfg).state_dict(), "config": config_to_dict(cfg),
             "class_names": names, "label_space": {"cat_ids": [5, 17, 88, 90], "class_names": names}}
    torch.save(state, folder / "model_final.pth")
    return folder / "model_final.pth"


# ------------------------------------------------------------------------------- signals while writing
class _SignallingFile(io.FileIO):
    """A checkpoint file that sends this process ``signum`` after its first write (a second one 50 ms
    later with ``twice``), from inside torch.save's zip writer, midway through the file: where an
    unprotected write broke (``RuntimeError: ... unexpected pos``)."""

    signum, twice, target = signal.SIGTERM, False, ""

    def write(self, data):
        written = super().write(data)
        if os.path.basename(self.name) == self.target:
            type(self).target = ""  # once
            os.kill(os.getpid(), self.signum)
            if self.twice:
                time.sleep(0.05)
                os.kill(os.getpid(), self.signum)
        return written


@pytest.mark.parametrize("name, signum, twice", [
    ("model_final", signal.SIGINT, False),
    ("model_final", signal.SIGTERM, True),  # a second signal 50 ms later
    ("model_0000001", signal.SIGTERM, True),  # a periodic checkpoint during training
])
def test_signal_during_a_checkpoint_write_ends_with_one_line(shapes_root, tmp_path, monkeypatch, capsys, name,
                                                             signum, twice):
    out = tmp_path / "run"
    cfg = _cfg(shapes_root, out, f"solver.max_iter={1 if name == 'model_final' else 2}",
               "train.checkpoint_period=1")
    trainer = Trainer(cfg)
    _SignallingFile.signum, _SignallingFile.twice, _SignallingFile.target = signum, twice, f"{name}.pth.tmp"
    monkeypatch.setattr(ckpt_mod, "open", lambda path, mode="r": _SignallingFile(path, mode.replace("b", ""))
                        if "b" in mode else open(path, mode), raising=False)
    rc = run_guarded(lambda: trainer.train() and 0)
    line = _one_line(capsys.readouterr().err)
    assert rc == 128 + signum and signal.Signals(signum).name in line
    assert not list(out.glob("*.tmp"))  # no partial file
    for path in out.glob("model_*.pth"):  # every file there is complete
        assert "model" in CheckpointManager.load(path)
    if name == "model_final":
        assert "writing of model_final.pth" in line and "model_0000001.pth" in line
        assert CheckpointManager.load(out / "model_0000001.pth", resumable=True)["iteration"] == 1
    else:  # the write completed, training stopped at the next step with a checkpoint
        assert "model_0000002.pth" in line
        assert CheckpointManager.load(out / "model_0000001.pth", resumable=True)["iteration"] == 1
        assert CheckpointManager.load(out / "model_0000002.pth", resumable=True)["iteration"] == 2
    assert signal.getsignal(signal.SIGTERM) is not trainer._on_signal  # handlers restored


def test_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_checkpoint(tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    from resdet.engine.logger import MetricsWriter

    manager = CheckpointManager(tmp_path)
    manager.save({"model": {"w": torch.zeros(3)}, "iteration": 1}, "model_0000001")
    (tmp_path / "model_0000002.pth.tmp").symlink_to("/dev/full")  # every write there: ENOSPC
    rc = run_guarded(lambda: manager.save({"model": {"w": torch.zeros(10000)}, "iteration": 2}, "model_0000002"))
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "No space left on device" in line and "model_0000002.pth" in line
    assert manager.latest().name == "model_0000001.pth" and not list(tmp_path.glob("*.tmp"))
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.path.symlink_to("/dev/full")
    rc = run_guarded(lambda: writer.write(1, {"loss": 1.0}))
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and line.endswith(f"No space left on device: '{writer.path}' (--debug shows the traceback)")


# ------------------------------------------------------------------------------------ metrics.jsonl
class _Killed(BaseException):
    """Stands for kill -9: nothing after it runs in the trainer (no checkpoint, no cleanup of rows)."""


def test_restart_before_the_first_checkpoint_logs_each_iteration_once(shapes_root, tmp_path):
    cfg = _cfg(shapes_root, tmp_path, "solver.max_iter=3", "train.checkpoint_period=0")
    trainer = Trainer(cfg)
    write = trainer.writer.write

    def write_then_die(iteration, metrics, **kwargs):
        write(iteration, metrics, **kwargs)
        if iteration == 2:
            raise _Killed

    trainer.writer.write = write_then_die
    with pytest.raises(_Killed):
        trainer.train()
    assert [r["iteration"] for r in _rows(tmp_path)] == [1, 2] and not list(tmp_path.glob("model_*.pth"))
    resumed = Trainer(cfg, resume=True)  # --resume finds no checkpoint: starts over, the old rows go
    assert resumed.iteration == 0
    resumed.train()
    rows = _rows(tmp_path)
    assert [r["iteration"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["kind"] for r in rows].count("train_end") == 1


# --------------------------------------------------------------------------------- compact masks
def test_compact_masks_option_and_the_infer_path_without_full_size_masks(checkpoint, tmp_path, monkeypatch):
    from resdet.engine import visualize
    from resdet.engine.inference import config_for_checkpoint, load_model
    from resdet.layers import mask_paste

    model, _ = load_model(config_for_checkpoint(checkpoint, None), checkpoint, device=torch.device("cpu"))
    image = torch.rand(3, 50, 70)
    with torch.no_grad():
        full = model([image])[0]
        model.transform.paste_masks = False
        compact = model([image])[0]
        model.transform.paste_masks = True
    assert len(full["masks"]) > 0 and full["masks"].shape[-2:] == (50, 70)  # torchvision's contract by default
    assert compact["masks"].shape[-2:] == (28, 28) and torch.equal(compact["boxes"], full["boxes"])
    assert torch.equal(mask_paste.paste_masks(compact["masks"], compact["boxes"], (50, 70)), full["masks"])

    folder = tmp_path / "images"
    folder.mkdir()
    picture = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(folder / "000000.png")
    Image.fromarray(picture).save(folder / "000000.jpg", quality=95)
    files, _ = visualize.list_images([folder])
    space = {1: 5, 2: 17, 3: 88, 4: 90}
    with monkeypatch.context() as patch:  # the reference: full-size masks, as before
        patch.setattr(visualize, "_compact_masks", lambda model: _yield(False))
        reference, _ = visualize.predict_files(model, files, tmp_path / "full", device=torch.device("cpu"),
                                               score_thresh=0.0, label_to_cat_id=space)
    monkeypatch.setattr(mask_paste, "paste_masks", _forbidden)  # the infer path never pastes full size
    results, _ = visualize.predict_files(model, files, tmp_path / "compact", device=torch.device("cpu"),
                                         score_thresh=0.0, label_to_cat_id=space)
    assert [r["output"] for r in results] == [str(tmp_path / "compact" / n) for n in ("000000_jpg.png",
                                                                                       "000000_png.png")]
    for a, b in zip(results, reference):  # same RLEs, same drawings
        assert a["detections"] == b["detections"] and a["detections"]
        assert np.array_equal(np.asarray(Image.open(a["output"])), np.asarray(Image.open(b["output"])))
        assert {d["category_id"] for d in a["detections"]} <= {5, 17, 88, 90}
        assert all(d["category_id"] == space[d["label"]] for d in a["detections"])


def _yield(value):
    import contextlib

    return contextlib.nullcontext(value)


def _forbidden(*args, **kwargs):
    raise AssertionError("full-size masks pasted on the inference path")


def test_infer_tool_counts_what_it_wrote_for_files_sharing_a_stem(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for suffix in (".jpg", ".png"):
        Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(folder / f"000000{suffix}")
    assert load_tool("infer")(["--checkpoint", str(checkpoint), "--input", str(folder), "--output",
                               str(tmp_path / "out"), "--score-thresh", "0"]) == 0
    printed = capsys.readouterr().out
    drawn = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert drawn == ["000000_jpg.png", "000000_png.png"] and "2 images" in printed
    entries = json.load(open(tmp_path / "out" / "detections.json"))
    assert [Path(e["output"]).name for e in entries] == drawn
    assert all("category_id" in d for e in entries for d in e["detections"])


# ------------------------------------------------------------------------- checkpoints without heads
def test_checkpoints_lacking_the_models_parts_are_refused_by_test_and_infer(tmp_path, capsys):
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from resdet.engine.pretrained import load_pretrained
    from resdet.models import build_model

    imagenet = tmp_path / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), imagenet)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    # infer with no config: refused, not a default R50 with random heads
    assert load_tool("infer")(["--checkpoint", str(imagenet), "--input", str(image), "--output",
                               str(tmp_path / "out")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "resnet18_imagenet.pth" in line and "ImageNet backbone only" in line and "rpn" in line
    assert not (tmp_path / "out").exists()
    shapes = [*TINY, f"data.root={tmp_path / 'shapes'}", f"train.output_dir={tmp_path / 'test'}"]
    assert load_tool("test")(["--config", SHAPES, "--checkpoint", str(imagenet), *shapes]) == 1
    assert "ImageNet backbone only" in _one_line(capsys.readouterr().err)
    # torchvision's R50 under the shapes R34 config: refused as a resdet checkpoint of another depth is
    tv = MaskRCNN(resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5), num_classes=5)
    torch.save(tv.state_dict(), tmp_path / "tv_r50.pth")
    assert load_tool("test")(["--config", SHAPES, "--checkpoint", str(tmp_path / "tv_r50.pth"), *shapes[-2:]]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "tv_r50.pth" in line and "does not fit the model" in line and "layer1.0.conv1.weight" in line
    assert not (tmp_path / "shapes").exists()  # refused before any data was generated
    # fine-tuning through model.weights still loads what fits and reports the rest
    report = load_pretrained(build_model(load_config(SHAPES, [*TINY, "model.backbone=resnet18"])), imagenet)
    assert report.source == "imagenet_backbone" and report.loaded and report.unfilled


# ----------------------------------------------------------------------------- undefined metrics
def test_undefined_metrics_read_nan_never_zero():
    from pycocotools.coco import COCO

    from resdet.evaluation import COCOEvaluator, SemSegEvaluator, VOCEvaluator

    voc = VOCEvaluator(["cat", "dog"])
    voc.process([{"image_id": 1, "boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1]),
                  "difficult": torch.tensor([True])}],
                [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]),
                  "labels": torch.tensor([1])}])
    metrics = voc.evaluate()
    assert math.isnan(metrics["bbox/mAP50"]) and "no valid objects" in voc.summary()
    assert "bbox/mAP50=nan (no valid objects)" in final_line(metrics, "out")

    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "height": 20, "width": 20}], "annotations": [],
                  "categories": [{"id": 1, "name": "a"}]}
    gt.createIndex()
    coco = COCOEvaluator(gt, iou_types=("bbox",))
    coco.process([{"image_id": 1}], [{"boxes": torch.tensor([[1.0, 1, 5, 5]]), "scores": torch.tensor([0.5]),
                                      "labels": torch.tensor([1])}])
    metrics = coco.evaluate()
    assert math.isnan(metrics["bbox/AP"]) and "no valid objects" in coco.summary()
    gt.dataset["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16,
                                  "iscrowd": 0}]
    gt.createIndex()
    coco = COCOEvaluator(gt, iou_types=("bbox",))
    coco.process([{"image_id": 1}], [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                      "labels": torch.zeros(0, dtype=torch.int64)}])
    metrics = coco.evaluate()  # no detection against a real object: a defined 0, but no small/large objects
    assert metrics["bbox/AP"] == 0.0 and math.isnan(metrics["bbox/APl"])

    sem = SemSegEvaluator(3)
    sem.process([{"sem_seg": torch.full((4, 4), 255)}], [{"sem_seg": torch.zeros(4, 4, dtype=torch.int64)}])
    metrics = sem.evaluate()
    assert math.isnan(metrics["mIoU"]) and "mIoU=nan (no valid objects)" in final_line(metrics, "out")


# --------------------------------------------------------------------------------------- data files
def test_interrupted_shapes_generation_is_detected_and_redone(tmp_path, caplog):
    from resdet.data import shapes

    root = tmp_path / "shapes"
    options = dict(num_train=2, num_val=1, image_size=32)
    shapes.generate(str(root), **options)
    meta = root / "shapes_meta.json"
    meta.write_text(meta.read_text()[:20])  # generation killed while writing it
    image = root / "images" / "train" / "000001.jpg"
    expected = image.read_bytes()
    image.unlink()
    with caplog.at_level("WARNING", logger="resdet.data"):
        shapes.generate(str(root), **options)
    assert str(meta) in caplog.text and "unreadable" in caplog.text
    assert json.loads(meta.read_text())["num_train"] == 2 and image.read_bytes() == expected
    image.unlink()  # images missing under a complete meta file
    caplog.clear()
    with caplog.at_level("WARNING", logger="resdet.data"):
        shapes.generate(str(root), **options)
    assert "missing" in caplog.text and "000001.jpg" in caplog.text and image.read_bytes() == expected
    assert len(shapes.ShapesDataset(str(root), "train")) == 2


def _coco_json(tmp_path, annotations):
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in (1, 2):
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / f"{i}.png")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.png", "height": 20, "width": 30}
                                          for i in (1, 2)],
                               "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}))
    return str(tmp_path / "img"), str(ann)


def test_coco_polygons_of_fewer_than_3_points_are_counted_and_the_evaluation_runs(tmp_path):
    from resdet.data import CocoDataset
    from resdet.evaluation import COCOEvaluator

    square = [2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]
    images, ann = _coco_json(tmp_path, [
        {"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0,
         "segmentation": [[2.0, 2.0, 12.0, 12.0]]},  # two points: pycocotools reads it as a box and fails
        {"id": 8, "image_id": 2, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0,
         "segmentation": [square, [5.0, 5.0]]},
    ])
    dataset = CocoDataset(images, ann)
    assert dataset.skipped["bad_polygon"] == 2 and "annotation ids 7, 8" in dataset.summary
    assert int(dataset[0][1]["masks"].sum()) == 100  # no polygon left: the filled box, as before
    evaluator = COCOEvaluator(dataset.coco, iou_types=("bbox", "segm"))
    for image_id in (1, 2):
        masks = torch.zeros(1, 1, 20, 30)
        masks[0, 0, 2:12, 2:12] = 1.0
        evaluator.process([{"image_id": image_id}], [{"boxes": torch.tensor([[2.0, 2, 12, 12]]), "masks": masks,
                                                       "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}])
    metrics = evaluator.evaluate()
    assert metrics["segm/AP"] > 0.9 and metrics["bbox/AP"] > 0.9


def test_coco_rle_of_the_wrong_size_names_the_annotation_and_image(tmp_path, capsys):
    from pycocotools import mask as mask_utils

    from resdet.data import CocoDataset

    rle = mask_utils.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))
    images, ann = _coco_json(tmp_path, [{"id": 42, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10],
                                         "area": 100, "iscrowd": 0,
                                         "segmentation": {"size": [10, 10], "counts": rle["counts"].decode()}}])
    with pytest.raises(ValueError, match=r"annotation id 42 \(image id 2, '2.png'\).*size \[10, 10\].*\[20, 30\]"):
        CocoDataset(images, ann)
    rc = load_tool("train")(["data.dataset=coco", f"data.root={tmp_path}", "data.train_images=img",
                             f"data.train_ann={ann}", "data.val_images=img", f"data.val_ann={ann}",
                             f"train.output_dir={tmp_path / 'out'}", "model.num_classes=2"])
    assert rc == 1 and "annotation id 42" in _one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------ tools: one line each
@pytest.mark.parametrize("content", [None, b"\x08\x01 not a protobuf", "pth"])
def test_infer_onnx_on_a_missing_corrupt_or_pth_file_is_one_line(checkpoint, tmp_path, capsys, content):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    if content == "pth":
        path = checkpoint
    elif content is not None:
        path.write_bytes(content)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert load_tool("infer")(["--onnx", str(path), "--input", str(image), "--output", str(tmp_path / "o")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert str(path) in line and ("does not exist" if content is None else "not an ONNX model") in line


@pytest.mark.parametrize("opset", ["7", "99", "-1"])
def test_export_opset_out_of_range_is_one_line_before_tracing(tmp_path, capsys, opset):
    rc = load_tool("export")(["--checkpoint", str(tmp_path / "never_read.pth"), "--out", str(tmp_path / "m.onnx"),
                              "--opset", opset])
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert rc == 1 and f"--opset {opset}" in line and "11 to" in line and not captured.out


def test_output_dir_that_is_a_file_and_typed_keys_an_arch_ignores_are_one_line(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert load_tool("train")([*TINY, f"data.root={tmp_path / 'shapes'}", f"train.output_dir={taken}"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert str(taken) in line and "existing file" in line
    rc = load_tool("train")(["--config", "configs/shapes/semantic_fpn_r34.yaml", "model.rpn_post_nms_top_n_test=50",
                             f"data.root={tmp_path / 'shapes'}", f"train.output_dir={tmp_path / 'o'}"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "model.rpn_post_nms_top_n_test=50" in line and "semantic_fpn" in line
    assert not (tmp_path / "shapes").exists()  # refused before any data was generated


def test_shipped_schedules_scale_to_a_short_run():
    from resdet.engine.lr_schedule import resolve_schedule

    configs = sorted(str(p) for d in ("coco", "voc", "cityscapes") for p in Path("configs", d).glob("*.yaml"))
    assert len(configs) >= 16
    for path in configs:
        for max_iter in (100, load_config(path).solver.max_iter):
            s = load_config(path, [f"solver.max_iter={max_iter}"]).solver
            steps, warmup = resolve_schedule(max_iter=max_iter, steps=s.steps, warmup_iters=s.warmup_iters,
                                             schedule=s.schedule)
            assert all(0 < v < max_iter for v in steps) and 0 <= warmup < max_iter, path
    full = resolve_schedule(max_iter=90000, **{k: getattr(load_config("configs/coco/mask_rcnn_r50_fpn_1x.yaml").solver,
                                                                    k) for k in ("steps", "warmup_iters")})
    assert full == ((60000, 80000), 1000)  # the recipe's iterations at its own length
    s = load_config("configs/coco/mask_rcnn_r50_fpn_1x.yaml", ["solver.max_iter=100", "solver.steps=[150]"]).solver
    with pytest.raises(ValueError, match=r"solver.steps \[150\.?0?\] has \[150\]"):
        resolve_schedule(max_iter=100, steps=s.steps, warmup_iters=s.warmup_iters)
