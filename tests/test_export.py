"""ONNX and TorchScript export: the exported files give PyTorch's outputs on images of other sizes.

Small R18 models (min_size 96) traced on a portrait image and run on landscape ones, so the dynamic
axes and every size computed inside the graph really change between trace and run.
"""
import copy
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from resdet.export import (
    ExportError,
    OnnxPredictor,
    TorchScriptPredictor,
    example_image,
    exportable,
    to_onnx,
    to_torchscript,
)
from resdet.models import faster_rcnn, mask_rcnn, semantic_fpn

from helpers import load_tool

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

SIZES = [(320, 427), (480, 640), (100, 300)]  # the last one is capped by max_size: another resized shape
SMALL_SIZES = [(96, 128), (70, 50)]  # for the semantic FPN at input scale
TRACE_IMAGE = (200, 150)


def _detector(builder, **options) -> nn.Module:
    torch.manual_seed(0)
    model = builder("resnet18", num_classes=5, min_size=96, max_size=160, rpn_pre_nms_top_n_test=100,
                    rpn_post_nms_top_n_test=30, box_detections_per_img=20, **options).eval()
    with torch.no_grad():  # spread the class scores: distinct values, several above the threshold
        model.roi_heads.box_predictor.cls_score.weight.normal_(std=0.5)
    return model


def _images():
    return [example_image(h, w, seed=i + 1) for i, (h, w) in enumerate(SIZES)]


def _maxabs(a, b) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def assert_same_detections(expected: dict, got: dict) -> None:
    """boxes within 1e-2 px, same labels, scores within 1e-4, masks (at 0.5) IoU >= 0.99."""
    assert got["boxes"].shape == expected["boxes"].shape, (got["boxes"].shape, expected["boxes"].shape)
    assert _maxabs(got["boxes"], expected["boxes"]) <= 1e-2
    assert torch.equal(got["labels"], expected["labels"])
    assert _maxabs(got["scores"], expected["scores"]) <= 1e-4
    if "masks" in expected:
        assert got["masks"].shape == expected["masks"].shape
        a, b = expected["masks"][:, 0] >= 0.5, got["masks"][:, 0] >= 0.5
        inter = (a & b).flatten(1).sum(1).float()
        union = (a | b).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        assert float(iou.min()) >= 0.99 if len(iou) else True


@pytest.fixture(scope="module")
def mask_model():
    return _detector(mask_rcnn)


@pytest.fixture(scope="module")
def mask_onnx(mask_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "mask_rcnn.onnx"
    report = to_onnx(mask_model, path, example=example_image(*TRACE_IMAGE), verbose=False)
    assert report.same_count and report.counts["boxes"][0] > 0
    return path


@pytest.mark.parametrize("builder", [faster_rcnn, mask_rcnn], ids=["faster", "mask"])
def test_detector_onnx_matches_pytorch_on_other_sizes(builder, mask_model, mask_onnx, tmp_path):
    if builder is mask_rcnn:
        model, path = mask_model, mask_onnx
    else:  # also exports through optimize_for_inference (BatchNorm folded)
        model, path = _detector(builder), tmp_path / "faster.onnx"
        to_onnx(model, path, example=example_image(*TRACE_IMAGE), optimize=True, check=False)
    predictor = OnnxPredictor(path)
    assert predictor.output_names[:3] == ["boxes", "labels", "scores"]
    assert ("masks" in predictor.output_names) == (builder is mask_rcnn)
    for image in _images():
        with torch.no_grad():
            expected = model([image])[0]  # a batch of one
        assert len(expected["boxes"]) > 0
        got = predictor([image])[0]
        assert_same_detections(expected, got)
        if "masks" in got:
            assert got["masks"].shape[-2:] == image.shape[-2:]


def test_mask_rcnn_onnx_without_detections(mask_model, mask_onnx, tmp_path):
    """Background logit raised in the file's weights and in the model: no detections, empty masks."""
    proto = onnx.load(str(mask_onnx))
    name = "model.roi_heads.box_predictor.cls_score.bias"
    init = next(t for t in proto.graph.initializer if t.name == name)
    bias = onnx.numpy_helper.to_array(init).copy()
    bias[0] = 100.0
    init.CopyFrom(onnx.numpy_helper.from_array(bias, name))
    onnx.save(proto, str(tmp_path / "empty.onnx"))
    model = copy.deepcopy(mask_model)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[0] = 100.0
    image = example_image(*SIZES[0])
    with torch.no_grad():
        expected = model([image])[0]
    got = OnnxPredictor(tmp_path / "empty.onnx")([image])[0]
    assert len(expected["boxes"]) == 0
    assert_same_detections(expected, got)
    assert tuple(got["masks"].shape) == (0, 1, *SIZES[0])


def test_mask_rcnn_torchscript_equals_eager(mask_model, tmp_path):
    path = tmp_path / "mask_rcnn.pt"
    report = to_torchscript(mask_model, path, example=example_image(*TRACE_IMAGE), check=False)
    assert report is None
    scripted = TorchScriptPredictor(path)
    for image in _images()[:2]:
        with torch.no_grad():
            expected = mask_model([image])[0]
        got = scripted([image])[0]
        assert set(got) == set(expected)
        # Not bit-exact: eager CPU pools with resdet's sparse RoIAlign, the trace with torchvision's op.
        assert_same_detections(expected, got)
        assert _maxabs(got["boxes"], expected["boxes"]) <= 1e-3


@pytest.mark.parametrize("min_size", [None, 96], ids=["input_scale", "resized"])
def test_semantic_fpn_onnx_and_torchscript(min_size, tmp_path):
    torch.manual_seed(0)
    max_size = None if min_size is None else 160
    model = semantic_fpn("resnet18", num_classes=4, min_size=min_size, max_size=max_size).eval()
    example = example_image(*TRACE_IMAGE)
    if min_size is None:  # TorchScript for the input-scale model, ONNX for the resized one
        to_torchscript(model, tmp_path / "m.pt", example=example, check=False)
        predictor = TorchScriptPredictor(tmp_path / "m.pt")
    else:
        to_onnx(model, tmp_path / "m.onnx", example=example, check=False)
        predictor = OnnxPredictor(tmp_path / "m.onnx")
    images = _images()[:2] if min_size else [example_image(h, w) for h, w in SMALL_SIZES]
    for image in images:
        with torch.no_grad():
            expected = model([image])[0]["sem_seg"]
        got = predictor([image])[0]["sem_seg"]
        assert got.shape == expected.shape == image.shape[-2:]
        assert got.dtype == torch.int64
        assert (got != expected).float().mean() < 1e-4  # argmax ties aside, identical


def test_fixed_input_size_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = semantic_fpn("resnet18", num_classes=3).eval()
    path = tmp_path / "fixed.onnx"
    report = to_onnx(model, path, input_size=(64, 96), opset=16, metadata={"class_names": '["a", "b"]'},
                     verbose=False)
    assert report.image_size == (64, 96) and report.max_diff["sem_seg"] == 0
    proto = onnx.load(str(path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [3, 64, 96]
    assert {o.domain: o.version for o in proto.opset_import}[""] == 16
    assert json.loads(OnnxPredictor(path).metadata["class_names"]) == ["a", "b"]


class _Erfcx(nn.Module):
    def forward(self, x):
        return torch.special.erfcx(x)  # no ONNX symbolic


def test_unexportable_op_names_the_module(tmp_path):
    model = semantic_fpn("resnet18", num_classes=3).eval()
    model.sem_seg_head.predictor = nn.Sequential(model.sem_seg_head.predictor, _Erfcx())
    with pytest.raises(ExportError, match=r"aten::special_erfcx.*sem_seg_head\.predictor\.1 \(_Erfcx\)"):
        to_onnx(model, tmp_path / "bad.onnx", input_size=(64, 64), check=False)


def test_export_error_without_the_private_dispatch_mode(monkeypatch):
    """The module is found with torch.utils._python_dispatch (private); without it the op is still named."""
    from resdet.export import exporters

    model = semantic_fpn("resnet18", num_classes=3).eval()
    model.sem_seg_head.predictor = nn.Sequential(model.sem_seg_head.predictor, _Erfcx())
    wrapper, image = exportable(model), torch.rand(3, 64, 64)
    err = RuntimeError("Exporting the operator 'aten::special_erfcx' to ONNX opset version 17 is not supported.")
    with pytest.raises(ExportError, match=r"aten::special_erfcx in module sem_seg_head\.predictor\.1 \(_Erfcx\)"):
        exporters._raise_export_error(err, wrapper, image, "ONNX export")
    monkeypatch.setitem(sys.modules, "torch.utils._python_dispatch", None)  # its import now fails
    assert exporters._dispatch_mode() is None
    with pytest.raises(ExportError, match=r"aten::special_erfcx \(module not identified\) cannot be exported"):
        exporters._raise_export_error(err, wrapper, image, "ONNX export")


def test_opset_range_without_the_private_constant(monkeypatch):
    """The exporter's highest opset is read from torch.onnx._constants (private); without it, 20."""
    from resdet.export import check_opset, exporters

    monkeypatch.setitem(sys.modules, "torch.onnx._constants", None)  # its import now fails
    assert exporters._max_opset() == 20 and check_opset(20) == 20
    with pytest.raises(ValueError, match="opsets 11 to 20"):
        check_opset(21)


def test_exportable_rejects_other_models():
    with pytest.raises(ExportError, match="cannot export Linear: resdet exports GeneralizedRCNN"):
        exportable(nn.Linear(2, 2))


def test_tools_export_refuses_panoptic_fpn_in_one_line(tmp_path, capsys):
    """A Panoptic FPN holds a whole Mask R-CNN: it is refused, not exported as its instance half."""
    from resdet.config import config_to_dict, load_config
    from resdet.models import build_model

    cfg = load_config(str(Path(__file__).parents[1] / "configs/shapes/panoptic_fpn_r34.yaml"),
                      ["model.backbone=resnet18"])
    model = build_model(cfg).eval()
    ckpt, out = tmp_path / "model.pth", tmp_path / "model.onnx"
    torch.save({"model": model.state_dict(), "resdet": {}, "config": config_to_dict(cfg)}, ckpt)
    export_main = load_tool("export")
    for fmt in ("onnx", "torchscript"):
        assert export_main(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(out), "--optimize"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: cannot export PanopticFPN: its panoptic combination step")
        assert err.count("\n") == 1
    assert not out.exists()


def test_paste_masks_traced_at_one_size_equals_eager_at_others():
    """paste_masks' tracing branch, recorded on 2 masks in 40x50, pastes any count into any size."""
    from resdet.layers.mask_paste import paste_masks

    def paste(masks, boxes, image):
        return paste_masks(masks, boxes, image.shape[-2:])

    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constants (the mask size M)
        traced = torch.jit.trace(paste, (torch.rand(2, 1, 28, 28, generator=g), torch.tensor([[2.0, 3, 20, 30]] * 2),
                                         torch.zeros(1, 40, 50)), check_trace=False)
    # Inside, across every edge, a sub-pixel box, an inverted one and one wholly outside the image.
    boxes = torch.tensor([[10.0, 20, 50, 60], [-5, -3, 30, 30], [100, 50, 200, 120], [5, 5, 6.5, 7],
                          [40, 40, 30, 30], [300, 300, 320, 330]])
    masks = torch.rand(len(boxes), 1, 28, 28, generator=g)
    for height, width in [(90, 150), (64, 64)]:
        got = traced(masks, boxes, torch.zeros(1, height, width))
        torch.testing.assert_close(got, paste_masks(masks, boxes, (height, width)), atol=1e-6, rtol=0)
    assert traced(masks[:0], boxes[:0], torch.zeros(1, 30, 20)).shape == (0, 1, 30, 20)


def test_tools_export_cli_from_resdet_checkpoint(tmp_path, capsys):
    from resdet.config import config_to_dict, load_config

    cfg = load_config(str(Path(__file__).parents[1] / "configs/shapes/semantic_fpn_r34.yaml"),
                      ["model.backbone=resnet18"])
    from resdet.models import build_model

    model = build_model(cfg).eval()
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "resdet": {}, "config": config_to_dict(cfg)}, ckpt)
    export_main = load_tool("export")
    out = tmp_path / "model.pt"
    assert export_main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "largest difference: sem_seg 0" in printed and f"wrote {out}" in printed
    image = example_image(128, 160)
    with torch.no_grad():
        expected = model([image])[0]["sem_seg"]
    assert torch.equal(TorchScriptPredictor(out)([image])[0]["sem_seg"], expected)
    assert export_main(["--checkpoint", str(tmp_path / "missing.pth"), "--out", str(out)]) == 1
    assert "missing.pth" in capsys.readouterr().err
    assert sys.modules.get("export_tool") is None


def test_infer_images_onnx_draws_like_the_checkpoint_path(mask_model, mask_onnx, tmp_path):
    from resdet.engine.visualize import write_rgb
    from resdet.export.runtime import infer_images_onnx

    image = (example_image(*SIZES[0]) * 255).round().to(torch.uint8)
    write_rgb(image, tmp_path / "a.png")
    out = infer_images_onnx(mask_onnx, [tmp_path / "a.png"], tmp_path / "out", score_thresh=0.3)
    with torch.no_grad():
        expected = mask_model([image.float() / 255])[0]
    assert len(out["results"][0]["detections"]) == int((expected["scores"] >= 0.3).sum()) > 0
    assert out["skipped"] == [] and out["failed"] == []
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "detections.json").is_file()
