"""One settings model for every run: centralised (`fedxray train`), federated (`fedxray federate`/`launch`,
`flwr run`) and simulations read the same sections, with the same defaults, from the same TOML file.

Sections: [data] [preprocess] [augment] [model] [train] [privacy] [federation] [guards] [central_dp] [secagg]
[crosssite]; top-level `job` selects what a federated run does (training, data statistics, cross-site evaluation).
The defaults are for real use (ResNet50 from ImageNet weights at 224 px); the embedded demo is the named
profile `demo` (PROFILES), not a second set of defaults.

Flower's run config is this model flattened with dots (`train.batch_size`, `federation.rounds`), which is how
Flower itself flattens nested `[tool.flwr.app.config]` tables and `--run-config file.toml`: pyproject.toml
holds `Settings()` flattened (a test checks it; `fedxray settings --flwr` prints it), so `flwr run .
--run-config my.toml` and `fedxray train --config my.toml` resolve the same keys to the same values. The run
config has no None and no lists: None travels as "" and a list as a comma-separated string.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import SettingsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg", "krum")
ARCHS = ("resnet50", "resnet18", "densenet121", "smallcnn")


def _optional(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _is_sequence(annotation) -> bool:
    cands = typing.get_args(annotation) if _optional(annotation) else (annotation,)
    return any(typing.get_origin(a) in (list, tuple) for a in cands)


class _Section(BaseModel):
    """A settings section: unknown keys are errors; run-config encodings ("" = None, "a,b" = list) accepted."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _from_run_config(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        out = dict(raw)
        for name, field in cls.model_fields.items():
            v = out.get(name)
            if not isinstance(v, str):
                continue
            if v == "" and _optional(field.annotation):
                out[name] = None
            elif _is_sequence(field.annotation):
                out[name] = [p.strip() for p in v.split(",") if p.strip()]
        return out


# --------------------------------------------------------------------------------------------- what every run has

class DataConfig(_Section):
    """Where the images are and how to read them; see common/data/sources.py for each source."""

    source: Literal["auto", "chestxray14", "chexpert", "medmnist", "folder", "csv"] = Field(
        "auto", description="layout; auto = detected from the path, the same way by every command")
    path: str = Field("", description="a dataset folder or file; federated: hospital_* folders (+ holdout/) or one "
                                      "source to partition; paths inside a CSV resolve relative to the CSV")
    findings: list[str] | None = Field(None, description="subset/order of findings; None = all the data labels")
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

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {v}")
        return v


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


class ModelConfig(_Section):
    arch: Literal[ARCHS] = "resnet50"  # type: ignore[valid-type]
    weights: str = Field("imagenet", description="'imagenet', 'none', or a path to a .safetensors / .pt state dict")
    dp_compatible: bool = Field(False, description="GroupNorm instead of BatchNorm and no in-place ops (Opacus); "
                                                   "always on in a federation with DP")
    freeze_backbone_epochs: int = Field(0, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainConfig(_Section):
    """The one training loop's knobs; in a federation they apply to each hospital's local training."""

    epochs: int = Field(10, ge=1, description="centralised epochs (federated: federation.local_epochs per round)")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    early_stopping_patience: int = Field(5, ge=0, description="0 = never stop early")
    pos_weight: bool = Field(False, description="Per-finding positive weighting of the BCE loss")
    loss: Literal["bce", "softmax"] = Field("bce", description="bce: multi-label; softmax: exclusive classes")
    threshold_method: Literal["f1", "youden"] = "f1"
    select_on: Literal["val-f1", "val-auc", "val-loss"] = Field(
        "val-f1", description="which epoch (centralised) or round (federated) is kept: best validation macro-F1 at "
        "tuned thresholds (the seed paper's rule), best validation macro AUC, or lowest validation loss")
    calibration: Literal["platt", "temperature", "none"] = Field(
        "platt", description="calibration of the exported model, fitted on the validation split and folded into "
        "the head (common/calibration.py), thresholds tuned again after it: platt = sigmoid(a z + b) per finding, "
        "temperature = z / T (softmax outputs get a temperature under either); none = the kept model as trained")
    seed: int = 42
    num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads; None = torch default")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto = a CUDA GPU when torch sees one, else the CPU; cpu; cuda or cuda:N")
    num_workers: int = Field(0, ge=0)
    bootstrap: int = Field(0, ge=0, description="Bootstrap resamples for test CIs (0 = off)")


class PrivacyConfig(_Section):
    """DP-SGD (Opacus): centralised, or at each hospital. Either a target epsilon over the planned training
    (federated: all rounds x local epochs), or a fixed noise multiplier."""

    enabled: bool = False
    target_epsilon: float | None = Field(8.0, gt=0, description="Budget over all planned training")
    noise_multiplier: float | None = Field(None, gt=0, description="Fixed sigma; overrides target_epsilon")
    delta: float | None = Field(None, gt=0, lt=1, description="None = 1/(10 n), below 1/n as DP-SGD needs")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-sample gradient clipping norm")
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["hooks", "ew", "functorch", "ghost"] = Field(
        "ghost", description="how Opacus gets per-sample gradient norms: ghost clipping (no per-sample gradients; "
        "Conv2d norms by client/privacy.py) measured fastest for all layers, hooks/ew/functorch materialise them")
    trainable: Literal["auto", "all", "last-block+head", "norm+head"] = Field(
        "auto", description="what DP-SGD trains; the rest stays as the model starts. auto: norm+head (every "
        "normalisation layer and the head) when model.weights is pretrained (imagenet or a file), all layers from "
        "scratch (see client/privacy.py)")
    secure_rng: bool = Field(True, description="Noise and Poisson sampling from a generator seeded by the OS "
                                               "CSPRNG, noise robust to floating-point attacks (see client/privacy)")


# --------------------------------------------------------------------------------------------- federation only

LOCAL_SPLITS = ("train", "train-val", "train-val-test")


class FederationConfig(_Section):
    """The federation: rounds, strategy, who takes part, and what each hospital keeps out of training."""

    rounds: int = Field(8, ge=1)
    strategy: Literal[STRATEGIES] = "fedavg"  # type: ignore[valid-type]
    local_epochs: int = Field(2, ge=1, description="each hospital's epochs per round")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="each hospital's learning rate across the run: constant = train.lr every round; "
        "cosine = train.lr decayed over rounds x local_epochs, the curve centralised training follows over its epochs")
    local_optimizer: Literal["fresh", "kept"] = Field(
        "fresh", description="fresh = a new Adam every round; kept = each hospital carries its Adam moments and step "
        "count from round to round in its own node state (client/optimizer_state.py), never in a reply")
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_train_nodes: int = Field(2, ge=1)
    min_evaluate_nodes: int = Field(2, ge=0)
    min_available_nodes: int = Field(2, ge=1)
    node_wait_timeout: float = Field(120.0, gt=0, description="seconds to wait for min_available_nodes")
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for the replies of one round")
    fp16: bool = Field(False, description="send weights as float16 both ways (halves bytes)")
    resume: bool = Field(True, description="continue from <output_dir>/checkpoint when the settings match")
    client_threads: int = Field(1, ge=0, description="torch threads per ClientApp; 0 = torch's default")
    # each hospital's own split (its patients, never cut): the server selects and tests on its held-out data
    local_split: Literal[LOCAL_SPLITS] = Field(  # type: ignore[valid-type]
        "train-val", description="train: every image trains (no local metrics, no federated evaluation); "
        "train-val: a validation share (local_val_fraction) for local metrics and federated evaluation; "
        "train-val-test: data.split_fractions, as a stand-alone hospital would")
    local_val_fraction: float = Field(0.1, gt=0, lt=1, description="train-val: share of patients kept for validation")
    # where the data is and how one source is cut into simulated hospitals
    partition_method: Literal["iid", "dirichlet", "quantity"] = "iid"
    partition_alpha: float = Field(0.5, gt=0)
    server_data_path: str = Field("", description="the server's held-out set; '' = <data.path>/holdout")
    server_val_fraction: float = Field(0.5, gt=0, lt=1, description="share of the server's patients that select "
                                       "the round and tune thresholds; the rest is its test split")
    # strategy parameters (Flower's names in comments)
    proximal_mu: float = Field(0.0, ge=0, description="FedProx proximal_mu; also the client's term")
    fedopt_eta: float = Field(0.01, gt=0, description="FedAdam/FedYogi server learning rate eta")
    fedopt_beta_1: float = Field(0.9, ge=0, lt=1)
    fedopt_beta_2: float = Field(0.99, ge=0, lt=1)
    fedopt_tau: float = Field(1e-3, gt=0)
    fedavgm_server_lr: float = Field(1.0, gt=0, description="FedAvgM server_learning_rate")
    fedavgm_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM server_momentum")
    trimmed_beta: float = Field(0.2, gt=0, lt=0.5, description="FedTrimmedAvg beta (fraction cut each end)")
    krum_malicious_nodes: int = Field(0, ge=0, description="Krum num_malicious_nodes")

    @property
    def replies_needed(self) -> tuple[int, str]:
        """The fewest train replies per round with which the strategy does what it is chosen for, and why."""
        if self.strategy == "krum":   # Blanchard et al. 2017: n > 2f + 2
            f = self.krum_malicious_nodes
            return 2 * f + 3, f"Krum needs n > 2 x federation.krum_malicious_nodes + 2 = {2 * f + 2}"
        if self.strategy == "fedtrimmedavg":   # Flower's trim_mean cuts int(beta * n) replies from each end
            n = max(1, int(1 / self.trimmed_beta))
            while int(self.trimmed_beta * n) < 1:
                n += 1
            return n, (f"FedTrimmedAvg cuts int(trimmed_beta x n) = int({self.trimmed_beta} x n) replies from each "
                       f"end, which is 0 below n={n}: a plain mean")
        if self.strategy == "fedmedian":
            return 3, "the median of 2 replies is their mean"
        return 1, ""

    @model_validator(mode="after")
    def _strategy_needs(self) -> "FederationConfig":
        n, why = self.replies_needed
        if self.min_train_nodes < n:
            raise ValueError(
                f"strategy={self.strategy!r} needs at least {n} hospitals per round ({why}), but "
                f"federation.min_train_nodes={self.min_train_nodes}: set federation.min_train_nodes and "
                f"federation.min_available_nodes to {n} or more"
                + (", or lower federation.krum_malicious_nodes" if self.krum_malicious_nodes and self.strategy == "krum"
                   else ", or raise federation.trimmed_beta" if self.strategy == "fedtrimmedavg" else "")
                + ", or choose another strategy")
        return self


class GuardConfig(_Section):
    """Checks on every reply before any strategy sees it (server/guards.py), against a hostile hospital."""

    examples_ratio: float = Field(3.0, ge=0, description="cap a num-examples claim at this x the median of the "
                                  "other hospitals' claims; 0 = off")
    examples_growth: float = Field(1.0, ge=0, description="cap a claim at this x what the hospital claimed in its "
                                   "first accepted round; 0 = off")
    norm_ratio: float = Field(5.0, ge=0, description="reject an update with ||w - w_global|| above this x the "
                              "round's median; 0 = off (honest hospitals measured up to 3.2)")
    min_cosine: float = Field(-1.0, ge=-1, le=1, description="reject an update whose cosine to the coordinate-wise "
                              "median update is below this; -1 = off (the default: honest Dirichlet-0.3 hospitals "
                              "measured down to -0.43)")

    @property
    def updates_checked(self) -> bool:
        return self.norm_ratio > 0 or self.min_cosine > -1

    @model_validator(mode="after")
    def _ratios(self) -> "GuardConfig":
        for key in ("examples_ratio", "examples_growth", "norm_ratio"):
            if 0 < getattr(self, key) < 1:
                raise ValueError(f"guards.{key} is a ratio to the other hospitals' (or the hospital's first) value: "
                                 f"0 (off) or at least 1, got {getattr(self, key)}")
        return self


class CentralDPConfig(_Section):
    """Central DP: Flower's strategy wrappers (server/privacy.py)."""

    mode: Literal["off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive"] = "off"
    noise_multiplier: float = Field(1.0, ge=0)
    clipping_norm: float = Field(1.0, gt=0, description="fixed norm, or the initial adaptive one")
    target_quantile: float = Field(0.5, ge=0, le=1, description="adaptive: target clipped quantile")
    clip_lr: float = Field(0.2, gt=0, description="adaptive: clipping-norm learning rate")


class SecAggConfig(_Section):
    """Secure aggregation: Flower's SecAgg+ workflow (server/secagg.py), FedAvg only."""

    enabled: bool = False
    num_shares: int = Field(3, ge=3, description="shares per secret (neighbours + 1); odd is best")
    reconstruction_threshold: int = Field(2, ge=2, description="shares needed to reconstruct")
    clipping_range: float = Field(8.0, gt=0, description="each scaled update value (client/mods.py secagg_scales) x "
                                  "num-examples / max_weight is clipped to +/- this")
    max_weight: float = Field(1000.0, gt=0, description="~ the largest hospital's num-examples")


JOBS = ("train", "stats", "evaluate")


class CrossSiteConfig(_Section):
    """`job = "evaluate"`: exported bundles the ServerApp reads from its own disk and sends to every hospital."""

    bundles: list[str] = Field(default_factory=list, description="bundle folders (run config: comma-separated); "
                               "each is scored on every hospital's own test split at the bundle's thresholds")
    heatmap_metric: Literal["auc", "f1", "accuracy", "precision", "recall"] = Field(
        "auc", description="the macro metric crosssite.png shows")


# --------------------------------------------------------------------------------------------- the whole run

# Keys that may change between a checkpoint and its resumption without invalidating it.
RESUME_NEUTRAL = ("federation.rounds", "federation.node_wait_timeout", "federation.round_timeout",
                  "federation.resume", "output_dir", "federation.min_available_nodes", "federation.min_train_nodes",
                  "federation.min_evaluate_nodes", "guards.examples_ratio", "guards.examples_growth",
                  "guards.norm_ratio", "guards.min_cosine", "profile", "job", "crosssite.bundles",
                  "crosssite.heatmap_metric")

# The embedded demo: synthetic hospitals (`fedxray data synth`), a small CNN at 64 px, the four findings the
# generator draws. Everything else is the real-use default.
PROFILES: dict[str, dict[str, Any]] = {
    "demo": {
        "data": {"path": "data/synth", "findings": ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]},
        "preprocess": {"image_size": 64, "channels": 1, "denoise_sigma": 0.5},
        "model": {"arch": "smallcnn", "weights": "none"},
        "train": {"batch_size": 16},
        "output_dir": "runs/demo",
    },
}


class Settings(_Section):
    """A whole run. Loadable from TOML with one table per section; `profile` names the base it started from."""

    profile: str = Field("", description="'' = the real-use defaults; demo = the embedded synthetic demo")
    job: Literal[JOBS] = Field(  # type: ignore[valid-type]
        "train", description="what a federated run does (server/jobs.py): train = federated training (bundle, "
        "federation.json); stats = each hospital's aggregate data statistics, small counts suppressed (stats.json); "
        "evaluate = the crosssite.bundles on every hospital's test split, no training (crosssite.json)")
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    guards: GuardConfig = GuardConfig()
    central_dp: CentralDPConfig = CentralDPConfig()
    secagg: SecAggConfig = SecAggConfig()
    crosssite: CrossSiteConfig = CrossSiteConfig()
    output_dir: str = "runs/latest"

    @model_validator(mode="after")
    def _combinations(self) -> "Settings":
        p, f = self.privacy, self.federation
        if p.enabled and not (p.target_epsilon or p.noise_multiplier):
            raise ValueError("privacy.enabled needs privacy.target_epsilon or privacy.noise_multiplier")
        if p.enabled and (f.proximal_mu > 0 or f.strategy == "fedprox"):
            raise ValueError("privacy.enabled with FedProx: Opacus replaces the gradient by the clipped per-sample "
                             "one, so the proximal term would be silently ignored; use another strategy")
        if self.secagg.enabled and (f.strategy != "fedavg" or self.central_dp.mode != "off"):
            raise ValueError("secagg.enabled runs Flower's SecAgg+ workflow with FedAvg: set "
                             "federation.strategy=fedavg and central_dp.mode=off")
        if self.secagg.enabled and self.secagg.reconstruction_threshold >= self.secagg.num_shares:
            raise ValueError("secagg.reconstruction_threshold must be below secagg.num_shares")
        if self.job == "evaluate" and not self.crosssite.bundles:
            raise ValueError("job=evaluate needs crosssite.bundles: the exported bundle folders to score, "
                             "comma-separated (e.g. --run-config \"crosssite.bundles='runs/a/bundle,runs/b/bundle'\")")
        return self

    # ----------------------------------------------------------------------------------------- building

    @classmethod
    def build(cls, profile: str = "", *layers: dict[str, Any]) -> "Settings":
        """The profile's settings with each layer (nested dicts, or flat dotted keys) applied in order."""
        if profile and profile not in PROFILES:
            raise SettingsError(f"unknown settings profile {profile!r}; choose one of {sorted(PROFILES)} or '' "
                                "for the real-use defaults", keys=["profile"])
        raw: dict[str, Any] = {}
        _merge(raw, PROFILES.get(profile, {}))
        raw["profile"] = profile
        for layer in layers:
            _merge(raw, nest(layer or {}))
        return cls.validated(raw)

    @classmethod
    def validated(cls, raw: dict[str, Any], where: str = "settings") -> "Settings":
        """model_validate whose error names every offending dotted key (SettingsError.keys)."""
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: "
                                 f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
            keys = sorted({".".join(map(str, err["loc"])) for err in e.errors() if err["loc"]})
            raise SettingsError(f"invalid {where} ({problems})", keys=keys) from e

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any] | None, overrides: dict[str, Any] | None = None
                        ) -> "Settings":
        """Flower's flat run config (plus Python-side overrides) -> Settings; errors name the dotted key."""
        raw = nest({**dict(run_config or {}), **dict(overrides or {})})
        return cls.validated(raw, "run config (fix it in --run-config or the settings file)")

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The flat run config Flower carries: dotted keys, None as "", lists as "a,b"."""
        return flatten(self.model_dump(mode="json"))

    def updated(self, **dotted: Any) -> "Settings":
        """A copy with dotted keys changed (validated), e.g. updated(**{"data.path": p})."""
        raw = self.model_dump(mode="json")
        _merge(raw, nest(dotted))
        return self.validated(raw)

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: everything that changes the model or its data."""
        kept = {k: v for k, v in self.to_run_config().items() if k not in RESUME_NEUTRAL}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def network(self) -> ModelConfig:
        """The model every node and the server build. GroupNorm, without running statistics, whenever DP is on:
        Opacus needs it for DP-SGD, and central DP adds noise to every array, where BatchNorm's running_var
        could turn negative and its statistics would be shared without clipping."""
        dp = self.privacy.enabled or self.central_dp.mode != "off"
        return self.model.model_copy(update={"dp_compatible": self.model.dp_compatible or dp})


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.epochs": 3, "model": {...}} -> nested dicts (dotted keys split, nested ones kept)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SettingsError(f"{key}: {p} is a value, not a section", keys=[str(key)])
        if isinstance(value, dict):
            _merge(node.setdefault(leaf, {}), nest(value))
        else:
            node[leaf] = value
    return out


def _merge(into: dict[str, Any], layer: dict[str, Any]) -> None:
    for k, v in layer.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = json.loads(json.dumps(v)) if isinstance(v, (dict, list)) else v


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge overrides (dotted keys such as {"train.epochs": 3}, or nested tables) into raw settings."""
    _merge(raw, nest(overrides))
    return raw


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif v is None:
            out[key] = ""
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(str(x) for x in v)
        else:
            out[key] = v
    return out


def read_settings_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"settings file not found: {p}", keys=["--config"])
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{p}: not valid TOML: {e}", keys=["--config"]) from e


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values parsed as JSON when possible (numbers, booleans, lists), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SettingsError(f"--set expects KEY=VALUE (e.g. --set train.epochs=3), got {item!r}", keys=["--set"])
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                  profile: str | None = None, defaults: tuple[dict[str, Any], ...] = ()) -> Settings:
    """The profile (given, else the file's own `profile = "demo"`, else the real-use defaults), then `defaults`
    (a command's own), then the TOML file (optional), then the dotted overrides."""
    raw = read_settings_file(path) if path is not None else {}
    base = profile if profile is not None else str(raw.get("profile", "") or "")
    raw.pop("profile", None)
    return Settings.build(base, *defaults, raw, overrides or {})
