"""A federated run's record (federation.json's summary: settings, per-round history, bundle) to the run tracker
(common/tracking.py: TensorBoard, and MLflow when installed), once the run has finished: the same record
whichever runtime ran it (in-process simulation, `flwr run` simulation, the deployment launcher), and nothing
of MLflow inside the Flower apps. Only what federation.json already holds is logged: global metrics on the
server's held-out data, counts, epsilon; nothing a hospital did not already report."""
from __future__ import annotations

from pathlib import Path

from common.settings import Settings
from common.tracking import Tracker


def round_metrics(row: dict) -> dict[str, float | None]:
    """One history row of federation.json -> the tracked metrics of that round (round 0: the initial model)."""
    g = row["global"]
    out = {f"{split}_{k}": g[split].get(k) for split in ("val", "test") for k in ("auc", "f1", "loss")}
    clients = row.get("clients")
    if clients is not None:
        out["hospitals_trained"] = sum(1 for c in clients["train"] if c["ok"])
        out["bytes_up_per_client"] = row.get("bytes_per_client", {}).get("up")
        out["round_seconds"] = row.get("seconds")
    eps = [p["epsilon"] for p in row.get("privacy", {}).values() if p.get("epsilon") is not None]
    out["epsilon"] = max(eps) if eps else None   # the most any hospital has spent so far (DP-SGD only)
    return out


def track_federated(settings: Settings, summary: dict, *, kind: str = "federate") -> str | None:
    """Log a finished federated run; returns the MLflow run id (None without MLflow or when tracking failed)."""
    out = Path(settings.output_dir)
    prov = summary.get("provenance", {})
    fed = prov.get("federation", {})
    flower_runs = fed.get("run_ids") or [prov.get("flower_run_id")]
    tags = {"fedxray.run_id": prov.get("run_id", ""), "flower.run_id": ",".join(str(r) for r in flower_runs if r),
            "fedxray.strategy": settings.federation.strategy, "fedxray.best_round": summary.get("best_round")}
    params = {**settings.model_dump(mode="json"), "fingerprint": {"settings": settings.fingerprint()}}
    with Tracker(out, kind=kind, name=prov.get("run_id") or out.name, tensorboard=out / "tensorboard",
                 params=params, tags=tags) as tracker:
        for row in summary["history"]:
            tracker.log(row["round"], round_metrics(row))
        if summary.get("bundle"):
            tracker.log_artifacts(summary["bundle"], "bundle")
        return tracker.run_id
