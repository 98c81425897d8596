"""An experiment: common/ sections (data, preprocess, augment, model, train) plus what a simulation adds
(federation cost, partitions, arms, optional synthetic data), loadable from TOML with `--set` overrides.

The training sections are shared by every arm, so centralised, federated and local-only models are the same
network trained with the same batch size, learning rate and loss; only who sees which data differs.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from common.settings import FederationConfig, Settings, _Section, apply_overrides

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
DEFAULT_EXPERIMENT = EXPERIMENTS_DIR / "default.toml"


class SyntheticConfig(_Section):
    """When set, `common.data.synthetic.synthesize` writes these hospitals to data.path if it is empty."""

    hospitals: int = Field(3, ge=1)
    patients: int = Field(40, ge=4, description="patients per hospital (1-3 images each)")
    size: int = Field(64, ge=16)
    prevalence: float = Field(0.25, gt=0, lt=1)
    seed: int = 0


class SimulationFederation(FederationConfig):
    """The federation section plus what only a simulation decides: how many hospitals, how each splits its
    patients, and the CPUs Flower's simulation runtime gets. Every arm sees each training image rounds x
    local_epochs times."""

    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=1)
    hospitals: int = Field(3, ge=1, description="partitions of global train (ignored by the by-site partition)")
    hospital_split: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="each hospital's own train/val/test fractions, by patient")
    cpus: int = Field(2, ge=1, description="CPUs given to Flower's simulation runtime (Ray)")
    client_cpus: int = Field(1, ge=1, description="CPUs per ClientApp: cpus // client_cpus train at once")

    @property
    def epochs(self) -> int:
        return self.rounds * self.local_epochs


class PartitionConfig(_Section):
    method: Literal["iid", "dirichlet", "quantity", "by-site"] = "iid"
    alpha: float = Field(0.5, gt=0)


class WarmStartConfig(_Section):
    """A non-private warm start for the arms that ask for one (`warm_start = true`): a model trained by
    `fedxray pretrain`'s code path on a slice of global train that the experiment declares public. The slice is
    taken out by patient before the hospitals are formed, so no hospital, and no other arm, trains on it."""

    public_fraction: float = Field(0.2, gt=0, lt=1, description="of global train's patients, declared public")
    epochs: int = Field(15, ge=1, description="warm-start training epochs (on the public slice only)")
    lr: float | None = Field(None, gt=0, description="None = train.lr")
    statement: str = Field("a slice of the source set aside as public data (a stand-in for ImageNet or another "
                           "public dataset): no hospital holds these patients",
                           description="the public-data declaration recorded in the warm start's card")


class ArmConfig(_Section):
    """One arm. kind: centralised | federated | local | dp (federated with DP-SGD at each epsilon) | warm-start
    (the warm start alone, scored like any arm: what the federation adds to it)."""

    kind: str
    label: str | None = None
    strategy: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict, description="run-config keys, e.g. federation.proximal_mu")
    epsilons: list[float] = Field(default_factory=list, description="dp arms: one arm per target epsilon")
    delta: float | None = None
    warm_start: bool = Field(False, description="start from the experiment's [warm_start] model (GroupNorm "
                                                "network) instead of model.weights")
    reference: str | None = Field(None, description="dp arms: the non-DP arm of the same recipe (the privacy "
                                                    "table's Δ AUC column)")
    seed: int | None = Field(None, description="set by `seeds` expansion: this replicate's train.seed")
    group: str | None = Field(None, description="set by `seeds` expansion: the arm's name without the seed")

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind == "dp":
            return f"dp-{self.strategy.lower()}"
        return {"centralised": "centralised", "local": "local-only", "warm-start": "warm-start"}.get(
            self.kind, self.strategy.lower())


class SimulationConfig(Settings):
    name: str = "experiment"
    output_dir: str = "runs/simulations/experiment"
    seed: int = Field(42, description="partition and hospital splits (data.seed: the global split; train.seed: "
                                      "model initialisation and batch order), so training can be reseeded alone")
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples for the CIs of the headline table")
    tensorboard: bool = Field(True, description="track each arm: TensorBoard event files, and an MLflow run when "
                                                "MLflow is installed (common/tracking.py)")
    compare_paper: bool = Field(False, description="add the seed paper's reported ChestX-ray14 figures to the report")
    seeds: list[int] = Field(default_factory=list, description="train seeds: every arm runs once per seed (labels "
                                                               "<arm>-seed<N>) and the report adds mean ± sd over seeds")
    synthetic: SyntheticConfig | None = None
    warm_start: WarmStartConfig | None = None
    federation: SimulationFederation = SimulationFederation()
    partitions: list[PartitionConfig] = Field(default_factory=lambda: [PartitionConfig()])
    arms: list[ArmConfig] = Field(default_factory=lambda: [ArmConfig(kind="centralised"), ArmConfig(kind="federated"),
                                                           ArmConfig(kind="local")])

    @field_validator("arms")
    @classmethod
    def _unique_labels(cls, arms: list[ArmConfig]) -> list[ArmConfig]:
        names = [a.name for a in arms]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"arm labels must be unique, {sorted(dup)} repeat: give each a `label`")
        return arms

    @model_validator(mode="after")
    def _matched_cost(self) -> SimulationConfig:
        """Centralised and local-only epochs = rounds x local epochs (cost match); early stopping off."""
        self.train.epochs = self.federation.epochs
        self.train.early_stopping_patience = 0
        return self

    def experiment(self) -> Settings:
        """The common/ view of this experiment (what the one training loop, the data layer and the Flower apps
        take): the same sections, the federation without the simulation-only fields."""
        raw = self.model_dump(include=set(Settings.model_fields))
        raw["federation"] = {k: v for k, v in raw["federation"].items() if k in FederationConfig.model_fields}
        return Settings.model_validate(raw)


def load_simulation(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> SimulationConfig:
    """Read an experiment TOML or a run's experiment.json (default: the embedded synthetic one), apply overrides."""
    p = Path(path) if path is not None else DEFAULT_EXPERIMENT
    if not p.is_file() and path is not None and (EXPERIMENTS_DIR / f"{path}.toml").is_file():
        p = EXPERIMENTS_DIR / f"{path}.toml"   # a bare name picks a shipped experiment
    if not p.is_file():
        raise FileNotFoundError(f"experiment file not found: {p} (shipped: "
                                f"{', '.join(sorted(f.stem for f in EXPERIMENTS_DIR.glob('*.toml')))})")
    try:   # experiment.json (written next to every run's results) reruns or re-reports that very run
        raw = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not valid {p.suffix.lstrip('.').upper() or 'TOML'}: {e}") from e
    return SimulationConfig.model_validate(apply_overrides(raw, overrides or {}))
