"""Classification data: CIFAR in the published pickle layout (read safely), image folder trees, the
training pipeline."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from resdet.data import CifarDataset, CifarFormatError, ImageFolderDataset, build_classification_transforms, write_cifar
from resdet.engine.builders import collate_classification


def _arrays(n, seed, classes=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    train, test = _arrays(25, 0), _arrays(7, 1)
    write_cifar(root, train=train, test=test, class_names=[f"class{i}" for i in range(10)])
    return root, train, test


def test_written_files_are_the_published_format(cifar10, monkeypatch):
    root, train, test = cifar10
    folder = root / "cifar-10-batches-py"
    assert sorted(os.listdir(folder)) == ["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]
    raw = (folder / "data_batch_1").read_bytes()
    assert raw[:3] == b"\x80\x02}" and b"cnumpy.core.multiarray\n_reconstruct\n" in raw  # Python-2 protocol 2
    entry = pickle.loads(raw, encoding="bytes")  # how the CIFAR page says to read it in Python 3
    assert sorted(entry) == [b"batch_label", b"data", b"filenames", b"labels"] and entry[b"data"].shape == (5, 3072)
    # torchvision's own reader (its checksums of the real files aside) sees the same images and labels as resdet's
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    tv = torchvision.datasets.CIFAR10(str(root), train=True)
    ours = CifarDataset(root, "train")
    assert np.array_equal(tv.data, ours.images) and np.array_equal(tv.data, train[0])
    assert tv.targets == ours.labels.tolist() == train[1].tolist() and tv.classes == ours.class_names
    image, target = ours[3]
    torch.testing.assert_close(image, torch.from_numpy(train[0][3]).permute(2, 0, 1).float() / 255)
    assert target["labels"].dtype == torch.int64 and int(target["labels"]) == train[1][3] and target["image_id"] == 3
    assert np.array_equal(CifarDataset(root / "cifar-10-batches-py", "test").images, test[0])  # the folder itself


def test_cifar100_fine_and_coarse(tmp_path, monkeypatch):
    train, test = _arrays(12, 2, classes=100), _arrays(4, 3, classes=100)
    write_cifar(tmp_path, train=train, test=test, class_names=[f"f{i}" for i in range(100)], variant="cifar100")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    tv = torchvision.datasets.CIFAR100(str(tmp_path), train=False)
    fine = CifarDataset(tmp_path, "test", variant="cifar100")
    assert fine.num_classes == 100 and tv.targets == fine.labels.tolist() and np.array_equal(tv.data, fine.images)
    coarse = CifarDataset(tmp_path, "train", variant="cifar100", label_type="coarse")
    assert coarse.num_classes == 20 and coarse.labels.tolist() == (train[1] // 5).tolist()


def test_holdout_split_partitions_the_training_files(cifar10):
    root, train, _ = cifar10
    fit, val = CifarDataset(root, "train", holdout=5), CifarDataset(root, "val", holdout=5)
    assert len(fit) == 20 and len(val) == 5
    assert np.array_equal(np.concatenate([fit.images, val.images]), train[0])
    with pytest.raises(ValueError, match="data.classification.holdout"):
        CifarDataset(root, "val")


def test_crafted_pickle_is_refused_without_running(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(tmp_path, train=_arrays(5, 0), test=_arrays(2, 1), class_names=[str(i) for i in range(10)])
    marker = tmp_path / "ran"
    command = f"touch {marker}".encode()
    # a dict whose value is os.system("touch ...") evaluated at load time
    crafted = (b"\x80\x02}(U\x06labels" + b"cos\nsystem\n" + pickle.SHORT_BINSTRING + bytes([len(command)]) + command
               + b"\x85R" + b"u.")
    (folder / "data_batch_2").write_bytes(crafted)
    with pytest.raises(CifarFormatError, match=r"data_batch_2.*refused.*os\.system"):
        CifarDataset(tmp_path, "train")
    assert not marker.exists()


@pytest.mark.parametrize("damage, match", [
    ("missing", r"data_batch_4' is missing"),
    ("truncated", r"data_batch_4' is truncated or corrupt"),
    ("garbage", r"data_batch_4' is not a readable pickle"),
    ("label", r"data_batch_4': image 0 has label 12, outside 0\.\.9"),
    ("shape", r"data_batch_4': 'data' must be a uint8 array \[N, 3072\]"),
])
def test_damaged_cifar_files_name_the_file(tmp_path, damage, match):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(tmp_path, train=_arrays(10, 0), test=_arrays(2, 1), class_names=[str(i) for i in range(10)])
    path = folder / "data_batch_4"
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "garbage":
        path.write_bytes(b"not a pickle at all" * 10)
    else:
        images, labels = _arrays(1, 5)  # one image: it lands in data_batch_5
        labels = np.array([12]) if damage == "label" else labels
        write_cifar(tmp_path / "other", train=(images, labels), test=_arrays(1, 2),
                    class_names=[str(i) for i in range(10)])
        raw = (tmp_path / "other" / "cifar-10-batches-py" / "data_batch_5").read_bytes()
        if damage == "shape":  # the array's shape (1, 3072) -> (2, 1536): same bytes, wrong layout
            one_row = pickle.BININT1 + b"\x01" + pickle.BININT2 + struct.pack("<H", 3072)
            assert one_row in raw
            raw = raw.replace(one_row, pickle.BININT1 + b"\x02" + pickle.BININT2 + struct.pack("<H", 1536), 1)
        path.write_bytes(raw)
    with pytest.raises(CifarFormatError, match=match):
        CifarDataset(tmp_path, "train")


def _image_tree(root, counts, size=(20, 24)):
    rng = np.random.default_rng(0)
    for split, classes in counts.items():
        for name, n in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def test_image_folder_labels_skips_and_errors(tmp_path):
    _image_tree(tmp_path, {"train": {"cat": 3, "dog": 2, "ant": 1}, "val": {"dog": 2}})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\x00garbage")
    train = ImageFolderDataset(tmp_path, "train")
    assert train.class_names == ["ant", "cat", "dog"] and len(train) == 6
    assert dict(train.skipped) == {"not_image": 1, "unreadable": 1} and "broken.jpg" in train.summary
    image, target = train[1]
    assert image.shape == (3, 20, 24) and int(target["labels"]) == 1
    val = ImageFolderDataset(tmp_path, "val", classes=train.class_names)
    assert [label for _, label in val.samples] == [2, 2]
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['bird'\] are not among the 3 training classes"):
        ImageFolderDataset(tmp_path, "val", classes=train.class_names)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "readme.md").write_text("")
    with pytest.raises(ValueError, match=r"class folder '.*train/bird' has no images"):
        ImageFolderDataset(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="test' does not exist"):
        ImageFolderDataset(tmp_path, "test")


def test_pad_crop_pipeline_is_the_papers_and_seeded():
    pipeline = build_classification_transforms(train=True, augment="pad_crop", crop_size=32, padding=4, hflip_prob=0.5)
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    padded = np.zeros((40, 40, 3), np.uint8)
    padded[4:36, 4:36] = image
    seen = set()
    for seed in range(40):
        pipeline.set_seed(seed)
        out, target = pipeline(image, {"labels": 1})
        assert out.shape == (32, 32, 3) and target == {"labels": 1}
        # every output is a 32x32 window of the padded image, possibly mirrored
        hits = [(y, x, f) for y in range(9) for x in range(9) for f in (False, True)
                if np.array_equal(out, padded[y:y + 32, x:x + 32][:, ::-1] if f else padded[y:y + 32, x:x + 32])]
        assert hits
        seen.add(hits[0])
        pipeline.set_seed(seed)
        assert np.array_equal(pipeline(image, {})[0], out)  # the same seed, the same crop
    assert len(seen) > 10 and {f for _, _, f in seen} == {False, True}
    assert build_classification_transforms(train=False) is None
    rrc = build_classification_transforms(train=True, augment="random_resized_crop", crop_size=24)
    assert rrc(np.zeros((50, 70, 3), np.uint8), {})[0].shape == (24, 24, 3)


def test_collate_stacks_one_size_batches():
    batch = [(torch.rand(3, 8, 8), {"labels": torch.tensor(k), "image_id": k}) for k in range(3)]
    images, targets = collate_classification(batch)
    assert isinstance(images, torch.Tensor) and images.shape == (3, 3, 8, 8)
    assert [int(t["labels"]) for t in targets] == [0, 1, 2] and targets[2]["image_id"] == 2
    assert targets[0]["labels"].untyped_storage().data_ptr() == targets[2]["labels"].untyped_storage().data_ptr()
    mixed, _ = collate_classification(batch[:2] + [(torch.rand(3, 9, 8), {"labels": torch.tensor(1)})])
    assert isinstance(mixed, list) and [tuple(im.shape) for im in mixed] == [(3, 8, 8), (3, 8, 8), (3, 9, 8)]
