"""The warm start alone, scored like every arm: what the federation (and DP fine-tuning) adds to it."""
from __future__ import annotations

from pathlib import Path

from common.bundle import load_bundle
from simulations.arms.base import ArmContext, ArmType, predictions, register
from simulations.config import ArmConfig


@register
class WarmStart(ArmType):
    kind = "warm-start"

    def expand(self, spec: ArmConfig) -> list[ArmConfig]:
        return [spec.model_copy(update={"warm_start": True})]

    def run(self, ctx: ArmContext, spec: ArmConfig):
        bundle = load_bundle(Path(ctx.exp.model.weights))
        model = bundle.model
        thresholds = ctx.evaluator.tune(model)   # global validation, as every arm's thresholds
        scored = ctx.evaluator.global_test(model, thresholds)
        prov = bundle.card.get("provenance") or {}
        result = {"test": scored.metrics, "validation": ctx.evaluator.global_val(model, thresholds),
                  "best_round": prov.get("best_epoch"), "rounds": [],
                  "train_images": ((prov.get("data") or {}).get("images") or {}).get("train"),
                  "cost": {**ctx.cost, "schedule": f"{prov.get('epochs_run')} epochs on the public slice only "
                                                   "(no hospital's data)"},
                  "per_hospital_test": ctx.evaluator.cross_site(model, thresholds),
                  "warm_start": {"model_id": bundle.card.get("model_id"), "public_data": prov.get("public_data"),
                                 "data": prov.get("data")}}
        result["cross_site"] = {spec.name: result["per_hospital_test"]}
        return result, predictions(scored)
