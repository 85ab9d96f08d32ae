"""Label spaces: labels ↔ dataset category ids for resdet models (non-contiguous ids 5, 17, 88, 90) and for
torchvision's COCO checkpoints (label = COCO id), through the evaluator, checkpoints, fine-tuning and
tools/test.py end to end on COCO-format data written here with the original ids."""
import json

import torch

from resdet.data import CocoDataset, LabelSpace
from resdet.data.label_space import remap_class_rows
from resdet.engine.builders import dataset_metadata

from helpers import SPARSE, coco_arrays, load_tool, write_coco


# ------------------------------------------------------------------------------------------ unit pieces
def test_sparse_ids_label_space_round_trips_through_a_weights_only_checkpoint(tmp_path):
    arrays = coco_arrays(1)
    out = {"boxes": torch.tensor([[4.0, 4, 40, 40]]), "labels": torch.tensor([88])}
    write_coco(str(tmp_path), [(arrays[0], out)], SPARSE)
    ds = CocoDataset(str(tmp_path / "val2017"), str(tmp_path / "annotations/instances_val2017.json"))
    space = LabelSpace.from_dataset(ds)
    assert space.cat_ids == (5, 17, 88, 90) and space.num_classes == 5 and space.name(4) == "toothbrush"
    assert space.label_to_cat_id() == {1: 5, 2: 17, 3: 88, 4: 90}
    torch.save({"model": {}, **dataset_metadata(ds)}, tmp_path / "c.pth")
    back = torch.load(tmp_path / "c.pth", weights_only=True)  # plain types only
    assert LabelSpace.from_checkpoint(back) == space


def test_torchvision_coco_space_is_the_coco_ids():
    tv = LabelSpace.torchvision_coco()
    assert tv.num_classes == 91 and tv.label_to_cat_id()[13] == 13 and tv.name(13) == "stop sign"
    assert tv.name(90) == "toothbrush" and tv.name(12) == "N/A"


def test_evaluator_writes_the_model_space_ids_and_drops_unmapped(tmp_path):
    from resdet.evaluation import COCOEvaluator

    arrays = coco_arrays(1)
    gt = {"boxes": torch.tensor([[4.0, 4, 40, 40], [50, 10, 90, 60]]), "labels": torch.tensor([90, 17])}
    write_coco(str(tmp_path), [(arrays[0], gt)], SPARSE)
    ds = CocoDataset(str(tmp_path / "val2017"), str(tmp_path / "annotations/instances_val2017.json"))
    tv = LabelSpace.torchvision_coco()
    ev = COCOEvaluator(ds.coco, tv.label_to_cat_id(), iou_types=("bbox",), output_dir=str(tmp_path / "out"))
    # label 12 is torchvision's "N/A": no category of the data, left out and counted
    pred = {"boxes": torch.tensor([[4.0, 4, 40, 40], [50, 10, 90, 60], [0, 0, 9, 9]]),
            "labels": torch.tensor([90, 17, 12]), "scores": torch.tensor([0.9, 0.8, 0.7])}
    ev.process([{"image_id": 1}], [pred])
    metrics = ev.evaluate()
    assert metrics["bbox/AP"] > 0.99 and "1 detections left out" in ev.summary()
    written = json.load(open(tmp_path / "out" / "coco_bbox_results.json"))
    assert sorted(r["category_id"] for r in written) == [17, 90]


def test_remap_class_rows_by_category_id_and_name():
    source = LabelSpace.torchvision_coco()
    target = LabelSpace.contiguous([90, 5, 17, 200], ["toothbrush", "airplane", "cat", "unicorn"])
    rows = torch.arange(91, dtype=torch.float32)
    sd = {"roi_heads.box_predictor.cls_score.bias": rows,
          "roi_heads.box_predictor.bbox_pred.bias": rows.repeat_interleave(4)}
    model_state = {"roi_heads.box_predictor.cls_score.bias": torch.full((5,), -1.0),
                   "roi_heads.box_predictor.bbox_pred.bias": torch.full((20,), -1.0)}
    out, report = remap_class_rows(sd, model_state, source, target)
    assert out["roi_heads.box_predictor.cls_score.bias"].tolist() == [0, 5, 17, 90, -1]  # unicorn re-initialised
    assert out["roi_heads.box_predictor.bbox_pred.bias"].tolist()[12:16] == [90] * 4
    assert "3 of 4 classes" in report and "1 re-initialised" in report and "unicorn" in report
    # same ids, other taxonomy (Cityscapes-like): nothing matched by id alone
    other = LabelSpace.contiguous([1, 2], ["person", "rider"])
    out, report = remap_class_rows(sd, {k: v[:3 * (4 if "bbox" in k else 1)] for k, v in model_state.items()},
                                   source, other)
    assert out["roi_heads.box_predictor.cls_score.bias"].tolist() == [0, 1, -1] and "1 of 2" in report


def test_fine_tuning_from_torchvision_keeps_matching_rows_with_a_report(tmp_path):
    from resdet.engine.pretrained import load_pretrained
    from resdet.models import faster_rcnn

    tv_like = faster_rcnn("resnet18", num_classes=91)
    sd = {k: v for k, v in tv_like.state_dict().items()}
    torch.save(sd, tmp_path / "tv.pth")  # torchvision layout: a plain detection state dict, 91 classes
    model = faster_rcnn("resnet18", num_classes=5)
    model.label_space = LabelSpace.contiguous([c for c, _ in SPARSE], [n for _, n in SPARSE])
    report = load_pretrained(model, tmp_path / "tv.pth")
    assert "4 of 4 classes" in str(report) and not report.skipped
    w = model.state_dict()["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(w[3], sd["roi_heads.box_predictor.cls_score.weight"][88])


# ---------------------------------------------------------------------------- tools/test.py end to end
def _small_tv_mask_rcnn():
    """torchvision Mask R-CNN, ResNet-18 FPN, 91 COCO classes, random weights made confident."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3, norm_layer=FrozenBatchNorm2d)
    model = MaskRCNN(body, num_classes=91, min_size=96, max_size=128, rpn_pre_nms_top_n_test=100,
                     rpn_post_nms_top_n_test=50, box_detections_per_img=20)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    return model.eval()


TV_OVERRIDES = ["model.backbone=resnet18", "model.min_size=96", "model.max_size=128",
                "model.rpn_pre_nms_top_n_test=100", "model.rpn_post_nms_top_n_test=50",
                "model.box_detections_per_img=20", "data.num_workers=0", "train.device=cpu"]


def test_torchvision_checkpoint_through_tools_test_gives_coco_ids(tmp_path, capsys):
    """GT = the torchvision model's own confident detections with original COCO ids: AP 1 only when the
    labels are read as COCO category ids (0.17 when they went through the contiguous mapping)."""
    tv = _small_tv_mask_rcnn()
    coco80 = [(i, n) for i, n in enumerate(LabelSpace.torchvision_coco().class_names, 1) if n != "N/A"]
    arrays = coco_arrays(2)
    with torch.no_grad():
        outs = tv([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])
    used = {i for i, _ in coco80}
    gt = [(a, {k: v[(o["scores"] >= 0.5) & torch.isin(o["labels"], torch.tensor(sorted(used)))]
               for k, v in o.items()}) for a, o in zip(arrays, outs)]
    assert sum(len(o["boxes"]) for _, o in gt) > 0
    write_coco(str(tmp_path / "coco"), gt, coco80)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    rc = load_tool("test")(["--config", "configs/coco/mask_rcnn_r50_fpn_1x.yaml",
                            "--checkpoint", str(tmp_path / "tv.pth"),
                            f"data.root={tmp_path / 'coco'}", f"train.output_dir={tmp_path / 'out'}",
                            "--json", str(tmp_path / "m.json"), *TV_OVERRIDES])
    assert rc == 0
    metrics = json.load(open(tmp_path / "m.json"))
    assert metrics["bbox/AP"] >= 0.99 and metrics["segm/AP"] >= 0.99
    results = json.load(open(tmp_path / "out" / "coco_segm_results.json"))
    gt_ids = {int(c) for _, o in gt for c in o["labels"]}
    assert {r["category_id"] for r in results} >= gt_ids and "counts" in results[0]["segmentation"]


def test_resdet_model_on_sparse_ids_writes_them_back(tmp_path):
    """A resdet checkpoint trained on ids 5, 17, 88, 90 evaluates and writes results with those ids."""
    from resdet.config import config_to_dict, load_config
    from resdet.models import faster_rcnn

    cfg = load_config("configs/coco/faster_rcnn_r18_fpn_1x.yaml",
                      ["model.num_classes=5", "model.backbone_weights=null", *TV_OVERRIDES[1:],
                       f"data.root={tmp_path / 'coco'}", f"train.output_dir={tmp_path / 'out'}"])
    torch.manual_seed(0)
    model = faster_rcnn("resnet18", num_classes=5, min_size=96, max_size=128, rpn_pre_nms_top_n_test=100,
                        rpn_post_nms_top_n_test=50, box_detections_per_img=20, norm="frozen_bn", frozen_stages=2).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    arrays = coco_arrays(2)
    with torch.no_grad():
        outs = model([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])
    sparse = dict(enumerate([c for c, _ in SPARSE], 1))
    gt = [(a, {"boxes": o["boxes"][o["scores"] >= 0.3],
               "labels": torch.tensor([sparse[int(x)] for x in o["labels"][o["scores"] >= 0.3]])})
          for a, o in zip(arrays, outs)]
    write_coco(str(tmp_path / "coco"), gt, SPARSE)
    space = LabelSpace.contiguous([c for c, _ in SPARSE], [n for _, n in SPARSE])
    torch.save({"resdet": "test", "model": model.state_dict(), "config": config_to_dict(cfg),
                "label_space": space.to_dict()}, tmp_path / "model.pth")
    assert load_tool("test")(["--checkpoint", str(tmp_path / "model.pth"), "--json", str(tmp_path / "m.json")]) == 0
    assert json.load(open(tmp_path / "m.json"))["bbox/AP"] >= 0.99
    results = json.load(open(tmp_path / "out" / "coco_bbox_results.json"))
    assert {r["category_id"] for r in results} <= {5, 17, 88, 90} and len(results) > 0
