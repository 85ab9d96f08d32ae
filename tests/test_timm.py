"""resdet_* models in timm: registration, features_only wrappers, pretrained files, timm's model contract."""
import pytest
import timm
import torch
import torchvision
from timm.models import group_parameters

import resdet  # noqa: F401  (registers resdet_* with timm)
from resdet.backbones import build_resnet
from resdet.backbones.timm_models import MODEL_NAMES

NAMES = ["resdet_resnet18", "resdet_resnet50"]  # a BasicBlock and a Bottleneck depth
X = torch.randn(1, 3, 64, 64)


def test_registered_with_pretrained_cfgs_and_timm_names_untouched():
    assert set(timm.list_models("resdet_*")) == set(MODEL_NAMES)
    assert set(MODEL_NAMES) == {
        "resdet_resnet18", "resdet_resnet34", "resdet_resnet50", "resdet_resnet101", "resdet_resnet152",
        "resdet_resnext50_32x4d", "resdet_wide_resnet50_2",
    }
    for name in MODEL_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.first_conv == "conv1" and cfg.classifier == "fc" and cfg.num_classes == 1000
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
