"""The federated run's settings: one typed model over Flower's flat run config (`[tool.flwr.app.config]`).

Both apps read the run config through `RunSettings`, so a typo or a wrong type fails at once with the key's
name instead of deep inside a round. The defaults here ARE the embedded demo and must equal pyproject.toml's
`[tool.flwr.app.config]` (a test checks it): `flwr run .` and `run_federated_simulation()` (which cannot read
pyproject) then behave the same.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.config import AugmentConfig, DataConfig, ExperimentConfig, ModelConfig, PreprocessConfig, TrainConfig
from common.errors import SettingsError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg", "krum")
# Keys that may change between a checkpoint and its resumption without invalidating it.
RESUME_NEUTRAL = ("num-server-rounds", "node-wait-timeout", "round-timeout", "resume", "output-dir",
                  "min-available-nodes", "min-train-nodes", "min-evaluate-nodes", "guard-examples-ratio",
                  "guard-examples-growth", "guard-norm-ratio", "guard-min-cosine")


class RunSettings(BaseModel):
    """Every knob of a federated run; field names are the run-config keys with '-' written as '_'."""

    model_config = ConfigDict(extra="forbid", alias_generator=lambda s: s.replace("_", "-"),
                              populate_by_name=True, frozen=True)

    # federation
    num_server_rounds: int = Field(8, ge=1)
    strategy: Literal[STRATEGIES] = "fedavg"  # type: ignore[valid-type]
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_train_nodes: int = Field(2, ge=1)
    min_evaluate_nodes: int = Field(2, ge=0)
    min_available_nodes: int = Field(2, ge=1)
    node_wait_timeout: float = Field(120.0, gt=0, description="seconds to wait for min-available-nodes")
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for the replies of one round")
    fp16: bool = Field(False, description="send weights as float16 both ways (halves bytes)")
    resume: bool = True
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
    # guards against a hostile hospital (server/guards.py): checked on every reply before any strategy sees it
    guard_examples_ratio: float = Field(3.0, ge=0, description="cap a num-examples claim at this x the median "
                                        "of the other hospitals' claims; 0 = off")
    guard_examples_growth: float = Field(1.0, ge=0, description="cap a claim at this x what the hospital "
                                         "claimed in its first accepted round; 0 = off")
    guard_norm_ratio: float = Field(5.0, ge=0, description="reject an update with ||w - w_global|| above this x "
                                    "the round's median; 0 = off (honest hospitals measured up to 3.2)")
    guard_min_cosine: float = Field(-1.0, ge=-1, le=1, description="reject an update whose cosine to the "
                                    "coordinate-wise median update is below this; -1 = off (the default: honest "
                                    "Dirichlet-0.3 hospitals measured down to -0.43)")
    # local training
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    pos_weight: bool = False
    threshold_method: Literal["f1", "youden"] = "f1"
    client_threads: int = Field(1, ge=0, description="torch threads per ClientApp; 0 = torch's default")
    # model and images
    arch: Literal["resnet50", "resnet18", "densenet121", "smallcnn"] = "smallcnn"
    weights: str = "none"
    image_size: int = Field(64, ge=16, le=1024)
    channels: Literal[1, 3] = 1
    denoise_sigma: float = Field(0.5, ge=0, le=5)
    augment: bool = True
    # data
    data_path: str = "data/synth"
    data_source: str = Field("auto", description="auto | chestxray14 | chexpert | medmnist | folder | csv")
    findings: str = Field("Cardiomegaly,Effusion,Nodule,Pneumonia", description="comma-separated; '' = all")
    partition_method: Literal["iid", "dirichlet", "quantity"] = "iid"
    partition_alpha: float = Field(0.5, gt=0)
    max_samples: int = Field(0, ge=0, description="cap per split (0 = no cap): debugging and benchmarks")
    server_data_path: str = Field("", description="server's held-out set; '' = <data-path>/holdout")
    server_val_fraction: float = Field(0.5, gt=0, lt=1)
    output_dir: str = "runs/demo"
    seed: int = 42
    # privacy: client-side DP-SGD with Opacus (client/privacy.py); 0 = "not set" (run config has no None)
    dp_enabled: bool = False
    dp_target_epsilon: float = Field(8.0, ge=0, description="epsilon over all planned rounds x local epochs")
    dp_noise_multiplier: float = Field(0.0, ge=0, description="fixed sigma instead of a target epsilon when > 0")
    dp_delta: float = Field(0.0, ge=0, lt=1, description="0 = 1/(10 n) for a hospital with n training images")
    dp_max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm")
    dp_accountant: Literal["rdp", "prv"] = "rdp"
    dp_grad_sample_mode: Literal["hooks", "ew", "functorch"] = "hooks"
    dp_secure_rng: bool = Field(True, description="noise/sampling seeded from the OS CSPRNG (false: reproducible "
                                                  "from seed, for experiments only)")
    # privacy: central DP, Flower's strategy wrappers (server/privacy.py)
    central_dp: Literal["off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive"] = "off"
    central_dp_noise_multiplier: float = Field(1.0, ge=0)
    central_dp_clipping_norm: float = Field(1.0, gt=0, description="fixed norm, or the initial adaptive one")
    central_dp_target_quantile: float = Field(0.5, ge=0, le=1, description="adaptive: target clipped quantile")
    central_dp_clip_lr: float = Field(0.2, gt=0, description="adaptive: clipping-norm learning rate")
    # secure aggregation: Flower's SecAgg+ workflow (server/secagg.py); FedAvg only
    secure_aggregation: bool = False
    secagg_num_shares: int = Field(3, ge=3, description="shares per secret (neighbours + 1); odd is best")
    secagg_reconstruction_threshold: int = Field(2, ge=2, description="shares needed to reconstruct")
    secagg_clipping_range: float = Field(8.0, gt=0, description="every weight is clipped to +/- this")
    secagg_max_weight: float = Field(1000.0, gt=0, description="~ the largest hospital's num-examples")

    @property
    def replies_needed(self) -> tuple[int, str]:
        """The fewest train replies per round with which the strategy does what it is chosen for, and why."""
        if self.strategy == "krum":   # Blanchard et al. 2017: n > 2f + 2
            f = self.krum_malicious_nodes
            return 2 * f + 3, f"Krum needs n > 2 x krum-malicious-nodes + 2 = {2 * f + 2}"
        if self.strategy == "fedtrimmedavg":   # Flower's trim_mean cuts int(beta * n) replies from each end
            n = max(1, int(1 / self.trimmed_beta))
            while int(self.trimmed_beta * n) < 1:
                n += 1
            return n, (f"FedTrimmedAvg cuts int(trimmed-beta x n) = int({self.trimmed_beta} x n) replies from each "
                       f"end, which is 0 below n={n}: a plain mean")
        if self.strategy == "fedmedian":
            return 3, "the median of 2 replies is their mean"
        return 1, ""

    @model_validator(mode="after")
    def _strategy_needs(self) -> "RunSettings":
        n, why = self.replies_needed
        if self.min_train_nodes < n:
            raise ValueError(f"strategy={self.strategy!r} needs at least {n} hospitals per round ({why}), but "
                             f"min-train-nodes={self.min_train_nodes}: set min-train-nodes and min-available-nodes "
                             f"to {n} or more" + (", or lower krum-malicious-nodes" if self.krum_malicious_nodes
                                                  and self.strategy == "krum" else
                                                  ", or raise trimmed-beta" if self.strategy == "fedtrimmedavg"
                                                  else "") + ", or choose another strategy")
        for key in ("guard_examples_ratio", "guard_examples_growth", "guard_norm_ratio"):
            if 0 < getattr(self, key) < 1:
                raise ValueError(f"{key.replace('_', '-')} is a ratio to the other hospitals' (or the hospital's "
                                 f"first) value: 0 (off) or at least 1, got {getattr(self, key)}")
        return self

    @model_validator(mode="after")
    def _privacy_combinations(self) -> "RunSettings":
        if self.dp_enabled and not (self.dp_target_epsilon or self.dp_noise_multiplier):
            raise ValueError("dp-enabled needs dp-target-epsilon > 0 or dp-noise-multiplier > 0")
        if self.dp_enabled and (self.proximal_mu > 0 or self.strategy == "fedprox"):
            raise ValueError("dp-enabled with FedProx: Opacus replaces the gradient by the clipped per-sample one, "
                             "so the proximal term would be silently ignored; use another strategy")
        if self.secure_aggregation and (self.strategy != "fedavg" or self.central_dp != "off"):
            raise ValueError("secure-aggregation runs Flower's SecAgg+ workflow with FedAvg: set strategy='fedavg' "
                             "and central-dp='off'")
        if self.secure_aggregation and self.secagg_reconstruction_threshold >= self.secagg_num_shares:
            raise ValueError("secagg-reconstruction-threshold must be below secagg-num-shares")
        return self

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any] | None, overrides: dict[str, Any] | None = None
                        ) -> "RunSettings":
        """Validate Flower's run config (plus Python-side overrides); errors name the offending key."""
        raw = {**dict(run_config or {}), **dict(overrides or {})}
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: "
                                 f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
            keys = sorted({str(err["loc"][0]) for err in e.errors() if err["loc"]})
            raise SettingsError(f"invalid run config ({problems}); fix it in [tool.flwr.app.config] or "
                                f"--run-config", keys=keys) from e

    def to_run_config(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: everything that changes the model or its data."""
        kept = {k: v for k, v in self.to_run_config().items() if k not in RESUME_NEUTRAL}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def findings_list(self) -> list[str] | None:
        names = [f.strip() for f in self.findings.split(",") if f.strip()]
        return names or None

    @property
    def network(self) -> ModelConfig:
        """The one model every node and the server build. GroupNorm, without running statistics, whenever DP
        is on: Opacus needs it for DP-SGD, and central DP adds noise to every array, where BatchNorm's
        running_var could turn negative and its statistics would be shared without clipping."""
        return ModelConfig(arch=self.arch, weights=self.weights,
                           dp_compatible=self.dp_enabled or self.central_dp != "off")

    def experiment(self, data_path: str = "", source: str = "chestxray14", findings: list[str] | None = None,
                   split_fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)) -> ExperimentConfig:
        """The common/ configuration sections this run implies, for one data folder (`source`: a real layout
        name, already detected; the defaults serve callers that only need the model/image/training parts)."""
        return ExperimentConfig(
            data=DataConfig(source=source, path=data_path, findings=findings or self.findings_list,
                            split_fractions=split_fractions, seed=self.seed,
                            max_samples=self.max_samples or None),
            preprocess=PreprocessConfig(image_size=self.image_size, denoise_sigma=self.denoise_sigma,
                                        channels=self.channels),
            augment=AugmentConfig(enabled=self.augment),
            model=self.network,
            train=TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                              weight_decay=self.weight_decay, pos_weight=self.pos_weight,
                              threshold_method=self.threshold_method, seed=self.seed,
                              num_threads=self.client_threads or None),
            output_dir=self.output_dir,
        )
