"""Loading torchvision / timm ImageNet ResNet checkpoints: parity, file formats, reporting, errors."""
import warnings

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from resdet.backbones import FrozenBatchNorm2d, build_resnet, build_resnet_fpn, load_checkpoint, resnet18

DEPTHS = ["resnet18", "resnet50"]
RETURN_LAYERS = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Give every BN non-trivial statistics so that parity tests really exercise them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tv_checkpoints(tmp_path_factory):
    """A random-weight torchvision resnet18 / resnet50 checkpoint per depth: (model, path)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name in DEPTHS:
        model = _randomize_norms(getattr(torchvision.models, name)(weights=None))
        path = root / f"{name}.pth"
        torch.save(model.state_dict(), path)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", DEPTHS)
def test_torchvision_checkpoint_gives_identical_c2_to_c5(name, tv_checkpoints):
    tv_model, path = tv_checkpoints[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = IntermediateLayerGetter(tv_model, RETURN_LAYERS)(x)
        ours = build_resnet(name, weights=path, norm="bn").eval()(x)
        frozen = build_resnet(name, weights=path).eval()  # default norm with weights: frozen_bn
        out_frozen = frozen(x)
    assert isinstance(frozen.bn1, FrozenBatchNorm2d)
    assert list(ours) == list(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
        # Frozen BN folds the statistics into one scale and shift: equal up to float rounding.
        torch.testing.assert_close(out_frozen[k], ref[k], rtol=1e-4, atol=1e-4 * ref[k].abs().max().item())


@pytest.mark.parametrize("name", DEPTHS)
def test_timm_checkpoint_gives_identical_c2_to_c5(name, tmp_path):
    timm_model = _randomize_norms(timm.create_model(name, pretrained=False))
    path = tmp_path / f"timm_{name}.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = timm_model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        ours = build_resnet(name, weights=path, norm="bn").eval()(x)
    for a, b in zip(ref, ours.values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "safetensors"])
def test_checkpoint_formats_and_module_prefix(wrap, tv_checkpoints, tmp_path):
    tv_model, _ = tv_checkpoints["resnet18"]
    sd = tv_model.state_dict()
    if wrap == "safetensors":
        path = tmp_path / "r18.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "r18.pt"
        torch.save({wrap: {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    loaded = load_checkpoint(path)
    assert set(loaded) == set(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # classifier keys are dropped silently
        model = resnet18(weights=str(path), norm="bn")
    assert torch.equal(model.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])


def test_truncated_backbone_loads_without_warnings(tv_checkpoints):
    _, path = tv_checkpoints["resnet18"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = resnet18(weights=path, out_features=("c3",))
    assert not hasattr(model, "layer3")


def test_missing_and_unexpected_keys_reported_by_name(tv_checkpoints, tmp_path):
    tv_model, _ = tv_checkpoints["resnet18"]
    sd = dict(tv_model.state_dict())
    del sd["layer2.0.bn1.running_var"]
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.warns(UserWarning, match=r"missing keys.*layer2\.0\.bn1\.running_var.*unexpected keys.*extra\.weight"):
        resnet18(weights=path)


def test_checkpoint_of_another_depth_is_an_error(tv_checkpoints, tmp_path):
    _, r50 = tv_checkpoints["resnet50"]
    with pytest.raises(ValueError, match=r"(?s)another shape.*probably a checkpoint of another depth"):
        resnet18(weights=r50)
    r34 = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), r34)  # same shapes, more blocks
    with pytest.raises(ValueError, match=r"(?s)another depth.*block layer1\.2: only in the checkpoint"):
        resnet18(weights=r34)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resnet18(weights=tmp_path / "missing.pth")
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 1}, path)
    with pytest.raises(ValueError, match="holds no state dict of tensors"):
        load_checkpoint(path)


def test_fpn_builder_with_weights_freezes_like_torchvision(tv_checkpoints):
    _, path = tv_checkpoints["resnet18"]
    model = build_resnet_fpn("resnet18", weights=path)
    assert model.body.frozen_stages == 2 and isinstance(model.body.bn1, FrozenBatchNorm2d)
    assert not model.body.layer1[0].conv1.weight.requires_grad and model.body.layer2[0].conv1.weight.requires_grad
