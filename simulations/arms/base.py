"""What every arm gets (ArmContext) and returns (a result dict with the same keys for every kind)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.settings import Settings
from common.tracking import Tracker
from simulations.config import ArmConfig, SimulationConfig
from simulations.evaluation import Evaluator, Scored
from simulations.protocol import Protocol

ARM_TYPES: dict[str, ArmType] = {}


def register(cls: type[ArmType]) -> type[ArmType]:
    ARM_TYPES[cls.kind] = cls()
    return cls


@dataclass
class ArmContext:
    cfg: SimulationConfig
    exp: Settings          # the common/ view: what the one training loop takes
    proto: Protocol
    evaluator: Evaluator
    workdir: Path                  # this arm's scratch folder (models, Flower output)
    tracker: Tracker
    progress: bool = True

    @property
    def cost(self) -> dict:
        f = self.cfg.federation
        return {"epochs_per_image": f.epochs, "rounds": f.rounds, "local_epochs": f.local_epochs}


class ArmType:
    """Base: one arm per config entry; available unless `unavailable()` says why not."""

    kind = ""

    def expand(self, spec: ArmConfig) -> list[ArmConfig]:
        return [spec]

    def unavailable(self, spec: ArmConfig) -> str | None:
        return None

    def run(self, ctx: ArmContext, spec: ArmConfig) -> tuple[dict, dict[str, np.ndarray] | None]:
        """(result, test predictions {probs, labels, mask} or None)."""
        raise NotImplementedError


def predictions(s: Scored) -> dict[str, np.ndarray]:
    return {"probs": s.probs.astype(np.float32), "labels": s.labels.astype(np.float32), "mask": s.mask}


def mean_metrics(rows: list[dict]) -> dict:
    """Headline/macro means over several models (local-only), with the min-max range instead of a CI."""
    out: dict = {"headline": {}, "macro": {}, "range": {}, "headline_ci": None, "n_models": len(rows)}
    for key in rows[0]["headline"] if rows else []:
        vals = [r["headline"][key] for r in rows if r["headline"].get(key) is not None]
        out["headline"][key] = out["macro"][key] = float(np.mean(vals)) if vals else None
        out["range"][key] = [float(min(vals)), float(max(vals))] if vals else None
    return out
