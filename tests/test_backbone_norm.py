"""Frozen BatchNorm folded into its convolution on the fly (``conv_norm_forward``) equals the separate modules."""
import contextlib
import copy

import pytest
import torch
from torch import nn

from resdet.backbones import resnet18, resnet50
from resdet.layers.norm import FrozenBatchNorm2d, conv_norm_forward


def _spread(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for name in ("weight", "bias", "running_mean"):
                getattr(m, name).copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def test_conv_norm_equals_modules_with_gradients():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=True), _spread(FrozenBatchNorm2d(6))
    x = torch.randn(2, 4, 9, 7, requires_grad=True)
    ref = bn(conv(x))
    (ref * torch.arange(ref.numel()).reshape(ref.shape).sin()).sum().backward()
    grads = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = conv.weight.grad = conv.bias.grad = None
    out = conv_norm_forward(conv, bn, x)
    (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip((x.grad, conv.weight.grad, conv.bias.grad), grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("build", [resnet18, resnet50])
def test_resnet_frozen_bn_folded_in_train_and_eval(build, monkeypatch):
    """The backbone with folding equals the module-by-module forward; state dict keys are unchanged."""
    model = _spread(build(norm="frozen_bn", frozen_stages=2)).train()
    keys = set(model.state_dict())
    calls = []
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    assert not calls  # every frozen norm ran inside its convolution
    sum(v.sum() for v in out.values()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    plain = copy.deepcopy(model)
    plain.zero_grad(set_to_none=True)
    # Without folding: conv_norm_forward falls back to norm(conv(x)) for modules it does not recognise.
    monkeypatch.setattr("resdet.layers.norm.FrozenBatchNorm2d", type("Other", (), {}))
    ref = plain(x)
    sum(v.sum() for v in ref.values()).backward()
    for k in out:
        torch.testing.assert_close(out[k], ref[k], atol=1e-4, rtol=1e-4)
    for k, p in plain.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[k], p.grad, atol=1e-3, rtol=1e-3)
    assert set(model.state_dict()) == keys and any(k.endswith("bn1.running_var") for k in keys)


def _weighted_sum(y: torch.Tensor) -> torch.Tensor:
    return (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum()


@pytest.mark.parametrize("winograd", [False, True])
def test_trainable_folded_weight_is_recomputed_in_backward_not_kept(winograd, monkeypatch):
    """Autograd keeps conv.weight and the scale, not their product (a second copy of the weights), and the
    gradients (also second order) are those of the separate modules; saving_folded_weights() keeps it."""
    import gc
    import weakref

    import resdet
    from resdet.layers import norm, policy

    seen = []
    real = norm.conv_with_weights
    monkeypatch.setattr(norm, "conv_with_weights", lambda c, x, w, b: seen.append(weakref.ref(w)) or real(c, x, w, b))
    # 256 channels on a 32x44 map: the Winograd weight gradient runs (resdet::conv3x3 saves the folded weight).
    c, hw = (256, (32, 44)) if winograd else (6, (9, 7))
    conv, bn = nn.Conv2d(c, c, 3, padding=1, bias=False), _spread(FrozenBatchNorm2d(c))
    x = torch.randn(2, c, *hw).relu().requires_grad_()
    ref = bn(conv(x))
    ref_grads = torch.autograd.grad(_weighted_sum(ref), (x, conv.weight), create_graph=True)
    ref_second = torch.autograd.grad(sum(g.square().sum() for g in ref_grads), conv.weight)[0]
    with resdet.fast_paths(winograd):
        for keep in (False, True):
            seen.clear()
            with norm.saving_folded_weights() if keep else contextlib.nullcontext():
                out = conv_norm_forward(conv, bn, x)
            gc.collect()
            assert (seen[0]() is not None) == keep
            if winograd:
                assert policy.use_conv3x3_op(x, conv.weight, None)
            grads = torch.autograd.grad(_weighted_sum(out), (x, conv.weight), create_graph=True)
            second = torch.autograd.grad(sum(g.square().sum() for g in grads), conv.weight)[0]
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            for a, b in zip((*grads, second), (*ref_grads, ref_second)):
                torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_frozen_bn_resnet_with_checkpointing_matches_plain_forward_and_grads():
    plain = _spread(resnet18(norm="frozen_bn", frozen_stages=0)).train()
    cp = copy.deepcopy(plain)
    for m in cp.modules():
        if hasattr(m, "with_cp"):
            m.with_cp = True
    x = torch.randn(1, 3, 64, 64)
    for m in (plain, cp):
        sum(o.sum() for o in m(x).values()).backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), cp.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n, atol=1e-4, rtol=1e-4)
