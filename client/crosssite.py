"""A hospital scores an exported model bundle for `job = "evaluate"` (server/jobs.py), without training.

The `evaluate.bundle` message carries the bundle's weights ("arrays") and, in its "bundle" ConfigRecord, what
the hospital needs to rebuild it and its inputs: the architecture and preprocessing (JSON of the card's
sections), the findings in the model's output order, multilabel, and the card's thresholds. The hospital
prepares its own data with the BUNDLE's preprocessing but the run's data settings, so the split is the
patient-level split training makes (client/data.py), and scores its test split at the bundle's thresholds:
the deployed operating point, not thresholds re-tuned on the hospital's data. With federation.local_split =
train-val the hospital has no test split and its validation patients (also never trained on) are scored;
the metric keys name the split ("test-auc" / "val-auc").

A hospital whose labels do not cover the bundle's findings fails with the boundary's `data-labels` code.
Replies: num-examples and macro AUC, F1, accuracy, precision, recall; per finding (`<split>-auc/<finding>`)
only when the site policy's disclosure allows, i.e. its `metrics` list names `per-finding` as well as the
metric (no list: everything). Metrics the policy keeps back travel as NaN, as for evaluate_local.
"""
from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.data import load_node_data
from client.policy import SitePolicy
from common.arrays import load_record, to_fp32
from common.errors import DataError
from common.models import build_model
from common.settings import ModelConfig, PreprocessConfig, Settings
from common.training import evaluate, make_loader, resolve_device

BUNDLE_RECORD = "bundle"          # the message's ConfigRecord describing the bundle
PER_FINDING = "per-finding"       # disclosure name that lets per-finding metrics leave
METRICS = ("auc", "f1", "accuracy", "precision", "recall")


def bundle_config(bundle) -> ConfigRecord:
    """What a hospital needs to score `bundle` (common.bundle.Bundle): the server puts it in the message."""
    return ConfigRecord({
        "model-id": bundle.model_id, "findings": list(bundle.findings),
        "thresholds": [float(t) for t in bundle.thresholds], "multilabel": bool(bundle.multilabel),
        "architecture": json.dumps(bundle.model_config.model_dump(mode="json")),
        "preprocess": json.dumps(bundle.preprocess.model_dump(mode="json")),
    })


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _may_leave(policy: SitePolicy | None, key: str, per_finding: bool = False) -> bool:
    if policy is None:
        return True
    return policy.shares(key) and (not per_finding or policy.shares(PER_FINDING))


def score_bundle(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    t0 = time.perf_counter()
    policy = SitePolicy.for_node(dict(context.node_config))
    settings = Settings.from_run_config(context.run_config, overrides)
    cfg = msg.content[BUNDLE_RECORD]
    findings = [str(f) for f in cfg["findings"]]
    thresholds = [float(t) for t in cfg["thresholds"]]
    arch = ModelConfig.model_validate({**json.loads(str(cfg["architecture"])), "weights": "none"})
    pre = PreprocessConfig.model_validate(json.loads(str(cfg["preprocess"])))
    data = load_node_data(dict(context.node_config), settings.model_copy(update={"preprocess": pre}), findings)
    if list(data.findings) != findings or bool(data.multilabel) != bool(cfg["multilabel"]):
        raise DataError(f"this hospital labels {data.findings} (multilabel={data.multilabel}), the bundle predicts "
                        f"{findings} (multilabel={bool(cfg['multilabel'])})", failure="data-labels")
    ds = data.datasets
    split = "test" if len(ds["test"]) else "val"
    if not len(ds[split]):
        raise DataError("this hospital keeps no patients out of training (federation.local_split=train), so it "
                        "cannot score a bundle: choose another federation.local_split", failure="run-config")
    model = build_model(arch, len(findings), pre.channels)
    load_record(model, to_fp32(msg.content["arrays"]))
    model.to(resolve_device(settings.train.device))
    res = evaluate(model.eval(), make_loader(ds[split], settings.train.batch_size * 2, shuffle=False), findings,
                   thresholds=thresholds, multilabel=data.multilabel)
    metrics = {"num-examples": len(ds[split])}
    for m in METRICS:
        key = f"{split}-{m}"
        metrics[key] = _num(res["macro"][m]) if _may_leave(policy, key) else float("nan")
        for f in findings:
            value = res["per_finding"][f][m]
            metrics[f"{key}/{f}"] = _num(value) if _may_leave(policy, key, per_finding=True) else float("nan")
    metrics["seconds"] = time.perf_counter() - t0
    return Message(content=RecordDict({"metrics": MetricRecord(metrics), "node": ConfigRecord({"site": data.site})}),
                   reply_to=msg)
