"""Local-only: each hospital trains alone on its own train split and selects on its own val split (the lower
reference). One model at a time is held in memory; each is scored on the global test set and on every
hospital's test split (its row of the cross-site matrix) before the next one is built.
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from simulations.arms.base import ArmContext, ArmType, mean_metrics, register
from simulations.arms.centralised import train_and_track
from simulations.config import ArmConfig


@register
class LocalOnly(ArmType):
    kind = "local"

    def run(self, ctx: ArmContext, spec: ArmConfig):
        hospitals, curves, cross = {}, [], {}
        for k, h in enumerate(tqdm(ctx.proto.hospitals, desc="local-only hospitals", unit="hospital",
                                   disable=None if ctx.progress else True)):
            own_val = ctx.evaluator.hospital_loader(h.name, "val")
            model, res, rows, n = train_and_track(ctx, h.train, own_val, ctx.exp.train.seed + k, progress=False)
            test = ctx.evaluator.score(model, ctx.evaluator.loaders["test"], res.thresholds).metrics
            cross[h.name] = ctx.evaluator.cross_site(model, res.thresholds)
            hospitals[h.name] = {"test": test, "best_round": res.best_epoch, "train_images": n,
                                 "own_test": cross[h.name].get(h.name), "rounds": rows}
            curves.append(rows)
            del model
        rounds = []
        for i in range(min(len(c) for c in curves)):
            row = {"round": i + 1, "wall_s": float(sum(c[i]["wall_s"] for c in curves))}
            for key in ("train_loss", "val_auc", "val_f1", "test_auc"):
                vals = [c[i][key] for c in curves if c[i][key] is not None]
                row[key] = float(np.mean(vals)) if vals else None
            rounds.append(row)
            ctx.tracker.log(row["round"], {k: row[k] for k in ("val_auc", "test_auc", "train_loss")})
        result = {"test": mean_metrics([h["test"] for h in hospitals.values()]), "hospitals": hospitals,
                  "rounds": rounds, "train_images": sum(h["train_images"] for h in hospitals.values()),
                  "cost": {**ctx.cost,
                           "schedule": f"{ctx.cfg.federation.epochs} epochs per hospital on its own images"},
                  "per_hospital_test": {n: h["own_test"] for n, h in hospitals.items() if h["own_test"]},
                  "cross_site": cross,
                  "note": "test = mean over the hospitals' models on the global test set; range = min-max"}
        return result, None
