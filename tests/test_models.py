"""Model zoo: shapes, head/CAM layer wiring, weight loading (safe), ImageNet offline error, Opacus compatibility."""
from __future__ import annotations

import logging
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from common.settings import ModelConfig
from common.errors import FedxrayError
from common.models import (build_model, cam_target_layer, classifier_head, count_parameters,
                           load_state_dict_file, make_dp_compatible, set_backbone_trainable)

ARCHS = ["smallcnn", "resnet18", "resnet50", "densenet121"]


def cfg(arch: str = "smallcnn", **kw) -> ModelConfig:
    return ModelConfig(arch=arch, weights=kw.pop("weights", "none"), **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_arch_gives_batch_by_findings(arch, in_channels):
    model = build_model(cfg(arch, dropout=0.2), num_outputs=5, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 64, 64))
    assert out.shape == (2, 5)
    assert classifier_head(model).out_features == 5
    assert count_parameters(model) > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_target_layer_feeds_avgpool_then_head(arch, dropout):
    """The Grad-CAM fast path needs: output == head(avgpool(target layer output))."""
    model = build_model(cfg(arch, dropout=dropout), num_outputs=3).eval()
    head = classifier_head(model)
    assert isinstance(head, nn.Linear)
    seen = {}
    handle = cam_target_layer(model).register_forward_hook(lambda m, i, o: seen.update(a=o))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
        handle.remove()
        again = head(F.adaptive_avg_pool2d(seen["a"], 1).flatten(1))
    assert seen["a"].ndim == 4
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-5)


def test_cam_target_layers_are_the_expected_modules():
    assert cam_target_layer(m := build_model(cfg("resnet18"), 2)) is m.layer4
    assert cam_target_layer(m := build_model(cfg("densenet121"), 2)) is m.features
    assert cam_target_layer(m := build_model(cfg("smallcnn"), 2)) is m.features[-1]
    assert classifier_head(m) is m.fc


def test_imagenet_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):  # guarantee a fast failure even on a machine with network
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FedxrayError) as e:
        build_model(cfg("resnet18", weights="imagenet"), 2)
    msg = str(e.value)
    assert "TORCH_HOME" in msg and str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "weights=" in msg


def test_smallcnn_has_no_imagenet_weights():
    with pytest.raises(FedxrayError, match="no pretrained weights"):
        build_model(cfg("smallcnn", weights="imagenet"), 2)


def test_weights_from_safetensors_and_pt(tmp_path, caplog):
    from safetensors.torch import save_file

    src = build_model(cfg(), 4)
    sd = src.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_state_dict_file(tmp_path / name)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
        model = build_model(cfg(weights=str(tmp_path / name)), 4)
        assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    # Another number of findings: backbone loads, head is skipped with a warning
    with caplog.at_level(logging.WARNING, logger="common.models"):
        model = build_model(cfg(weights=str(tmp_path / "w.pt")), 2)
    assert "fc.weight" in caplog.text
    assert torch.equal(model.features[0][0].weight, sd["features.0.0.weight"])
    # Grayscale model from an RGB checkpoint: filters summed over the input channels
    gray = build_model(cfg(weights=str(tmp_path / "w.pt")), 4, in_channels=1)
    torch.testing.assert_close(gray.features[0][0].weight, sd["features.0.0.weight"].sum(1, keepdim=True))


def test_unsafe_or_wrong_weight_files_are_refused(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "pickled_module.pt")  # a pickled object, not a state dict
    with pytest.raises(FedxrayError, match="refused"):
        load_state_dict_file(tmp_path / "pickled_module.pt")
    with pytest.raises(FedxrayError, match="not found.*nope.pt"):
        build_model(cfg(weights=str(tmp_path / "nope.pt")), 2)
    torch.save(build_model(cfg("resnet18"), 2).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(FedxrayError, match="match smallcnn"):
        build_model(cfg(weights=str(tmp_path / "r18.pt")), 2)


def test_set_backbone_trainable():
    model = build_model(cfg("resnet18", dropout=0.1), 3)
    set_backbone_trainable(model, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.1.weight", "fc.1.bias"}
    assert count_parameters(model, trainable_only=True) == 512 * 3 + 3
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_dp_variant_validates_and_keeps_fixed_keys(arch):
    from opacus.validators import ModuleValidator

    plain = build_model(cfg(arch), 2)
    dp = build_model(cfg(arch, dp_compatible=True), 2)
    assert ModuleValidator.validate(dp, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dp.modules())
    assert not any(getattr(m, "inplace", False) for m in dp.modules())
    assert dp.state_dict().keys() == ModuleValidator.fix(plain).state_dict().keys()


def _one_dp_step(model: nn.Module) -> tuple[dict, dict]:
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 2)).float())
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        grad_sample_mode="hooks", poisson_sampling=False)
    x, y = next(iter(loader))
    nn.BCEWithLogitsLoss()(module(x), y).backward()
    optimizer.step()
    return before, dict(model.named_parameters())


def test_one_real_dp_sgd_step_on_resnet50_variant():
    before, after = _one_dp_step(build_model(cfg("resnet50", dp_compatible=True), 2))
    assert all(torch.isfinite(p).all() for p in after.values())
    assert all(not torch.equal(before[n], after[n]) for n in before)  # noise reaches every parameter


def test_stock_resnet_with_only_validator_fix_crashes_in_hooks_mode():
    """Why make_dp_compatible does more than ModuleValidator.fix: in-place ReLU and `out += identity`."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(tvm.resnet18(num_classes=2))
    assert ModuleValidator.validate(fixed, strict=False) == []  # the validator does not see the problem
    with pytest.raises(RuntimeError, match="inplace"):
        _one_dp_step(fixed)
    # the same stock model, made compatible, trains
    _, after = _one_dp_step(make_dp_compatible(ModuleValidator.fix(tvm.resnet18(num_classes=2))))
    assert all(torch.isfinite(p).all() for p in after.values())


def test_groupnorm_weights_into_a_batchnorm_network_are_refused_with_the_setting_to_change(tmp_path):
    """`fedxray pretrain` trains the GroupNorm network; loading it into the BatchNorm one would leave every
    BatchNorm with running statistics 0 and 1 under GroupNorm's affine weights: an error, not a warning."""
    from safetensors.torch import save_file

    gn = build_model(cfg("resnet18", dp_compatible=True), 2)
    path = tmp_path / "gn.safetensors"
    save_file({k: v.contiguous() for k, v in gn.state_dict().items()}, path)
    with pytest.raises(FedxrayError, match="model.dp_compatible=true"):
        build_model(cfg("resnet18", weights=str(path)), 2)
    again = build_model(cfg("resnet18", weights=str(path), dp_compatible=True), 2)   # the same network: loads
    assert all(torch.equal(a, b) for a, b in zip(gn.state_dict().values(), again.state_dict().values()))
