"""The centralised training run (`fedxray train`): one data source, the one training loop, a run folder
with metrics.json, data_report.json, curves and ROC plots, and a bundle the inference API serves."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

from common.data.prepare import prepare_data
from common.fileio import write_json
from common.settings import Settings
from common.tracking import Tracker

EPOCH_METRICS = ("train_loss", "val_loss", "val_f1", "val_auc", "lr")   # of fit()'s history rows, to the tracker


def run_centralised(cfg: Settings, *, progress: bool = True, run_id: str | None = None,
                    compare_paper: bool = False, public: str | None = None) -> dict:
    """Train on one data source and write a run directory: metrics.json, the bundle, curves and ROC plots.

    `public`: the operator's declaration that this data is public (`fedxray pretrain`): the bundle is then a
    warm start whose card says what it saw, and DP training may start from it (a private hospital's data must
    never be declared public: a warm start is not protected by anyone's privacy budget)."""
    from common.training import seed_everything

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = run_id or f"central-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    seed_everything(cfg.train.seed, cfg.train.num_threads)
    data = prepare_data(cfg, progress=progress)
    report = data.report()
    write_json(out / "data_report.json", report)
    params = {**cfg.model_dump(mode="json"), "fingerprint": {"settings": cfg.fingerprint(), "data": data.fingerprint()}}
    with Tracker(out, kind="train", name=run_id, tensorboard=out / "tensorboard", params=params,
                 tags={"fedxray.run_id": run_id}) as tracker:
        return _train(cfg, data, report, out, run_id, tracker, progress=progress, compare_paper=compare_paper,
                      public=public)


def _train(cfg: Settings, data, report: dict, out: Path, run_id: str, tracker: Tracker, *, progress: bool,
           compare_paper: bool, public: str | None) -> dict:
    from common.bundle import save_bundle, warm_start_provenance
    from common.metrics import SEED_PAPER, format_headline_table
    from common.models import build_model
    from common.plots import plot_per_finding_bars, plot_roc_curves, plot_training_curves
    from common.training import SELECTION_RULES, evaluate, fit, make_criterion, make_loader, predict, resolve_device

    multilabel = cfg.train.loss == "bce"
    ds = data.datasets
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, len(data.findings), cfg.preprocess.channels).to(device)
    criterion = make_criterion(cfg.train, ds["train"].labels).to(device)
    train_loader = make_loader(ds["train"], cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                               num_workers=cfg.train.num_workers, drop_last=True)
    val_loader = make_loader(ds["val"], cfg.train.batch_size * 2, shuffle=False)
    test_loader = make_loader(ds["test"], cfg.train.batch_size * 2, shuffle=False)
    t0 = time.perf_counter()
    res = fit(model, train_loader, val_loader, cfg.train, data.findings, criterion=criterion, multilabel=multilabel,
              freeze_backbone_epochs=cfg.model.freeze_backbone_epochs, progress=progress,
              on_epoch=lambda row: tracker.log(row["epoch"], {k: row[k] for k in EPOCH_METRICS}))
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
        "excluded": len(report["excluded"]), "fingerprint": data.fingerprint()}, "epochs_run": len(res.history),
        "best_epoch": res.best_epoch, "selection": f"{SELECTION_RULES[cfg.train.select_on]} (validation split)",
        "train_seconds": round(train_seconds, 2), "config": cfg.model_dump(mode="json"),
        "warm_start": warm_start_provenance(cfg.model.weights), "calibration": res.calibration,
    }
    if public is not None:
        provenance.update(public_data=public, purpose="warm start (fedxray pretrain)")
    bundle_dir = save_bundle(out / "bundle", model, model_config=cfg.model, preprocess=cfg.preprocess,
                             findings=data.findings, thresholds=res.thresholds,
                             metrics={"validation": res.val_metrics, "test": test}, provenance=provenance,
                             multilabel=multilabel, validation=ds["val"], test=ds["test"])
    summary = {"run_id": run_id, "history": res.history, "best_epoch": res.best_epoch,
               "stopped_early": res.stopped_early, "validation": res.val_metrics, "test": test,
               "bundle": str(bundle_dir), "train_seconds": train_seconds, "data_report": report}
    write_json(out / "metrics.json", summary)
    macro = test["macro"]
    tracker.log(res.best_epoch, {"test_auc": macro["auc"], "test_f1": macro["f1"], "test_loss": test.get("loss")})
    tracker.log_artifacts(bundle_dir, "bundle")
    summary["table"] = format_headline_table({"test (this run)": test}, title="Centralised - test split",
                                             reference=SEED_PAPER if compare_paper else None)
    return summary
