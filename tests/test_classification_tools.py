"""Classification through the tools, as a user runs them: the shipped CIFAR-10 config on data written in the
real CIFAR-10 layout, the ImageNet config on an image folder tree, and bad input answered in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from resdet.data import write_cifar

from helpers import load_tool

TINY = ["solver.max_iter=4", "data.batch_size=8", "data.test_batch_size=8", "data.num_workers=0",
        "train.progress_bar=false", "train.num_vis_images=2", "train.checkpoint_period=0", "train.eval_period=0"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("cifar10")
    train = (rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.arange(40) % 10)
    test = (rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), np.arange(12) % 10)
    write_cifar(root, train=train, test=test, class_names=["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                           "frog", "horse", "ship", "truck"])
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(test[0][i]).save(images / f"{i}.png")
    return root


def test_cifar10_resnet20_train_test_infer(cifar_root, tmp_path, capsys):
    out = tmp_path / "out"
    rc = load_tool("train")(["--config", "configs/cifar10/resnet20.yaml", f"data.root={cifar_root}",
                             f"train.output_dir={out}", *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top-1 error" in printed and "per-class top-1 accuracy" in printed and "final: top1=" in printed
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and {"top1", "top5", "top1_error", "acc/airplane"} <= set(evals[-1])
    assert len(list((out / "vis").glob("*.png"))) == 2

    rc = load_tool("test")(["--checkpoint", str(out / "model_final.pth"), "--json", str(tmp_path / "m.json"),
                            f"train.output_dir={tmp_path / 'test'}"])
    assert rc == 0 and "top-1 error" in capsys.readouterr().out
    assert json.load(open(tmp_path / "m.json"))["top1"] == pytest.approx(evals[-1]["top1"])

    rc = load_tool("infer")(["--checkpoint", str(out / "model_final.pth"), "--input", str(cifar_root / "images"),
                             "--output", str(tmp_path / "infer")])
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.endswith(tuple("0123456789"))]
    assert len(lines) == 3 and lines[0].count(",") == 4  # "file: class score, ... (five classes)"
    results = json.load(open(tmp_path / "infer" / "detections.json"))
    assert [len(r["top5"]) for r in results] == [5, 5, 5]
    assert results[0]["top5"][0]["class"] in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                              "horse", "ship", "truck")


def _tree(root, classes=("ant", "bee", "cat"), per_class=3):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = (36 + 4 * i, 40)  # varied sizes: training crops them, evaluation resizes and crops
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def test_image_folder_with_the_imagenet_config(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    _tree(root)
    (root / "train" / "ant" / "Thumbs.db").write_bytes(b"\x00")
    rc = load_tool("train")(["--config", "configs/imagenet/resnet50.yaml", f"data.root={root}",
                             f"train.output_dir={out}",
                             "model.backbone=cifar_resnet20", "model.num_classes=3", "data.classification.crop_size=32",
                             "model.options.resize_size=36", "model.options.crop_size=32", "data.batch_size=4",
                             *TINY[1:], "solver.max_iter=3"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "top-1 error" in captured.out and "ant" in captured.out


def test_bad_input_is_one_line(cifar_root, tmp_path, capsys):
    train = load_tool("train")
    # num_classes smaller than the data's labels
    assert train(["--config", "configs/cifar10/resnet20.yaml", f"data.root={cifar_root}", "model.num_classes=5",
                  f"train.output_dir={tmp_path / 'a'}", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has 10 classes" in err and "set model.num_classes=10" in err
    # a missing batch file
    broken = tmp_path / "broken"
    (broken / "cifar-10-batches-py").mkdir(parents=True)
    for f in (cifar_root / "cifar-10-batches-py").iterdir():
        if f.name != "data_batch_3":
            (broken / "cifar-10-batches-py" / f.name).write_bytes(f.read_bytes())
    assert train(["--config", "configs/cifar10/resnet20.yaml", f"data.root={broken}",
                  f"train.output_dir={tmp_path / 'b'}", *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data_batch_3' is missing" in err and "Traceback" not in err
    # an image folder with an empty class
    root = tmp_path / "folder"
    _tree(root, classes=("ant", "bee"), per_class=1)
    (root / "train" / "cat").mkdir()
    assert train(["--config", "configs/imagenet/resnet50.yaml", f"data.root={root}", "model.num_classes=3",
                  f"train.output_dir={tmp_path / 'c'}", *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train/cat' has no images" in err
    # classification data with a detector
    assert train(["--config", "configs/cifar10/resnet20.yaml", f"data.root={cifar_root}", "model.arch=faster_rcnn",
                  "model.backbone=resnet18", "model.options={}", f"train.output_dir={tmp_path / 'd'}", *TINY]) == 2
    assert "does not go with data.task='classification'" in capsys.readouterr().err
