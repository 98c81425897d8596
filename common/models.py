"""Model construction: torchvision backbones or a tiny CNN, a new head, DP-compatible variants, safe weight loading.

Every architecture ends in global-average-pool -> Linear, so Grad-CAM on `cam_target_layer` reduces to
ReLU(sum_k w_ck A_k) and one forward pass gives the maps of all findings (see explain code).
"""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

from common.settings import ModelConfig
from common.errors import FedxrayError

log = logging.getLogger(__name__)

_TV_BUILDERS = {
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "densenet121": (tvm.densenet121, tvm.DenseNet121_Weights.IMAGENET1K_V1),
}


class SmallCNN(nn.Module):
    """Tiny fast CNN for tests and demos: 4 x (conv-BN-ReLU-maxpool), then the resnet-style head (avgpool -> fc)."""

    def __init__(self, num_outputs: int, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        blocks, c = [], in_channels
        for w in widths:
            blocks.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                                        nn.ReLU(), nn.MaxPool2d(2)))
            c = w
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(c, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class _DenseNet(tvm.DenseNet):
    """torchvision DenseNet whose final ReLU lives inside `features` (as `relu5`) instead of an in-place F.relu.

    So `features` outputs exactly what is pooled (exact Grad-CAM fast path) and nothing is modified in place
    (Opacus hooks mode). State-dict keys are unchanged: ReLU has no parameters.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class _DPBasicBlock(BasicBlock):
    """BasicBlock with `out = out + identity`: the stock `+=` breaks Opacus' backward hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _DPBottleneck(Bottleneck):
    """Bottleneck with `out = out + identity` (see _DPBasicBlock)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's network inside an Opacus GradSampleModule (`_module`) or DataParallel (`module`)."""
    for attr in ("_module", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return unwrapped(inner)
    return model


def _head_name(model: nn.Module) -> str:
    return "classifier" if isinstance(model, tvm.DenseNet) else "fc"


def _make_head(in_features: int, num_outputs: int, dropout: float) -> nn.Module:
    linear = nn.Linear(in_features, num_outputs)
    return nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _adapt_input_filters(w: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters -> `in_channels` filters whose response to a grey image replicated on all channels is unchanged."""
    return w.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels


def _replace_first_conv(model: nn.Module, in_channels: int, keep_weights: bool) -> None:
    name, old = _first_conv(model)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    bias=old.bias is not None)
    if keep_weights:
        with torch.no_grad():
            new.weight.copy_(_adapt_input_filters(old.weight, in_channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _imagenet_backbone(arch: str) -> nn.Module:
    builder, weights = _TV_BUILDERS[arch]
    try:
        return builder(weights=weights, progress=False)
    except Exception as e:  # no network, proxy, corrupt cached file, hash mismatch...
        filename = weights.url.rsplit("/", 1)[-1]
        target = Path(torch.hub.get_dir()) / "checkpoints" / filename
        raise FedxrayError(
            f"could not get the ImageNet weights for {arch} ({type(e).__name__}: {e}). Without network access, "
            f"download {weights.url} elsewhere and place it at {target} (that is $TORCH_HOME/hub/checkpoints/"
            f"{filename}; TORCH_HOME defaults to ~/.cache/torch), or pass model.weights=/path/to/file.pth|.safetensors, "
            f"or model.weights=none for random initialisation (--set model.weights=none)."
        ) from e


def build_model(cfg: ModelConfig, num_outputs: int, in_channels: int = 3) -> nn.Module:
    """The network for `cfg` with a `num_outputs`-way head; weights: 'imagenet', 'none' or a state-dict path."""
    if num_outputs < 1 or in_channels < 1:
        raise ValueError(f"num_outputs and in_channels must be >= 1, got {num_outputs}, {in_channels}")
    weights = cfg.weights.strip()
    imagenet = weights.lower() == "imagenet"
    if cfg.arch == "smallcnn":
        if imagenet:
            raise FedxrayError("smallcnn has no pretrained weights: use model.weights=none or a path to a state dict")
        model: nn.Module = SmallCNN(num_outputs, in_channels)
    else:
        model = _imagenet_backbone(cfg.arch) if imagenet else _TV_BUILDERS[cfg.arch][0](weights=None)
        if isinstance(model, tvm.DenseNet):
            model.features.add_module("relu5", nn.ReLU())
            model.__class__ = _DenseNet
        _replace_first_conv(model, in_channels, keep_weights=imagenet)
    head = _head_name(model)
    setattr(model, head, _make_head(classifier_head(model).in_features, num_outputs, cfg.dropout))
    if cfg.dp_compatible:
        model = make_dp_compatible(model)
    if not imagenet and weights.lower() != "none":
        _load_backbone(model, load_state_dict_file(weights), source=weights, arch=cfg.arch)
    return model


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """A copy Opacus can train (hooks mode verified by tests): BatchNorm -> GroupNorm and no in-place ops.

    ModuleValidator.fix alone is not enough: it passes validation but hooks/functorch/ghost modes crash on
    `nn.ReLU(inplace=True)` and `out += identity` in ResNet blocks. Blocks get a subclass whose forward adds
    out of place, so state-dict keys equal those of the fixed model.
    """
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(model)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
        if type(m) is BasicBlock:
            m.__class__ = _DPBasicBlock
        elif type(m) is Bottleneck:
            m.__class__ = _DPBottleneck
        elif type(m) is tvm.DenseNet:  # not built here: its forward uses F.relu(inplace=True)
            m.features.add_module("relu5", nn.ReLU())
            m.__class__ = _DenseNet
    return model


def strip_wrapper_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel ('module.') and Opacus GradSampleModule ('_module.') prefixes."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_module.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or torch .pt/.pth file, or a bundle directory (its weights.safetensors: a
    warm start made by `fedxray pretrain`); never unpickles arbitrary objects (weights_only)."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "weights.safetensors").is_file():
        p = p / "weights.safetensors"
    if not p.is_file():
        raise FedxrayError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FedxrayError(
            f"{p}: refused: the file holds Python objects, not just tensors (loading it could run code). Save "
            f"a plain state dict (torch.save(model.state_dict(), path)) or a .safetensors file. Detail: {e}"
        ) from e
    except Exception as e:
        raise FedxrayError(f"{p}: cannot read weights: {type(e).__name__}: {e}") from e
    while isinstance(obj, dict):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise FedxrayError(f"{p}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise FedxrayError(f"{p}: contains no tensors (keys: {list(obj)[:5]})")
    return strip_wrapper_prefixes(tensors)


# BatchNorm's buffers: data statistics that travel with the weights but are not weights (server/strategies.py
# averages them plainly; client/mods.py gives them more SecAgg+ headroom)
RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def is_running_statistic(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in RUNNING_STATISTICS


_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _load_backbone(model: nn.Module, sd: dict[str, torch.Tensor], *, source: str, arch: str) -> None:
    """Load what fits; a head of another size is skipped (fine-tuning), any other mismatch is an error."""
    if isinstance(model, tvm.DenseNet):  # legacy torchvision checkpoints name layers 'norm.1' instead of 'norm1'
        sd = {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in sd.items()}
    target = model.state_dict()
    first_conv = _first_conv(model)[0] + ".weight"
    head = _head_name(model) + "."
    load, skipped_head, bad = {}, [], []
    for k, v in sd.items():
        if k not in target:
            continue
        t = target[k]
        if t.shape == v.shape:
            load[k] = v
        elif k == first_conv and v.ndim == 4 and v.shape[0] == t.shape[0] and v.shape[2:] == t.shape[2:]:
            load[k] = _adapt_input_filters(v, t.shape[1])
        elif k.startswith(head):
            skipped_head.append(k)
        else:
            bad.append(f"{k} (file {tuple(v.shape)}, model {tuple(t.shape)})")
    if bad:
        raise FedxrayError(f"{source}: tensors do not fit {arch}: {', '.join(bad[:5])}"
                           + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    if not any(not k.startswith(head) for k in load):
        raise FedxrayError(f"{source}: none of its {len(sd)} backbone tensors match {arch} (file has e.g. "
                           f"{list(sd)[:3]}, model expects e.g. {list(target)[:3]}): wrong architecture?")
    # (num_batches_tracked aside: checkpoints of torchvision before 0.4.1 have none)
    stats = [k for k in target
             if k not in sd and is_running_statistic(k) and not k.endswith("num_batches_tracked")]
    if stats:   # GroupNorm weights in BatchNorm layers would normalise with running statistics of 0 and 1
        raise FedxrayError(f"{source}: has no BatchNorm running statistics for {arch} (e.g. {stats[0]}): it was "
                           "trained as the GroupNorm network (model.dp_compatible=true, e.g. `fedxray pretrain`'s "
                           "default); set model.dp_compatible=true to start from it")
    model.load_state_dict(load, strict=False)
    if skipped_head:
        log.warning("%s: head tensors of another shape skipped (head stays randomly initialised): %s",
                    source, skipped_head)
    missing = [k for k in target if k not in load and not k.startswith(head)]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        log.warning("%s: %d model tensors not in the file (kept initial values): %s; %d file tensors unused: %s",
                    source, len(missing), missing[:10], len(unexpected), unexpected[:10])


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final Linear layer (inside fc/classifier, which may be Sequential(Dropout, Linear))."""
    model = unwrapped(model)
    head = getattr(model, "classifier", None) if isinstance(model, tvm.DenseNet) else getattr(model, "fc", None)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in (head.modules() if head is not None else model.modules()) if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"no Linear classifier head found in {type(model).__name__}")
    return linears[-1]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (or unfreeze) everything but the head, for a warm-up that trains only the new classifier."""
    model.requires_grad_(trainable)
    model = unwrapped(model)
    getattr(model, _head_name(model)).requires_grad_(True)


DP_TRAINABLE = ("all", "last-block+head", "norm+head")   # privacy.trainable's concrete choices (besides "auto")


def last_block(model: nn.Module) -> list[nn.Module]:
    """The modules after the last stage boundary: ResNet layer4, DenseNet denseblock4 + norm5, SmallCNN's last
    conv block. With the head, what partial fine-tuning trains."""
    model = unwrapped(model)
    if isinstance(model, SmallCNN):
        return [model.features[-1]]
    if hasattr(model, "layer4"):
        return [model.layer4]
    if isinstance(model, tvm.DenseNet):
        return [model.features.denseblock4, model.features.norm5]
    raise TypeError(f"no last block known for {type(model).__name__}")


_NORMS = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm, nn.InstanceNorm2d)


def set_trainable(model: nn.Module, part: str) -> list[str]:
    """Make only `part` trainable (DP_TRAINABLE): everything, the last block + head, or every normalisation
    layer + head. Frozen parameters get no gradient, so Opacus computes, clips and noises per-sample gradients
    for the trainable ones only. Returns the names of the trainable parameters."""
    if part not in DP_TRAINABLE:
        raise ValueError(f"trainable part must be one of {DP_TRAINABLE}, got {part!r}")
    net = unwrapped(model)
    net.requires_grad_(part == "all")
    if part != "all":
        parts = last_block(net) if part == "last-block+head" else [m for m in net.modules() if isinstance(m, _NORMS)]
        for m in [*parts, getattr(net, _head_name(net))]:
            m.requires_grad_(True)
    return [n for n, p in net.named_parameters() if p.requires_grad]


def cam_target_layer(model: nn.Module) -> nn.Module:
    """The last conv block, whose output is exactly what the global average pool sees."""
    model = unwrapped(model)
    if isinstance(model, SmallCNN):
        return model.features[-1]
    if hasattr(model, "layer4"):
        return model.layer4
    if isinstance(model, tvm.DenseNet):
        return model.features  # ends with relu5 when built here
    raise TypeError(f"no CAM target layer known for {type(model).__name__}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
