"""From an ExperimentConfig to datasets, and the centralised training run (`fedxray train`).

`prepare_data` is the single path from a data source to cached torch datasets; the Flower client, the
server's evaluation and the simulations use it too, so every arm sees identically prepared images.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import ExperimentConfig
from common.data.dataset import XrayDataset
from common.data.manifest import Manifest
from common.data.report import data_report
from common.data.sources import load_manifest
from common.data.splits import patient_split
from common.errors import DataError
from common.transforms import Augmenter, Preprocessor


@dataclass
class PreparedData:
    manifest: Manifest
    splits: dict[str, list[int]]
    datasets: dict[str, XrayDataset]

    @property
    def findings(self) -> list[str]:
        return self.manifest.findings

    def report(self) -> dict:
        return data_report(self.manifest, {k: ds.indices for k, ds in self.datasets.items()})


def build_datasets(manifest: Manifest, splits: dict[str, list[int]], cfg: ExperimentConfig, *,
                   progress: bool = True) -> dict[str, XrayDataset]:
    """Datasets for each split (augmentation on train only), preloaded so bad images are excluded up front."""
    pre = Preprocessor(cfg.preprocess)
    aug = Augmenter(cfg.augment)
    out = {}
    for name, idx in splits.items():
        ds = XrayDataset(manifest, idx, pre, aug if name == "train" else None, cache=cfg.data.cache_images,
                         min_resolution=cfg.data.min_resolution if manifest.arrays is None else 1,
                         name=name, progress=progress)
        ds.preload()
        if idx and len(ds) == 0:
            raise DataError(f"every image of the {name} split was excluded (see the data report)",
                            path=str(manifest.root), failure="data-too-small")
        out[name] = ds
    return out


def prepare_data(cfg: ExperimentConfig, *, site: str = "", progress: bool = True) -> PreparedData:
    manifest = load_manifest(cfg.data, site)
    splits = patient_split(manifest, cfg.data)
    return PreparedData(manifest, splits, build_datasets(manifest, splits, cfg, progress=progress))


def run_centralised(cfg: ExperimentConfig, *, progress: bool = True, run_id: str | None = None) -> dict:
    """Train on one data source and write a run directory: metrics.json, the bundle, curves and ROC plots."""
    from common.bundle import save_bundle
    from common.metrics import format_headline_table
    from common.models import build_model
    from common.plots import plot_per_finding_bars, plot_roc_curves, plot_training_curves
    from common.training import evaluate, fit, make_criterion, make_loader, predict, seed_everything

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = run_id or f"central-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    seed_everything(cfg.train.seed, cfg.train.num_threads)
    data = prepare_data(cfg, progress=progress)
    report = data.report()
    (out / "data_report.json").write_text(json.dumps(report, indent=2))
    multilabel = cfg.train.loss == "bce"
    ds = data.datasets
    model = build_model(cfg.model, len(data.findings), cfg.preprocess.channels)
    criterion = make_criterion(cfg.train, ds["train"].labels)
    train_loader = make_loader(ds["train"], cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                               num_workers=cfg.train.num_workers, drop_last=True)
    val_loader = make_loader(ds["val"], cfg.train.batch_size * 2, shuffle=False)
    test_loader = make_loader(ds["test"], cfg.train.batch_size * 2, shuffle=False)
    t0 = time.perf_counter()
    res = fit(model, train_loader, val_loader, cfg.train, data.findings, criterion=criterion, multilabel=multilabel,
              freeze_backbone_epochs=cfg.model.freeze_backbone_epochs, progress=progress)
    train_seconds = time.perf_counter() - t0
    test = evaluate(model, test_loader, data.findings, criterion=criterion, thresholds=res.thresholds,
                    multilabel=multilabel, bootstrap=cfg.train.bootstrap, seed=cfg.train.seed)
    p, y, m, _ = predict(model, test_loader, multilabel=multilabel)
    plot_roc_curves(y, p, data.findings, out / "roc_test.png", mask=m, title="Test ROC")
    plot_per_finding_bars(test, out / "per_finding_test.png")
    plot_training_curves(res.history, out / "training_curves.png")
    provenance = {
        "run_id": run_id, "training": "centralised", "data": {"source": report["source"], "root": report["root"],
        "images": {k: v["images"] for k, v in report["splits"].items()}, "patients": report["patients"],
        "excluded": len(report["excluded"])}, "epochs_run": len(res.history), "best_epoch": res.best_epoch,
        "train_seconds": round(train_seconds, 2), "config": cfg.model_dump(mode="json"),
    }
    bundle_dir = save_bundle(out / "bundle", model, model_config=cfg.model, preprocess=cfg.preprocess,
                             findings=data.findings, thresholds=res.thresholds,
                             metrics={"validation": res.val_metrics, "test": test}, provenance=provenance,
                             multilabel=multilabel, validation=ds["val"], test=ds["test"])
    summary = {"run_id": run_id, "history": res.history, "best_epoch": res.best_epoch,
               "stopped_early": res.stopped_early, "validation": res.val_metrics, "test": test,
               "bundle": str(bundle_dir), "train_seconds": train_seconds, "data_report": report}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False, default=_json_default))
    summary["table"] = format_headline_table({"test (this run)": test}, title="Centralised - test split")
    return summary


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
