"""One place for every setting: pydantic models that validate, serialise into the model bundle, and load from TOML.

Each section is used by exactly one concern (data, preprocessing, augmentation, model, training), so a
bundle can carry the preprocessing and model sections to the inference API unchanged.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreprocessConfig(_Section):
    """Deterministic image preparation shared by training and serving (stored in model.json)."""

    image_size: int = Field(224, ge=16, le=1024, description="Square side in pixels after resize")
    denoise_sigma: float = Field(1.0, ge=0.0, le=5.0, description="Gaussian denoising sigma in output pixels; 0 = off")
    normalize: Literal["imagenet", "unit"] = Field(
        "imagenet", description="imagenet: ImageNet mean/std per channel; unit: (x-0.5)/0.5"
    )
    channels: Literal[1, 3] = Field(3, description="Grayscale replicated to 3 channels for ImageNet backbones")

    @property
    def mean(self) -> tuple[float, ...]:
        m = IMAGENET_MEAN if self.normalize == "imagenet" else (0.5, 0.5, 0.5)
        return m[: self.channels]

    @property
    def std(self) -> tuple[float, ...]:
        s = IMAGENET_STD if self.normalize == "imagenet" else (0.5, 0.5, 0.5)
        return s[: self.channels]


class AugmentConfig(_Section):
    """Training-only augmentation; every transform can be switched off by setting its strength to 0."""

    enabled: bool = True
    rotation_deg: float = Field(15.0, ge=0, le=45)
    zoom: float = Field(0.1, ge=0, le=0.5, description="Random scale in [1-zoom, 1+zoom]")
    hflip_p: float = Field(0.5, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1, description="Contrast factor in [1-c, 1+c]")


class DataConfig(_Section):
    """Where the images are and how to read them; see common/data/sources.py for each source."""

    source: Literal["auto", "chestxray14", "chexpert", "medmnist", "folder", "csv"] = Field(
        "auto", description="auto: detected from the path by common.data.sources.detect_source, for every command")
    path: str = ""
    findings: list[str] | None = Field(None, description="Subset/order of findings; None = all the source has")
    uncertainty: Literal["u-ones", "u-zeros", "u-ignore"] = "u-ones"
    frontal_only: bool = True
    min_resolution: int = Field(64, ge=1, description="Images whose shorter side is below this are excluded")
    split_fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    official_split: Literal["keep", "resplit"] = Field(
        "keep", description="keep: a split the source ships (test, val) is used as shipped; resplit: it is ignored "
                            "and a fresh patient-level split is made with split_fractions")
    seed: int = 42
    cache_images: bool = True
    max_samples: int | None = Field(None, ge=1, description="Cap per split (debugging / benchmarks)")

    @model_validator(mode="before")
    @classmethod
    def _old_use_official_test(cls, data: Any) -> Any:
        """`use_official_test` (a bool) was this setting's name; False meant resplit. Still accepted as input."""
        if isinstance(data, dict) and "use_official_test" in data:
            data = dict(data)
            keep = data.pop("use_official_test")
            data.setdefault("official_split", "keep" if keep else "resplit")
        return data

    @property
    def use_official_test(self) -> bool:
        return self.official_split == "keep"

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {v}")
        return v


class ModelConfig(_Section):
    arch: Literal["resnet50", "resnet18", "densenet121", "smallcnn"] = "resnet50"
    weights: str = Field("imagenet", description="'imagenet', 'none', or a path to a .safetensors / .pt state dict")
    dp_compatible: bool = Field(False, description="GroupNorm instead of BatchNorm and no in-place ops (Opacus)")
    freeze_backbone_epochs: int = Field(0, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    early_stopping_patience: int = Field(5, ge=0, description="0 = never stop early")
    pos_weight: bool = Field(False, description="Per-finding positive weighting of the BCE loss")
    loss: Literal["bce", "softmax"] = Field("bce", description="bce: multi-label; softmax: exclusive classes")
    threshold_method: Literal["f1", "youden"] = "f1"
    seed: int = 42
    num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads; None = torch default")
    num_workers: int = Field(0, ge=0)
    bootstrap: int = Field(0, ge=0, description="Bootstrap resamples for test CIs (0 = off)")


class PrivacyConfig(_Section):
    """Client-side DP-SGD (Opacus). Either a target epsilon over the planned training, or a fixed noise multiplier."""

    enabled: bool = False
    target_epsilon: float | None = Field(8.0, gt=0, description="Budget over all planned rounds x local epochs")
    noise_multiplier: float | None = Field(None, gt=0, description="Fixed sigma; overrides target_epsilon")
    delta: float | None = Field(None, gt=0, lt=1, description="None = 1/(10 n), below 1/n as DP-SGD needs")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-sample gradient clipping norm")
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["hooks", "ew", "functorch", "ghost"] = "hooks"
    secure_rng: bool = Field(True, description="Noise and Poisson sampling from a generator seeded by the OS "
                                               "CSPRNG, noise robust to floating-point attacks (see client/privacy)")


class ExperimentConfig(_Section):
    """A whole centralised run. Loadable from TOML with one table per section."""

    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    output_dir: str = "runs/latest"


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a TOML file (optional) and apply dotted overrides such as {"train.epochs": 3}."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: not valid TOML: {e}") from e
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return ExperimentConfig.model_validate(raw)
