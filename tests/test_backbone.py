"""ResNet backbone: levels, options (frozen stages, norms, dilation, checkpointing), scripting, bad input."""
import pytest
import torch
from torch import nn

from resdet.backbones import (
    FPN,
    LEVELS,
    RESNETS,
    BackboneWithFPN,
    BasicBlock,
    Bottleneck,
    FrozenBatchNorm2d,
    ResNet,
    ShapeSpec,
    build_resnet,
    resnet18,
)

DEPTHS = ["resnet18", "resnet50"]  # a BasicBlock and a Bottleneck depth
EXPECTED_C2 = {"resnet18": 64, "resnet50": 256}
# Heavier checks (backward, scripting) use resnet18 and a one-block-per-stage Bottleneck ResNet.
SMALL = {"resnet18": dict(block=BasicBlock, layers=[2, 2, 2, 2]),
         "bottleneck": dict(block=Bottleneck, layers=[1, 1, 1, 1])}


def _small(name: str, **options) -> ResNet:
    return ResNet(SMALL[name]["block"], SMALL[name]["layers"], **options)


def _x(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize("name", DEPTHS)
def test_levels_channels_strides_match_output_shape(name):
    model = build_resnet(name).eval()
    shapes = model.output_shape()
    assert list(shapes) == list(LEVELS)
    c2 = EXPECTED_C2[name]
    assert [s.channels for s in shapes.values()] == [c2, 2 * c2, 4 * c2, 8 * c2]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32]
    out = model(_x(2, 64))
    assert list(out) == list(shapes)
    for k, v in out.items():
        assert v.shape == (2, shapes[k].channels, 64 // shapes[k].stride, 64 // shapes[k].stride)


def test_every_named_model_builds_with_expected_widths():
    # Channel counts follow from the block; wide / ResNeXt only change the inner width.
    with torch.device("meta"):  # shapes only: skip allocating and initialising the weights
        for name, c5 in [("resnet34", 512), ("resnet101", 2048), ("resnext50_32x4d", 2048), ("wide_resnet50_2", 2048)]:
            model = build_resnet(name, out_features=("c5",))
            assert model.output_shape() == {"c5": ShapeSpec(c5, 32)}
        assert build_resnet("resnext50_32x4d").layer1[0].conv2.groups == 32
        assert build_resnet("wide_resnet50_2").layer1[0].conv2.out_channels == 128
    assert set(RESNETS) == {
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"
    }


def test_out_features_subset_builds_only_needed_stages():
    model = resnet18(out_features=("c3", "c2"))
    assert not hasattr(model, "layer3") and not hasattr(model, "layer4")
    out = model(_x(1))
    assert list(out) == ["c2", "c3"]
    assert model.output_shape() == {"c2": ShapeSpec(64, 4), "c3": ShapeSpec(128, 8)}


@pytest.mark.parametrize("name", DEPTHS)
@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_stride_by_dilation(name, output_stride):
    model = build_resnet(name, output_stride=output_stride).eval()
    strides = [s.stride for s in model.output_shape().values()]
    assert strides == [min(s, output_stride) for s in (4, 8, 16, 32)]
    out = model(_x(1, 32))
    for k, v in out.items():
        assert v.shape[-1] == 32 // model.output_shape()[k].stride
    # The last stage's later blocks are dilated (BasicBlock included), its first keeps the previous rate.
    assert model.layer4[1].conv2.dilation == (32 // output_stride,) * 2


@pytest.mark.parametrize("name", DEPTHS)
@pytest.mark.parametrize("frozen_stages", [0, 1, 2, 5])
def test_frozen_stages_no_grad_and_norm_eval_under_train(name, frozen_stages):
    model = build_resnet(name, frozen_stages=frozen_stages).train()
    frozen_prefixes = (["conv1.", "bn1."] if frozen_stages >= 1 else []) + [
        f"layer{i}." for i in range(1, frozen_stages)
    ]
    for pname, p in model.named_parameters():
        assert p.requires_grad == (not pname.startswith(tuple(frozen_prefixes))), pname
    model.eval().train()  # train() must keep the frozen part in eval mode
    for mname, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.training == (not (mname + ".").startswith(tuple(frozen_prefixes))), mname
    # Frozen BN statistics do not move during a training forward.
    if frozen_stages >= 2:
        before = model.layer1[0].bn1.running_mean.clone()
        model(_x(2, 32))
        assert torch.equal(before, model.layer1[0].bn1.running_mean)


def test_norm_options():
    assert isinstance(resnet18().bn1, nn.BatchNorm2d)  # default without weights: trainable BN
    assert isinstance(resnet18(norm="frozen_bn").layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(resnet18(norm="sync_bn").bn1, nn.SyncBatchNorm)
    gn = resnet18(norm="gn")
    assert isinstance(gn.layer2[0].downsample[1], nn.GroupNorm) and gn.bn1.num_groups == 32
    gn(_x(1))
    sync = resnet18(norm="sync_bn").train()
    sync(_x(2))  # falls back to plain BN outside distributed training
    model = resnet18(norm_eval=True).train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.layer1.training  # only the norms are switched to eval


@pytest.mark.parametrize("name", DEPTHS)
def test_zero_init_residual(name):
    model = build_resnet(name, zero_init_residual=True)
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            assert torch.all(m.last_norm().weight == 0)


def test_gradient_checkpointing_matches_plain_forward_and_grads():
    plain = _small("bottleneck").train()
    cp = _small("bottleneck", with_cp=True).train()
    cp.load_state_dict(plain.state_dict())
    x = _x(2, 32)
    outs = [sum(o.sum() for o in m(x).values()) for m in (plain, cp)]
    torch.testing.assert_close(outs[0], outs[1])
    for o in outs:
        o.backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), cp.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    per_stage = resnet18(with_cp=(False, False, True, True))
    assert not per_stage.layer1[0].with_cp and per_stage.layer4[0].with_cp


@pytest.mark.parametrize("name", SMALL)
def test_channels_last_matches_contiguous(name):
    model = _small(name).eval()
    x = _x(2)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last))
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_stem_equals_the_plain_ops_and_keeps_the_memory_format(norm):
    # On CPU the stem runs channels-last inside and hands layer1 NCHW: same values and gradients.
    model = resnet18(norm=norm).train()
    x = _x(2, 64).requires_grad_()
    out = model.forward_stem(x)
    ref = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    grads = [torch.autograd.grad(y, (x, model.conv1.weight), g) for y in (out, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    cl = model.forward_stem(_x(2, 64).to(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", SMALL)
def test_gradients_reach_every_trainable_parameter(name):
    model = BackboneWithFPN(_small(name, frozen_stages=2), FPN(_small(name).output_shape())).train()
    out = model(_x(2, 32))
    sum(v.mean() for v in out.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", SMALL)
def test_torchscript_backbone_and_fpn_equal_eager(name):
    model = BackboneWithFPN(_small(name), FPN(_small(name).output_shape(), top_block="p6p7")).eval()
    scripted = torch.jit.script(model)
    x = _x(1)
    ref, out = model(x), scripted(x)
    assert list(ref) == list(out)
    for k in ref:
        assert torch.equal(ref[k], out[k]), k
    body = torch.jit.script(_small(name, out_features=("c3",)).eval())
    assert list(body(x)) == ["c3"]


def test_bad_input_errors():
    model = resnet18()
    with pytest.raises(ValueError, match=r"\[N, C, H, W\].*3 dimensions"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="expected 3 input channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(TypeError, match="floating point.*uint8"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert resnet18(in_chans=1)(torch.randn(1, 1, 64, 64))["c5"].shape == (1, 512, 2, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm="batchnorm"), "unknown norm 'batchnorm'; expected one of .*frozen_bn"),
        (dict(frozen_stages=6), "frozen_stages must be in 0..5"),
        (dict(output_stride=4), r"output_stride must be one of \(8, 16, 32\)"),
        (dict(out_features=("c6",)), "out_features must be a non-empty subset"),
        (dict(with_cp=(True, False)), "with_cp must be a bool or four bools"),
    ],
)
def test_bad_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resnet18(**kwargs)


def test_unknown_depth_lists_accepted_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'.*resnet18"):
        build_resnet("resnet19")
    with pytest.raises(ValueError, match="groups=32"):
        ResNet(BasicBlock, [2, 2, 2, 2], groups=32)
