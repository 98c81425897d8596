"""The server's own held-out data and the global evaluation run after every round (Flower's `evaluate_fn`).

The held-out set (`federation.server_data_path`, by default `<data.path>/holdout`, which the synthetic generator
writes) is split patient-level into validation (threshold tuning and best-round selection: the seed paper's
rule of best validation macro-F1) and test (reported only, never used to choose anything). Without one, the
server takes the val and test splits data.path itself ships (common.data.sources.server_holdout).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from common.arrays import load_record
from common.settings import Settings
from common.data.sources import load_manifest, server_holdout
from common.data.splits import patient_split
from common.errors import DataError
from common.metrics import compute_metrics, tune_thresholds
from common.models import build_model
from common.data.prepare import build_datasets
from common.training import make_criterion, make_loader, predict, resolve_device


def server_data_path(s: Settings) -> Path:
    """The folder the server evaluates on (common.data.sources.server_holdout): its own held-out set, or
    data.path itself when the server takes that source's shipped val/test splits."""
    path = server_holdout(s.data.path, s.federation.server_data_path)
    if path is None:
        path = Path(s.data.path).expanduser().resolve()
    if not path.exists():
        raise DataError(f"the server needs held-out data for global evaluation (working directory {Path.cwd()}); "
                        "set federation.server_data_path to a labelled folder the hospitals never train on, or create "
                        "the demo data with `fedxray data synth --out data/synth`", path=str(path))
    return path


@dataclass
class GlobalEval:
    round: int
    thresholds: np.ndarray
    val: dict
    test: dict

    def row(self) -> dict:
        """A compact history row: the headline figures and per-finding AUC."""
        def pick(m: dict) -> dict:
            return {**m["macro"], "per_finding_auc": {f: r["auc"] for f, r in m["per_finding"].items()},
                    "loss": m.get("loss"), "n": m["n"]}
        return {"val": pick(self.val), "test": pick(self.test)}


def shipped_evaluation_splits(manifest) -> dict[str, list[int]]:
    """The val and test splits a source ships, for a server without its own held-out set."""
    splits = {name: [i for i, smp in enumerate(manifest.samples) if smp.split == name] for name in ("val", "test")}
    if not all(splits.values()):
        raise DataError("the server has no held-out set (no federation.server_data_path, no <data.path>/holdout) "
                        f"and the data ships no {' and no '.join(k for k, v in splits.items() if not v)} split to "
                        "evaluate on: set federation.server_data_path to a labelled folder the hospitals never train "
                        "on", path=str(manifest.root), failure="data-layout")
    return splits


class GlobalEvaluator:
    """Builds the server's datasets once; `__call__(arrays)` evaluates one set of global weights."""

    def __init__(self, s: Settings):
        path = server_data_path(s)
        val_f = s.federation.server_val_fraction
        self.cfg: Settings = s.updated(**{   # the server always evaluates on its whole held-out set
            "data.path": str(path), "data.split_fractions": [0.0, val_f, 1 - val_f],
            "data.max_samples": None, "model.dp_compatible": s.network.dp_compatible})
        manifest = load_manifest(self.cfg.data, site="server")
        if server_holdout(s.data.path, s.federation.server_data_path) is None:
            splits = shipped_evaluation_splits(manifest)
        else:
            splits = patient_split(manifest, self.cfg.data)
            splits.pop("train", None)
        self.path, self.manifest = path, manifest
        self.findings = list(manifest.findings)
        self.multilabel = manifest.multilabel
        self.datasets = build_datasets(manifest, splits, self.cfg, progress=False)
        self.device = resolve_device(s.train.device)
        self.model = build_model(self.cfg.model.model_copy(update={"weights": "none"}), len(self.findings),
                                 self.cfg.preprocess.channels).to(self.device)
        bs = max(2 * s.train.batch_size, 32)
        self.loaders = {k: make_loader(ds, bs, shuffle=False) for k, ds in self.datasets.items()}

    def sizes(self) -> dict:
        return {k: {"images": len(ds), "patients": self.manifest.patients(ds.indices)} for k, ds in self.datasets.items()}

    def __call__(self, server_round: int, arrays: ArrayRecord, method: str = "f1") -> GlobalEval:
        load_record(self.model, arrays)
        crit = make_criterion(self.cfg.train).to(self.device)
        pv, yv, mv, val_loss = predict(self.model, self.loaders["val"], crit, multilabel=self.multilabel)
        thr = tune_thresholds(yv, pv, method, mask=mv)
        val = {**compute_metrics(yv, pv, self.findings, thr, mask=mv), "loss": val_loss}
        pt, yt, mt, test_loss = predict(self.model, self.loaders["test"], crit, multilabel=self.multilabel)
        test = {**compute_metrics(yt, pt, self.findings, thr, mask=mt), "loss": test_loss}
        return GlobalEval(server_round, thr, val, test)
