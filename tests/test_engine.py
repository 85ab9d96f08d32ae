"""Engine: schedules, parameter groups, checkpoints, fine-tuning reports, and a tiny end-to-end run
(train → checkpoint → resume; tools/test.py is exercised in test_tools.py) where the resumed run repeats the
uninterrupted losses exactly."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

from resdet.engine import checkpoint as ckpt_mod
from resdet.engine.checkpoint import CheckpointManager
from resdet.engine.lr_schedule import LRFactor, build_lr_scheduler
from resdet.engine.optim import build_optimizer, clip_grad_norm, param_groups
from resdet.engine.pretrained import load_pretrained
from resdet.engine.trainer import Trainer, TrainingInterrupted

from helpers import tiny_cfg


def _losses(out, kind="train"):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["iteration"]: r["loss"] for r in rows if r["kind"] == kind}


# ------------------------------------------------------------------------------------ unit pieces
def test_lr_factor_warmup_multistep_cosine():
    f = LRFactor(schedule="multistep", max_iter=100, steps=(50, 80), gamma=0.1, warmup_iters=10, warmup_factor=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.55)
    assert f(10) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)
    c = LRFactor(schedule="cosine", max_iter=100, min_factor=0.0)
    assert c(0) == pytest.approx(1.0) and c(50) == pytest.approx(0.5) and c(100) == pytest.approx(0.0)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, f)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.55)
    state = sched.state_dict()
    sched2 = build_lr_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), f)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 5


def test_no_decay_groups_cover_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    groups = param_groups(model, weight_decay=1e-4, no_decay_norm_bias=True)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(model[0].weight), id(model[3].weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 6
    assert len(param_groups(model, weight_decay=1e-4, no_decay_norm_bias=False)) == 1
    assert isinstance(build_optimizer(model, name="adamw", lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="'lamb'"):
        build_optimizer(model, name="lamb", lr=1e-3)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_step_matches_the_per_parameter_loop(name):
    torch.manual_seed(0)
    # No conv bias before the BatchNorm: its gradient is rounding noise, which Adam scales up to ~lr.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(6, 2))
    twin = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(6, 2))
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, name=name, lr=0.1, weight_decay=1e-2, no_decay_norm_bias=True)
    assert all(g["fused"] for g in opt.param_groups)
    groups = param_groups(twin, weight_decay=1e-2, no_decay_norm_bias=True)
    ref = (torch.optim.SGD(groups, lr=0.1, momentum=0.9, foreach=False) if name == "sgd"
           else torch.optim.AdamW(groups, lr=0.1, foreach=False))
    for _ in range(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(torch.linspace(-1, 1, 2 * 3 * 8 * 8).view(2, 3, 8, 8)).square().sum().backward()
            o.step()
    # Rounding differs (Adam's division by sqrt(v) + eps magnifies it); a wrong update would differ by ~lr.
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)


def test_optimizer_falls_back_where_torch_has_no_fused_step(monkeypatch):
    class _NoFusedSGD(torch.optim.SGD):  # a torch (or device) without the fused step
        def __init__(self, *args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("fused=True is not supported")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", _NoFusedSGD)
    opt = build_optimizer(nn.Linear(3, 2), name="sgd", lr=0.1)
    assert isinstance(opt, _NoFusedSGD) and not any(g.get("fused") for g in opt.param_groups)
    assert all(g["fused"] for g in build_optimizer(nn.Linear(3, 2), name="adamw", lr=0.1).param_groups)


@pytest.mark.parametrize("old_torch", [False, True])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(max_norm, old_torch, monkeypatch):
    reference = torch.nn.utils.clip_grad_norm_
    if old_torch:  # torch < 2.6: no get_total_norm / clip_grads_with_norm_
        monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
        monkeypatch.delattr(torch.nn.utils, "clip_grads_with_norm_", raising=False)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)) for _ in range(3)] + [nn.Parameter(torch.randn(2))]
    for p in params[:3]:
        p.grad = torch.randn_like(p)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    before = [p.grad.clone() for p in params[:3]]
    for p, q in zip(params[:3], twins):
        q.grad = p.grad.clone()
    norm = clip_grad_norm(params, max_norm)
    expected = reference(twins, max_norm)
    assert float(norm) == pytest.approx(float(expected))
    for p, q in zip(params[:3], twins):
        assert torch.equal(p.grad, q.grad)
    clipped = not all(torch.equal(p.grad, b) for p, b in zip(params[:3], before))
    assert clipped == (max_norm < float(norm))


def test_checkpoint_keep_last_and_kill_during_write(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for it in (1, 2, 3):
        mgr.save({"model": {"w": torch.full((3,), float(it))}, "iteration": it}, mgr.periodic_name(it))
    names = sorted(p.name for p in tmp_path.glob("model_*.pth"))
    assert names == ["model_0000002.pth", "model_0000003.pth"]

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):  # writes half a file, then the process "dies"
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        mgr.save({"model": {"w": torch.zeros(3)}, "iteration": 4}, mgr.periodic_name(4))
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert not (tmp_path / "model_0000004.pth").exists()
    assert not list(tmp_path.glob("*.tmp"))
    latest = mgr.latest()
    assert latest.name == "model_0000003.pth"
    assert CheckpointManager.load(latest)["iteration"] == 3
    # overwriting an existing name and dying leaves the old complete file
    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        mgr.save({"iteration": 99}, "model_0000003")
    assert CheckpointManager.load(tmp_path / "model_0000003.pth")["iteration"] == 3


def test_load_pretrained_reports_skipped_heads(tmp_path):
    src = nn.ModuleDict({"backbone": nn.Linear(4, 4), "cls": nn.Linear(4, 3)})
    dst = nn.ModuleDict({"backbone": nn.Linear(4, 4), "cls": nn.Linear(4, 5), "extra": nn.Linear(2, 2)})
    torch.save({"resdet": "0", "model": src.state_dict()}, tmp_path / "a.pth")
    before = dst["cls"].weight.clone()
    report = load_pretrained(dst, tmp_path / "a.pth")
    assert report.source == "resdet"
    assert sorted(report.loaded) == ["backbone.bias", "backbone.weight"]
    assert {k for k, _, _ in report.skipped} == {"cls.weight", "cls.bias"}
    assert sorted(report.missing) == ["extra.bias", "extra.weight"]
    assert torch.equal(dst["backbone"].weight, src["backbone"].weight)
    assert torch.equal(dst["cls"].weight, before)
    assert "skipped 2" in str(report) and "cls.weight" in str(report)


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


def test_train_resume_equals_uninterrupted(shapes_root, tmp_path):
    full = tmp_path / "full"
    torch.manual_seed(0)
    Trainer(tiny_cfg(shapes_root, full, "eval.evaluator=none")).train()  # evaluation: see test_tools.py
    assert (full / "model_final.pth").is_file() and (full / "model_0000002.pth").is_file()
    uninterrupted = _losses(full)
    assert sorted(uninterrupted) == [1, 2, 3, 4]

    # resume from the iteration-2 checkpoint in a fresh directory: iterations 3 and 4 (the second one in
    # the next epoch: 6 images, batches of 2) repeat exactly
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "model_0000002.pth").write_bytes((full / "model_0000002.pth").read_bytes())
    torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever the process has
    trainer = Trainer(tiny_cfg(shapes_root, resumed_dir, "train.num_vis_images=0", "eval.evaluator=none"),
                      resume=True)
    assert trainer.iteration == 2
    trainer.train()
    resumed = _losses(resumed_dir)
    assert resumed[3] == uninterrupted[3] and resumed[4] == uninterrupted[4]
    a = torch.load(full / "model_final.pth", weights_only=False)["model"]
    b = torch.load(resumed_dir / "model_final.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_last_good(shapes_root, tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(shapes_root, tmp_path, "train.checkpoint_period=1", "eval.evaluator=none"))
    forward = trainer.ddp_model.forward
    calls = {"n": 0}

    def nan_at_second(images, targets):
        calls["n"] += 1
        losses = forward(images, targets)
        if calls["n"] == 2:
            losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
        return losses

    monkeypatch.setattr(trainer.ddp_model, "forward", nan_at_second)
    with pytest.raises(FloatingPointError, match=r"iteration 2 .*loss_box_reg=nan") as err:
        trainer.train()
    assert "model_0000001.pth" in str(err.value) and "loss_classifier=" in str(err.value)
    assert CheckpointManager(tmp_path).latest().name == "model_0000001.pth"
    assert CheckpointManager.load(tmp_path / "model_0000001.pth")["iteration"] == 1


def test_sigterm_saves_checkpoint_then_stops(shapes_root, tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(shapes_root, tmp_path, "train.checkpoint_period=0", "eval.evaluator=none"))
    step = trainer._step

    def step_then_signal():
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the trainer's handler
        return step()

    monkeypatch.setattr(trainer, "_step", step_then_signal)
    with pytest.raises(TrainingInterrupted) as err:
        trainer.train()
    assert err.value.signum == signal.SIGTERM
    state = CheckpointManager.load(tmp_path / "model_0000001.pth")
    assert state["iteration"] == 1 and state["batches_done"] == 1
    assert signal.getsignal(signal.SIGTERM) is not trainer._on_signal  # handlers restored


def test_load_pretrained_torchvision_detection_and_imagenet(tmp_path):
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from resdet.models import mask_rcnn

    tv = MaskRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5), num_classes=3)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model = mask_rcnn("resnet18", num_classes=5)
    report = load_pretrained(model, tmp_path / "tv.pth")
    assert report.source == "torchvision_detection"
    skipped = {k for k, _, _ in report.skipped}
    assert skipped == {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                       "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
                       "roi_heads.mask_predictor.mask_fcn_logits.weight",
                       "roi_heads.mask_predictor.mask_fcn_logits.bias"}
    assert not report.missing and not report.unexpected
    assert len(report.loaded) > 100

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "imagenet.pth")
    report = load_pretrained(model, tmp_path / "imagenet.pth")
    assert report.source == "imagenet_backbone" and not report.missing and not report.unexpected
    assert all(k.startswith("backbone.body.") for k in report.loaded)


def test_amp_auto_is_bf16_only_where_native(monkeypatch):
    """``train.amp=auto`` autocasts to bf16 only on a device with native bf16 kernels, float32 elsewhere."""
    import torch

    from resdet.engine import inference

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert inference.amp_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert inference.amp_dtype("auto", "cpu") is None
    assert inference.amp_dtype("auto", "meta") is None
    assert inference.amp_dtype("bf16", "cpu") is torch.bfloat16 and inference.amp_dtype("none") is None
