"""Centralised: the hospitals' training images pooled (the upper reference), trained by common's `fit`."""
from __future__ import annotations

import time

from common.models import build_model
from common.training import fit, make_criterion, make_loader, seed_everything
from simulations.arms.base import ArmContext, ArmType, predictions, register
from simulations.config import ArmConfig
from simulations.evaluation import datasets_for


def train_and_track(ctx: ArmContext, train_idx: list[int], val_loader, seed: int, *, progress: bool = True):
    """`fit` on some training images with per-epoch global-test AUC; returns (model, FitResult, rows)."""
    exp = ctx.exp
    seed_everything(seed, exp.train.num_threads)
    train = datasets_for(ctx.proto, exp, {"train": train_idx})["train"]
    model = build_model(exp.model, len(ctx.evaluator.findings), exp.preprocess.channels)
    criterion = make_criterion(exp.train, train.labels)
    loader = make_loader(train, exp.train.batch_size, shuffle=True, seed=seed, num_workers=exp.train.num_workers,
                         drop_last=True)
    rows, t = [], [time.perf_counter()]

    def on_epoch(row: dict) -> None:
        rows.append({"round": row["epoch"], "train_loss": row["train_loss"], "val_auc": row["val_auc"],
                     "val_f1": row["val_f1"], "val_loss": row["val_loss"], "test_auc": ctx.evaluator.quick_auc(model),
                     "wall_s": round(time.perf_counter() - t[0], 3)})
        t[0] = time.perf_counter()

    res = fit(model, loader, val_loader, exp.train, ctx.evaluator.findings, criterion=criterion,
              multilabel=ctx.evaluator.multilabel, freeze_backbone_epochs=exp.model.freeze_backbone_epochs,
              progress=ctx.progress and progress, on_epoch=on_epoch)
    return model, res, rows, len(train)


@register
class Centralised(ArmType):
    kind = "centralised"

    def run(self, ctx: ArmContext, spec: ArmConfig):
        model, res, rows, n = train_and_track(ctx, ctx.proto.pooled_train, ctx.evaluator.loaders["val"],
                                              ctx.exp.train.seed)
        for r in rows:
            ctx.tracker.log(r["round"], {"val_auc": r["val_auc"], "val_f1": r["val_f1"], "test_auc": r["test_auc"],
                                         "train_loss": r["train_loss"]})
        scored = ctx.evaluator.global_test(model, res.thresholds)
        result = {"test": scored.metrics, "validation": res.val_metrics, "best_round": res.best_epoch,
                  "rounds": rows, "train_images": n, "calibration": res.calibration,
                  "cost": {**ctx.cost, "schedule": f"{ctx.cfg.federation.epochs} epochs on the pooled training images"},
                  "per_hospital_test": ctx.evaluator.cross_site(model, res.thresholds)}
        result["cross_site"] = {spec.name: result["per_hospital_test"]}
        return result, predictions(scored)
