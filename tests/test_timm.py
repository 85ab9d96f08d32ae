"""resdet_* models in timm: registration, features_only wrappers, pretrained files, timm's model contract.

The CIFAR variants run the checks of timm's own ``tests/test_models.py`` (the offline ones: forward with
and without gradient checkpointing, backward reaching every parameter, the default-config contract,
TorchScript, features_only, FX forward and backward), written here for one depth; the README gives the
command that runs timm's file itself on every resdet_* model.
"""
import inspect

import pytest
import timm
import torch
import torchvision
from timm.models import group_parameters

import resdet  # noqa: F401  (registers resdet_* with timm)
from resdet.backbones import build_cifar_resnet, build_resnet
from resdet.backbones.timm_models import CIFAR_MODEL_NAMES, IMAGENET_MODEL_NAMES, MODEL_NAMES

NAMES = ["resdet_resnet18", "resdet_resnet50"]  # a BasicBlock and a Bottleneck depth
X = torch.randn(1, 3, 64, 64)


def test_registered_with_pretrained_cfgs_and_timm_names_untouched():
    assert set(timm.list_models("resdet_*")) == set(MODEL_NAMES)
    assert set(IMAGENET_MODEL_NAMES) == {
        "resdet_resnet18", "resdet_resnet34", "resdet_resnet50", "resdet_resnet101", "resdet_resnet152",
        "resdet_resnext50_32x4d", "resdet_wide_resnet50_2",
    }
    assert set(CIFAR_MODEL_NAMES) == {f"resdet_cifar_resnet{d}" for d in (20, 32, 44, 56, 110, 1202)}
    for name in MODEL_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        cifar = name in CIFAR_MODEL_NAMES
        assert cfg.first_conv == "conv1" and cfg.classifier == "fc" and cfg.num_classes == (10 if cifar else 1000)
        assert cfg.input_size == ((3, 32, 32) if cifar else (3, 224, 224))
    # timm's own resnets are still timm's.
    assert timm.models.model_entrypoint("resnet18").__module__ == "timm.models.resnet"
    assert type(timm.create_model("resnet18")).__module__ == "timm.models.resnet"


@pytest.mark.parametrize("feature_cls", ["list", "dict", "hook", "fx", "getter"])
def test_features_only_returns_c2_to_c5_like_timm_resnet34(feature_cls):
    feats = timm.create_model("resdet_resnet34", features_only=True, out_indices=(1, 2, 3, 4), feature_cls=feature_cls)
    reference = timm.create_model("resnet34", features_only=True, out_indices=(1, 2, 3, 4))
    assert feats.feature_info.channels() == reference.feature_info.channels() == [64, 128, 256, 512]
    assert feats.feature_info.reduction() == reference.feature_info.reduction() == [4, 8, 16, 32]
    backbone = build_resnet("resnet34").eval()
    # Wrappers prefix the model's keys ("model.", "body.", "graph_module.") but keep its names.
    prefix = {"getter": "model.", "hook": "body.", "fx": "graph_module."}.get(feature_cls, "")
    backbone.load_state_dict({k.removeprefix(prefix): v for k, v in feats.state_dict().items()})
    out = feats.eval()(X)
    out = list(out.values()) if isinstance(out, dict) else out
    ref = backbone(X)
    assert len(out) == 4
    for a, b in zip(out, ref.values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_default_features_only_has_timm_resnet_layout(name):
    feats = timm.create_model(name, features_only=True).eval()
    assert feats.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert feats.feature_info.channels()[0] == 64
    out = feats(X)
    assert [o.shape[1] for o in out] == feats.feature_info.channels()
    assert [64 // o.shape[-1] for o in out] == feats.feature_info.reduction()


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 42)
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", NAMES)
def test_head_contract(name):
    model = timm.create_model(name).eval()
    state = model.state_dict()
    assert model.pretrained_cfg["first_conv"] + ".weight" in state and "fc.weight" in state
    feats = model.forward_features(X)
    assert feats.shape == (1, model.num_features, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == "fc"
    model.reset_classifier(0)
    assert model(X).shape == (1, model.num_features)
    model.reset_classifier(0, "")
    assert model(X).shape == (1, model.num_features, 2, 2)
    model.reset_classifier(7, "avg")
    assert model(X).shape == (1, 7)
    assert timm.create_model(name, num_classes=0, global_pool="").eval()(X).shape == (1, model.num_features, 2, 2)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates(name):
    model = timm.create_model(name).eval()
    final, inter = model.forward_intermediates(X)
    torch.testing.assert_close(final, model.forward_features(X))
    info = model.feature_info
    assert [t.shape[1] for t in inter] == [i["num_chs"] for i in info]
    assert [64 // t.shape[-1] for t in inter] == [i["reduction"] for i in info]
    only = model.forward_intermediates(X, indices=[1, 2], stop_early=True, intermediates_only=True)
    assert [t.shape[1] for t in only] == [info[1]["num_chs"], info[2]["num_chs"]]
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        model.forward_intermediates(X, output_fmt="NHWC")


def test_group_matcher_covers_every_parameter_and_grad_checkpointing():
    model = timm.create_model("resdet_resnet18")
    groups = group_parameters(model, model.group_matcher(coarse=True))
    grouped = {n for names in groups.values() for n in names}
    assert grouped == {n for n, _ in model.named_parameters()}
    model.train()
    ref = model(X.expand(2, -1, -1, -1))
    model.set_grad_checkpointing(True)
    assert model.layer2[0].with_cp
    torch.testing.assert_close(model(X.expand(2, -1, -1, -1)), ref)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", NAMES)
def test_torchscript_equals_eager(name):
    model = timm.create_model(name).eval()
    scripted = torch.jit.script(model)
    assert torch.equal(scripted(X), model(X))


def test_meta_device_in_chans_and_unknown_kwargs():
    with torch.device("meta"):
        model = timm.create_model("resdet_resnet50")
    assert model.conv1.weight.is_meta
    assert timm.create_model("resdet_resnet50", device="meta").fc.weight.is_meta
    assert timm.create_model("resdet_resnet18", dtype=torch.float64).fc.weight.dtype == torch.float64
    gray = timm.create_model("resdet_resnet18", in_chans=1).eval()
    assert gray(torch.randn(1, 1, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match="expected 1 input channels"):
        gray(X)
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        timm.create_model("resdet_resnet18", foo=1)


@pytest.fixture(scope="module")
def tv_resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_pretrained_file_loads_torchvision_checkpoint(tv_resnet18_file):
    tv_model, path = tv_resnet18_file
    model = timm.create_model("resdet_resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert torch.equal(model(X), tv_model(X))
    feats = timm.create_model(
        "resdet_resnet18", pretrained=True, features_only=True, out_indices=(1, 2, 3, 4),
        pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()
    assert torch.equal(feats(X)[-1], tv_model.layer4(tv_model.layer3(tv_model.layer2(tv_model.layer1(
        tv_model.maxpool(tv_model.relu(tv_model.bn1(tv_model.conv1(X)))))))))
    gray = timm.create_model(
        "resdet_resnet18", pretrained=True, in_chans=1, num_classes=5, pretrained_cfg_overlay=dict(file=str(path))
    )
    torch.testing.assert_close(gray.conv1.weight[:, 0], tv_model.conv1.weight.sum(dim=1))


# ------------------------------------------------------------------------------------------ CIFAR variants
CIFAR = "resdet_cifar_resnet20"
XC = torch.randn(1, 3, 32, 32)  # the default config's input size


def test_cifar_forward_and_grad_checkpointing():
    model = timm.create_model(CIFAR).eval()
    assert float(model.layer2[1].bn2.weight.abs().sum()) == 0  # timm's zero_init_last convention
    assert float(timm.create_model(CIFAR, zero_init_residual=False).layer2[1].bn2.weight.min()) == 1
    out = model(XC)
    assert out.shape == (1, 10) and not out.isnan().any()
    model.set_grad_checkpointing()
    assert all(block.with_cp for stage in (model.layer1, model.layer2, model.layer3) for block in stage)
    torch.testing.assert_close(model(XC), out, rtol=1e-4, atol=1e-5)


def test_cifar_backward_reaches_every_parameter():
    model = timm.create_model(CIFAR, num_classes=42).train()
    out = model(torch.randn(2, 3, 32, 32))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_cifar_default_cfg_contract():
    cfg = timm.models.get_pretrained_cfg(CIFAR)
    model = timm.create_model(CIFAR).eval()
    assert model.in_chans == cfg.input_size[0] and model.num_classes == 10 and model.head_hidden_size == 64
    x = torch.randn(1, *cfg.input_size)
    feats = model.forward_features(x)
    assert feats.shape == (1, model.num_features, *cfg.pool_size)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    model.to(torch.bfloat16)  # a dtype change after a forward leaves nothing stale behind
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    model.reset_classifier(0, "")
    assert model(x).shape == feats.shape
    assert timm.create_model(CIFAR, num_classes=0).eval()(x).shape == pre.shape
    assert timm.create_model(CIFAR, num_classes=0, global_pool="").eval()(x).shape == feats.shape
    state = model.state_dict()
    assert cfg.first_conv + ".weight" in state and cfg.classifier + ".weight" in timm.create_model(CIFAR).state_dict()
    # API details the optimizer factory and create_model rely on
    with pytest.raises(TypeError):
        timm.create_model(CIFAR, not_a_model_arg=1)
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    assert {n for names in grouped.values() for n in names} == {n for n, _ in model.named_parameters()}
    # meta device and dtype: creation, and a new head on the model's device/dtype and in its mode
    meta = timm.create_model(CIFAR, device="meta", dtype=torch.float32)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    meta.to(dtype=torch.float64).train()
    meta.reset_classifier(0)
    meta.reset_classifier(2)
    assert meta.fc.weight.is_meta and meta.fc.weight.dtype == torch.float64 and meta.fc.training
    frozen = timm.create_model(CIFAR, device="meta").requires_grad_(False)
    frozen.reset_classifier(0)
    frozen.reset_classifier(0, "")
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_torchscript_equals_eager(shortcut):
    with timm.layers.set_layer_config(scriptable=True):
        model = timm.create_model(CIFAR, shortcut=shortcut).eval()
    assert torch.equal(torch.jit.script(model)(XC), model(XC))


@pytest.mark.parametrize("feature_cls", ["list", "hook", "fx", "getter"])
def test_cifar_features_only_three_levels(feature_cls):
    feats = timm.create_model(CIFAR, features_only=True, feature_cls=feature_cls).eval()
    assert feats.feature_info.channels() == [16, 32, 64] and feats.feature_info.reduction() == [1, 2, 4]
    x = torch.randn(1, 3, 40, 24)
    out = feats(x)
    out = list(out.values()) if isinstance(out, dict) else out
    assert [tuple(o.shape) for o in out] == [(1, 16, 40, 24), (1, 32, 20, 12), (1, 64, 10, 6)]
    # the trunk as a resdet backbone gives the same named levels
    trunk = build_cifar_resnet("cifar_resnet20").eval()
    prefix = {"getter": "model.", "hook": "body.", "fx": "graph_module."}.get(feature_cls, "")
    trunk.load_state_dict({k.removeprefix(prefix): v for k, v in feats.state_dict().items()})
    assert {k: s.stride for k, s in trunk.output_shape().items()} == {"c2": 1, "c3": 2, "c4": 4}
    for a, b in zip(out, trunk(x).values()):
        torch.testing.assert_close(a, b)


def test_cifar_forward_intermediates_and_pruning():
    model = timm.create_model(CIFAR).eval()
    final, inter = model.forward_intermediates(XC)
    torch.testing.assert_close(final, model.forward_features(XC))
    assert [t.shape[1] for t in inter] == [16, 32, 64]
    only = model.forward_intermediates(XC, indices=[0, 1], stop_early=True, intermediates_only=True)
    assert [t.shape[1] for t in only] == [16, 32]
    assert model.prune_intermediate_layers(indices=[1]) == [1]
    assert len(model.layer3) == 0 and model.num_features == 32 and model(XC).shape == (1, 32, 16, 16)


def test_cifar_fx_forward_and_backward():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(leaf_modules=timm.models.get_notrace_modules(),
                         autowrap_functions=timm.models.get_notrace_functions())
    model = timm.create_model(CIFAR, num_classes=42)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                  tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx.eval()(XC).values())), model.eval()(XC), rtol=1e-4, atol=1e-5)
    out = next(iter(fx.train()(torch.randn(2, 3, 32, 32)).values()))
    out.mean().backward()
    assert out.shape == (2, 42) and all(p.grad is not None for p in fx.parameters())
