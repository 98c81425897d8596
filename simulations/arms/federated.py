"""Federated (and DP) arms: the real Flower simulation runtime through the Flower apps' Python entry
(`server.federation.run_federated_simulation`), with Flower's strategies chosen by name.

The protocol's split reaches the apps through `simulations.flower_data` (one folder per hospital + holdout),
so the apps train and evaluate on exactly the images the other arms use. The exported bundle (best round on
global validation macro-F1, thresholds tuned there) is then scored here with the same Evaluator as every
other arm; the apps' own test figures are kept beside it as a consistency check.
"""
from __future__ import annotations

import math
from pathlib import Path

from common.errors import FedxrayError
from common.settings import Settings, flatten, nest
from simulations.arms.base import ArmContext, ArmType, predictions, register
from simulations.config import ArmConfig
from simulations.flower_data import materialise



def run_settings(ctx: ArmContext, spec: ArmConfig, data_root: Path, out: Path, extra: dict | None = None) -> Settings:
    """The experiment's own settings, as the Flower apps receive them: the same sections the other arms train
    with (so nothing can differ by accident), this arm's strategy and `params`, and the protocol's hospitals
    (`simulations.flower_data`: one folder per hospital, split as the protocol split it, plus holdout/)."""
    f, n = ctx.cfg.federation, len(ctx.proto.hospitals)
    return ctx.exp.updated(**{
        "federation.strategy": spec.strategy.lower(), "federation.fraction_evaluate": 1.0,
        "federation.min_train_nodes": max(1, math.ceil(n * f.fraction_train)), "federation.min_evaluate_nodes": n,
        "federation.min_available_nodes": n, "federation.resume": True,
        "federation.local_split": "train-val-test",   # each hospital keeps the protocol's own split
        "federation.client_threads": ctx.exp.train.num_threads or 1,
        "data.path": str(data_root), "data.source": "medmnist", "data.findings": list(ctx.evaluator.findings),
        "federation.server_data_path": str(data_root / "holdout"), "output_dir": str(out),
        **flatten(nest(spec.params)), **(extra or {}),
    })


def initial_model(summary: dict) -> dict | None:
    """Round 0: the global model before any training, as the server evaluated it (what 'it learned' is against)."""
    h = next((h for h in summary.get("history", []) if h.get("round") == 0 and h.get("global")), None)
    return None if h is None else {"val_auc": h["global"]["val"].get("auc"), "test_auc": h["global"]["test"].get("auc")}


def _rounds(summary: dict) -> list[dict]:
    """federation.json history -> one row per round with per-client bytes, time and metrics."""
    rows = []
    for h in summary.get("history", []):
        if not h.get("clients"):
            continue   # round 0: the initial model's evaluation
        g = h["global"]
        down = h.get("bytes_per_client", {}).get("down", 0)
        clients: dict[str, dict] = {}
        for r in h["clients"].get("train", []):
            if not r.get("ok"):
                continue
            m = r.get("metrics", {})
            clients[r.get("site") or str(r["node_id"])] = {
                "bytes_received": down, "bytes_sent": r.get("bytes_up", 0), "num_examples": m.get("num-examples"),
                "train_loss": m.get("train-loss"), "seconds": m.get("seconds"), "local_val_auc": m.get("val-auc"),
                "epsilon": m.get("dp-epsilon", m.get("epsilon"))}
        for r in h["clients"].get("evaluate", []):
            if r.get("ok"):
                c = clients.setdefault(r.get("site") or str(r["node_id"]), {})
                c["own_test_auc"] = r.get("metrics", {}).get("test-auc")
                c["own_test_f1"] = r.get("metrics", {}).get("test-f1")
        n = sum(c.get("num_examples") or 0 for c in clients.values())
        loss = (sum((c.get("train_loss") or 0) * (c.get("num_examples") or 0) for c in clients.values()) / n
                if n else None)
        eps = [c["epsilon"] for c in clients.values() if c.get("epsilon") is not None]
        rows.append({"round": h["round"], "val_auc": g["val"].get("auc"), "val_f1": g["val"].get("f1"),
                     "val_loss": g["val"].get("loss"), "test_auc": g["test"].get("auc"), "test_f1": g["test"].get("f1"),
                     "train_loss": loss,
                     "wall_s": h.get("seconds"), "epsilon": max(eps) if eps else None, "clients": clients})
    return rows


@register
class Federated(ArmType):
    kind = "federated"

    def extra_settings(self, spec: ArmConfig) -> dict:
        return {}

    def run(self, ctx: ArmContext, spec: ArmConfig):
        from common.bundle import load_bundle
        from server.federation import run_federated_simulation

        data_root = materialise(ctx.proto, ctx.workdir.parent / "flower-data", ctx.exp.preprocess.image_size)
        out = ctx.workdir / "flower"
        settings = run_settings(ctx, spec, data_root, out, self.extra_settings(spec))
        f = ctx.cfg.federation
        summary = run_federated_simulation(settings, num_supernodes=len(ctx.proto.hospitals), cpus=f.cpus,
                                           cpus_per_client=f.client_cpus)
        rounds = _rounds(summary)
        for r in rounds:
            sent = sum(c.get("bytes_sent") or 0 for c in r["clients"].values())
            ctx.tracker.log(r["round"], {"val_auc": r["val_auc"], "val_f1": r["val_f1"], "test_auc": r["test_auc"],
                                         "train_loss": r["train_loss"], "wall_s": r["wall_s"], "bytes_sent": sent,
                                         "epsilon": r["epsilon"]})
        bundle = load_bundle(out / "bundle")
        scored = ctx.evaluator.global_test(bundle.model, bundle.thresholds)
        apps_auc = summary["test"]["macro"]["auc"]
        mine = scored.metrics["macro"]["auc"]
        per_hospital = ctx.evaluator.cross_site(bundle.model, bundle.thresholds)
        result = {
            "test": scored.metrics, "validation": summary.get("validation"), "best_round": summary.get("best_round"),
            "rounds": rounds, "train_images": len(ctx.proto.pooled_train), "strategy": spec.strategy.lower(),
            "run_config": settings.to_run_config(), "runtime": "flower simulation (server.federation.run_federated_simulation)",
            "cost": {**ctx.cost, "schedule": f"{f.rounds} rounds x {f.local_epochs} local epoch(s) at every hospital"},
            "per_hospital_test": per_hospital, "cross_site": {spec.name: per_hospital},
            "epsilon": max((r["epsilon"] for r in rounds if r["epsilon"] is not None), default=None),
            "apps_test_auc": apps_auc, "flower_output": str(out), "initial": initial_model(summary),
            "calibration": summary["provenance"].get("calibration"),
        }
        if apps_auc is not None and mine is not None and abs(apps_auc - mine) > 1e-6:
            result["note"] = (f"the apps' own test AUC ({apps_auc:.6f}) differs from this evaluation ({mine:.6f}) "
                              "of the exported bundle")
        return result, predictions(scored)


@register
class DifferentiallyPrivate(Federated):
    """One federated arm per target epsilon (client-side DP-SGD), for the privacy-utility curve."""

    kind = "dp"

    def expand(self, spec: ArmConfig) -> list[ArmConfig]:
        if not spec.epsilons:
            raise FedxrayError(f"dp arm {spec.name!r} needs epsilons = [..]")
        base = spec.name
        return [spec.model_copy(update={"label": f"{base}-eps{e:g}", "epsilons": [e]}) for e in spec.epsilons]

    def extra_settings(self, spec: ArmConfig) -> dict:
        extra = {"privacy.enabled": True, "privacy.target_epsilon": spec.epsilons[0]}
        if spec.delta is not None:
            extra["privacy.delta"] = spec.delta
        return extra
