"""One evaluator for every arm: the same global test set, the same hospital test splits, the same metrics code.

Datasets are built on demand (a hospital's only when asked for) and prepared single-threaded: torch's
intra-op threads make per-image preprocessing of small images many times slower, not faster.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.settings import Settings
from common.data.dataset import XrayDataset
from common.metrics import compute_metrics, tune_thresholds
from common.data.prepare import build_datasets
from common.training import make_loader, predict
from simulations.protocol import Protocol


@contextlib.contextmanager
def single_threaded():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def datasets_for(proto: Protocol, cfg: Settings, splits: dict[str, list[int]]) -> dict[str, XrayDataset]:
    """Prepared datasets for index lists of the protocol's manifest (augmentation on 'train' only)."""
    with single_threaded():
        return build_datasets(proto.manifest, splits, cfg, progress=False)


@dataclass
class Scored:
    metrics: dict
    probs: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


class Evaluator:
    """Global val/test loaders (built once) and hospital test loaders (built when first needed)."""

    def __init__(self, proto: Protocol, cfg: Settings, *, bootstrap: int = 0, seed: int = 0):
        self.proto, self.cfg, self.bootstrap, self.seed = proto, cfg, bootstrap, seed
        self.findings = list(proto.manifest.findings)
        self.multilabel = cfg.train.loss == "bce"
        ds = datasets_for(proto, cfg, {k: v for k, v in proto.global_splits.items() if k in ("val", "test")})
        self.loaders = {k: self._loader(v) for k, v in ds.items()}
        self._hospital_tests: dict[str, torch.utils.data.DataLoader] = {}

    def _loader(self, ds: XrayDataset):
        return make_loader(ds, max(2 * self.cfg.train.batch_size, 64), shuffle=False)

    def hospital_loader(self, name: str, split: str = "test"):
        key = f"{name}/{split}"
        if key not in self._hospital_tests:
            h = next(h for h in self.proto.hospitals if h.name == name)
            ds = datasets_for(self.proto, self.cfg, {split: h.splits[split]})[split]
            self._hospital_tests[key] = self._loader(ds)
        return self._hospital_tests[key]

    def tune(self, model: nn.Module, loader=None) -> np.ndarray:
        """Thresholds tuned on a validation loader (default: the global validation set)."""
        p, y, m, _ = predict(model, loader or self.loaders["val"], multilabel=self.multilabel)
        return tune_thresholds(y, p, self.cfg.train.threshold_method, mask=m)

    def score(self, model: nn.Module, loader, thresholds, *, bootstrap: int = 0) -> Scored:
        p, y, m, _ = predict(model, loader, multilabel=self.multilabel)
        return Scored(compute_metrics(y, p, self.findings, thresholds, mask=m, bootstrap=bootstrap, seed=self.seed),
                      p, y, m)

    def global_test(self, model: nn.Module, thresholds) -> Scored:
        return self.score(model, self.loaders["test"], thresholds, bootstrap=self.bootstrap)

    def global_val(self, model: nn.Module, thresholds) -> dict:
        return self.score(model, self.loaders["val"], thresholds).metrics

    def quick_auc(self, model: nn.Module, split: str = "test") -> float | None:
        """Macro AUC on a global split (threshold-free), for per-round curves."""
        p, y, m, _ = predict(model, self.loaders[split], multilabel=self.multilabel)
        return compute_metrics(y, p, self.findings, None, mask=m)["macro"]["auc"]

    def cross_site(self, model: nn.Module, thresholds) -> dict[str, dict]:
        """This model on every hospital's test split: {hospital: {auc, f1, accuracy, n}}."""
        out = {}
        for h in self.proto.hospitals:
            if not h.splits["test"]:
                continue
            m = self.score(model, self.hospital_loader(h.name), thresholds).metrics
            out[h.name] = {"auc": m["macro"]["auc"], "f1": m["macro"]["f1"], "accuracy": m["macro"]["accuracy"],
                           "n": m["n"]}
        return out
