"""Frozen BatchNorm folded into its convolution on the fly (``conv_norm_forward``) equals the separate modules."""
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
