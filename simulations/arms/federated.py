"""Federated (and DP) arms: the real Flower simulation runtime through the Flower apps' Python entry
(`server.federation.run_federated_simulation`), with Flower's strategies chosen by name.

The protocol's split reaches the apps through `simulations.flower_data` (one folder per hospital + holdout),
so the apps train and evaluate on exactly the images the other arms use. The exported bundle (best round on
global validation macro-F1, thresholds tuned there) is then scored here with the same Evaluator as every
other arm; the apps' own test figures are kept beside it as a consistency check.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from common.errors import FedxrayError
from simulations.arms.base import ArmContext, ArmType, predictions, register
from simulations.config import ArmConfig
from simulations.flower_data import materialise

COMPARED_TRAIN_FIELDS = ("batch_size", "lr", "weight_decay", "pos_weight", "loss", "threshold_method")


def flower_available() -> str | None:
    """None when the Flower apps' Python entry can be imported, else why not."""
    if importlib.util.find_spec("server.federation") is None or importlib.util.find_spec("client.app") is None:
        return "the Flower apps (server/federation.py, client/app.py) are not in this checkout"
    try:
        from server.federation import run_federated_simulation  # noqa: F401
    except ImportError as e:
        return f"the Flower apps cannot be imported: {e}"
    return None


def run_config(ctx: ArmContext, spec: ArmConfig, data_root: Path, out: Path, extra: dict | None = None,
               may_differ: tuple[str, ...] = ()) -> dict:
    """Flower run-config overrides that reproduce this experiment's model, images and training.

    Settings the apps would change are an error (an unfair comparison), except keys the arm sets on purpose
    (its `params`, federation.run_config) and `may_differ` (e.g. the GroupNorm model DP-SGD needs)."""
    from client.settings import RunSettings

    exp, f, n = ctx.exp, ctx.cfg.federation, len(ctx.proto.hospitals)
    rc = {
        "num-server-rounds": f.rounds, "strategy": spec.strategy.lower(), "fraction-train": f.fraction_train,
        "fraction-evaluate": 1.0, "min-train-nodes": max(1, math.ceil(n * f.fraction_train)),
        "min-evaluate-nodes": n, "min-available-nodes": n, "fp16": f.fp16, "resume": True,
        "local-epochs": f.local_epochs, "batch-size": exp.train.batch_size, "lr": exp.train.lr,
        "weight-decay": exp.train.weight_decay, "pos-weight": exp.train.pos_weight,
        "threshold-method": exp.train.threshold_method, "client-threads": exp.train.num_threads or 1,
        "arch": exp.model.arch, "weights": exp.model.weights, "image-size": exp.preprocess.image_size,
        "channels": exp.preprocess.channels, "denoise-sigma": exp.preprocess.denoise_sigma,
        "augment": exp.augment.enabled, "data-path": str(data_root), "data-source": "medmnist",
        "server-data-path": str(data_root / "holdout"), "findings": ",".join(ctx.evaluator.findings),
        "output-dir": str(out), "seed": exp.train.seed, **f.run_config, **spec.params, **(extra or {}),
    }
    optional = {"dp_compatible": ("dp-compatible", exp.model.dp_compatible),   # GroupNorm model, when the apps
                "dropout": ("dropout", exp.model.dropout)}                     # know these keys
    rc.update({key: v for field, (key, v) in optional.items() if field in RunSettings.model_fields and key not in rc})
    s = RunSettings.from_run_config({}, rc)
    theirs = s.experiment(findings=ctx.evaluator.findings)
    explicit = set(spec.params) | set(f.run_config) | set(may_differ)   # deliberate per-arm choices
    fields = [(sec, k) for sec in ("preprocess", "augment", "model") for k in type(getattr(exp, sec)).model_fields]
    fields += [("train", k) for k in COMPARED_TRAIN_FIELDS]
    diffs = [f"{sec}.{k}: {getattr(getattr(exp, sec), k)!r} here, {getattr(getattr(theirs, sec), k)!r} in the apps"
             for sec, k in fields if getattr(getattr(exp, sec), k) != getattr(getattr(theirs, sec), k)
             and _key(sec, k) not in explicit]
    if diffs:
        raise FedxrayError("the federated arm cannot reproduce these settings through the Flower app's run config, "
                           "so it would not be a fair comparison: " + "; ".join(diffs))
    return rc


def _key(section: str, field: str) -> str:
    """The run-config key of a common/ setting (augment.enabled is `augment`)."""
    return "augment" if (section, field) == ("augment", "enabled") else field.replace("_", "-")


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
                     "test_auc": g["test"].get("auc"), "test_f1": g["test"].get("f1"), "train_loss": loss,
                     "wall_s": h.get("seconds"), "epsilon": max(eps) if eps else None, "clients": clients})
    return rows


@register
class Federated(ArmType):
    kind = "federated"
    may_differ: tuple[str, ...] = ()

    def unavailable(self, spec: ArmConfig) -> str | None:
        return flower_available()

    def extra_run_config(self, spec: ArmConfig) -> dict:
        return {}

    def run(self, ctx: ArmContext, spec: ArmConfig):
        from common.bundle import load_bundle
        from server.federation import run_federated_simulation

        data_root = materialise(ctx.proto, ctx.workdir.parent / "flower-data", ctx.exp.preprocess.image_size)
        out = ctx.workdir / "flower"
        rc = run_config(ctx, spec, data_root, out, self.extra_run_config(spec), self.may_differ)
        f = ctx.cfg.federation
        summary = run_federated_simulation(rc, num_supernodes=len(ctx.proto.hospitals), cpus=f.cpus,
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
            "run_config": rc, "runtime": "flower simulation (server.federation.run_federated_simulation)",
            "cost": {**ctx.cost, "schedule": f"{f.rounds} rounds x {f.local_epochs} local epoch(s) at every hospital"},
            "per_hospital_test": per_hospital, "cross_site": {spec.name: per_hospital},
            "epsilon": max((r["epsilon"] for r in rounds if r["epsilon"] is not None), default=None),
            "apps_test_auc": apps_auc, "flower_output": str(out),
        }
        if apps_auc is not None and mine is not None and abs(apps_auc - mine) > 1e-6:
            result["note"] = (f"the apps' own test AUC ({apps_auc:.6f}) differs from this evaluation ({mine:.6f}) "
                              "of the exported bundle")
        return result, predictions(scored)


DP_EPSILON_FIELDS = ("dp_target_epsilon", "dp_epsilon", "target_epsilon")


def dp_epsilon_key() -> str | None:
    """The run-config key that sets a target epsilon, once the privacy work has added one."""
    try:
        from client.settings import RunSettings
    except ImportError:
        return None
    field = next((f for f in DP_EPSILON_FIELDS if f in RunSettings.model_fields), None)
    return field.replace("_", "-") if field else None


@register
class DifferentiallyPrivate(Federated):
    """One federated arm per target epsilon (client-side DP-SGD), for the privacy-utility curve."""

    kind = "dp"
    may_differ = ("dp-compatible",)   # DP-SGD trains the GroupNorm variant of the model

    def expand(self, spec: ArmConfig) -> list[ArmConfig]:
        if not spec.epsilons:
            raise FedxrayError(f"dp arm {spec.name!r} needs epsilons = [..]")
        base = spec.name
        return [spec.model_copy(update={"label": f"{base}-eps{e:g}", "epsilons": [e]}) for e in spec.epsilons]

    def unavailable(self, spec: ArmConfig) -> str | None:
        why = flower_available()
        if why:
            return why
        if dp_epsilon_key() is None:
            return ("differential privacy is not available in the Flower apps yet (no target-epsilon run-config "
                    "key in client/settings.py RunSettings); DP arms are skipped")
        return None

    def extra_run_config(self, spec: ArmConfig) -> dict:
        from client.settings import RunSettings

        extra = {"dp-enabled": True, dp_epsilon_key(): spec.epsilons[0]}
        if spec.delta is not None and "dp_delta" in RunSettings.model_fields:
            extra["dp-delta"] = spec.delta
        return extra
