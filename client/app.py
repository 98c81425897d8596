"""The hospital's Flower ClientApp: local training and evaluation on the node's own patients, and the two jobs
beside training (server/jobs.py): `evaluate.bundle` (client/crosssite.py) and `query.stats` (client/stats.py).

Replies carry weights, counts and aggregate metrics only (examples, loss, AUC/F1, seconds) and the site name:
never an image, a label vector, a file name or a patient id. Failures leave as a fixed vocabulary
(client/boundary.py, the outermost mod); the hospital's site policy (client/policy.py, named by the node
config, never by the run config) can refuse a run and decides which metrics may leave. The incoming "config"
record carries `findings` (the label order the server's model uses) and, from FedProx, `federation.proximal_mu`.
"""
from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.arrays import load_record, state_to_record, to_fp32
from client import optimizer_state
from client.boundary import REFUSED, hospital_log, reason
from client.data import NodeData, load_node_data
from client.mods import UNDER_SECURE_AGGREGATION, make_mods
from client.policy import Refusal, SitePolicy, check_round, check_run
from client.privacy import RoundPrivacy, dp_trainable, is_pretrained, unwrap
from common.settings import Settings
from common.errors import DataError
from common.models import build_model, set_trainable
from common.training import (cosine_lr, evaluate, make_criterion, make_loader, make_optimizer, model_device,
                             resolve_device, seed_everything, train_epoch)


def _num(x: Any) -> float:
    """MetricRecord needs a number: an undefined metric (None) travels as NaN."""
    return float("nan") if x is None else float(x)


def _setup(msg: Message, context: Context, overrides: dict | None):
    settings = Settings.from_run_config(context.run_config, overrides)
    config = msg.content["config"] if "config" in msg.content.config_records else ConfigRecord()
    findings = list(config["findings"]) if "findings" in config else None
    data = load_node_data(dict(context.node_config), settings, findings)
    if settings.federation.client_threads:
        torch.set_num_threads(settings.federation.client_threads)
    model = build_model(settings.network.model_copy(update={"weights": "none"}), len(data.findings),
                        settings.preprocess.channels)
    load_record(model, to_fp32(msg.content["arrays"]))
    return settings, config, data, model.to(resolve_device(settings.train.device))   # the hospital's GPU if any


def _process_age() -> float:
    """Seconds since this ClientApp's task was launched (fedxray/warm_exec.py says when) or its process began."""
    launched = os.environ.get("FEDXRAY_TASK_LAUNCHED")   # fedxray/warm_exec.py: LAUNCHED_ENV
    if launched:
        return time.time() - float(launched)
    try:   # /proc's start time in clock ticks since boot: exact, where psutil's boot-time arithmetic is ~1 s off
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - psutil.Process().create_time()


def _shared(metrics: dict, policy: SitePolicy | None) -> MetricRecord:
    """The metrics that may leave under the site policy; the others travel as NaN, so every hospital's reply
    keeps the same keys (the server averages each key over the hospitals that defined it)."""
    return MetricRecord({k: (v if policy is None or policy.shares(k) else float("nan")) for k, v in metrics.items()})


def _refuse(msg: Message, data: NodeData, refusal: Refusal) -> Message:
    return Message(Error(REFUSED, reason("policy-refused", site=data.site, detail=refusal.detail())), reply_to=msg)


def _seed(settings: Settings, data: NodeData, server_round: int) -> int:
    """Different per round and per hospital, reproducible across runs."""
    return settings.train.seed + 1000 * server_round + zlib.crc32(data.site.encode()) % 1000


def train(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    t0 = time.perf_counter()
    policy = SitePolicy.for_node(dict(context.node_config))   # first: an invalid policy refuses everything
    settings, config, data, model = _setup(msg, context, overrides)
    offset = int(config.get("round-offset", 0))
    server_round = int(config.get("server-round", 0)) + offset
    seed = _seed(settings, data, server_round)
    seed_everything(seed)
    ds = data.datasets
    ledger = policy.ledger() if policy is not None and settings.privacy.enabled else None
    run_key = str(context.run_id)
    dp = None
    if settings.privacy.enabled:
        prior = ledger.run_history(run_key, settings.fingerprint(), resumed=offset > 0) if ledger else None
        dp = RoundPrivacy.start(settings, context.state, len(ds["train"]), server_round, history=prior)
    if policy is not None:
        try:
            check_run(policy, settings, train_examples=len(ds["train"]),
                      secure_aggregation=UNDER_SECURE_AGGREGATION.get(), budget=dp.budget if dp else None)
            if ledger is not None:
                check_round(policy, ledger, dp)
        except Refusal as refusal:
            return _refuse(msg, data, refusal)
    if dp is not None and not dp.allowed():  # this round would break the run's own budget: do not train
        return Message(dp.decline(data.site), reply_to=msg)
    criterion = make_criterion(settings.train, ds["train"].labels).to(model_device(model))
    loader = make_loader(ds["train"], settings.train.batch_size, shuffle=True, seed=seed, drop_last=True)
    if dp is not None:   # privacy.trainable: e.g. only the last block + head of a pretrained model
        set_trainable(model, dp_trainable(settings.privacy, is_pretrained(settings.model.weights)))
    optimizer = make_optimizer(model, settings.train)
    if settings.federation.local_optimizer == "kept":
        optimizer_state.restore(optimizer, context.state)
    mu = float(config.get("proximal-mu", settings.federation.proximal_mu))
    global_params = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    if dp is not None:  # Opacus: per-sample clipping + noise, Poisson sampling over the same examples
        engine, model, optimizer, loader, criterion = dp.budget.attach(model, optimizer, loader, criterion)
    if "data-path" in context.node_config:   # a deployment node: what starting this message cost (benchmarks read it)
        hospital_log(dict(context.node_config)).info(
            "round %d: first training step %.2f s after its process started (data and model ready %.2f s after)",
            server_round, _process_age(), time.perf_counter() - t0)
    losses, steps = [], 0
    f = settings.federation
    for k in range(f.local_epochs):
        if f.lr_schedule == "cosine":   # Opacus' DPOptimizer shares the wrapped optimizer's param_groups
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(settings.train.lr, (server_round - 1) * f.local_epochs + k,
                                        f.rounds * f.local_epochs)
        r = train_epoch(model, loader, optimizer, criterion, proximal_mu=mu, global_params=global_params)
        losses.append(r["train_loss"])
        steps += len(loader)
    if settings.federation.local_optimizer == "kept":
        optimizer_state.keep(optimizer, context.state)
    val = (evaluate(unwrap(model), make_loader(ds["val"], settings.train.batch_size * 2, shuffle=False), data.findings,
                    criterion=criterion, tune=settings.train.threshold_method, multilabel=data.multilabel)
           if len(ds["val"]) else {"macro": {"auc": None, "f1": None}})   # local_split=train: no local metrics
    privacy = dp.finish(engine, context.state) if dp is not None else {}
    if ledger is not None:   # spent once the update leaves: recorded before it does
        ledger.record(run_key, fingerprint=settings.fingerprint(), site=data.site, server_round=server_round,
                      steps=dp.new_steps, run_epsilon=privacy["dp-epsilon"], run_delta=privacy["dp-delta"])
    metrics = _shared({
        "num-examples": len(ds["train"]), "train-loss": float(losses[-1]), "local-steps": steps,
        "val-auc": _num(val["macro"]["auc"]), "val-f1": _num(val["macro"]["f1"]),
        "seconds": time.perf_counter() - t0, **privacy,
    }, policy)
    fp16 = bool(config.get("fp16", settings.federation.fp16))
    content = RecordDict({"arrays": state_to_record(model, fp16=fp16), "metrics": metrics,
                          "node": ConfigRecord({"site": data.site})})
    return Message(content=content, reply_to=msg)


def evaluate_local(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    """The global model on this hospital's held-out patients: its test split with thresholds tuned on its
    validation split, or (federation.local_split = train-val) its validation split, thresholds tuned on it.
    The metric keys name the split ("test-auc" or "val-auc")."""
    t0 = time.perf_counter()
    policy = SitePolicy.for_node(dict(context.node_config))
    settings, _, data, model = _setup(msg, context, overrides)
    ds, bs = data.datasets, settings.train.batch_size * 2
    split = "test" if len(ds["test"]) else "val"
    if not len(ds[split]):
        raise DataError("this hospital keeps no patients out of training (federation.local_split=train), so it "
                        "cannot evaluate: set federation.fraction_evaluate=0 or another federation.local_split",
                        failure="run-config")
    criterion = make_criterion(settings.train).to(model_device(model))
    val = evaluate(model, make_loader(ds["val"], bs, shuffle=False), data.findings,
                   tune=settings.train.threshold_method, multilabel=data.multilabel)
    thr = [val["per_finding"][f]["threshold"] for f in data.findings]
    res = evaluate(model, make_loader(ds[split], bs, shuffle=False), data.findings, criterion=criterion,
                   thresholds=thr, multilabel=data.multilabel)
    m = res["macro"]
    metrics = _shared({
        "num-examples": len(ds[split]), f"{split}-loss": float(res["loss"]), f"{split}-auc": _num(m["auc"]),
        f"{split}-f1": _num(m["f1"]), f"{split}-accuracy": _num(m["accuracy"]),
        f"{split}-precision": _num(m["precision"]), f"{split}-recall": _num(m["recall"]),
        "seconds": time.perf_counter() - t0,
    }, policy)
    return Message(content=RecordDict({"metrics": metrics, "node": ConfigRecord({"site": data.site})}),
                   reply_to=msg)


def make_client_app(overrides: dict | None = None) -> ClientApp:
    """A ClientApp; `overrides` (run-config keys) serve Python callers whose run config is empty."""
    client_app = ClientApp(mods=make_mods(overrides))  # central-DP clipping / SecAgg+ when a message asks

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, overrides)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_local(msg, context, overrides)

    @client_app.evaluate("bundle")   # job=evaluate (server/jobs.py): an exported bundle on this hospital's test split
    def _evaluate_bundle(msg: Message, context: Context) -> Message:
        from client.crosssite import score_bundle

        return score_bundle(msg, context, overrides)

    @client_app.query("stats")       # job=stats: aggregate data statistics, small counts suppressed
    def _stats(msg: Message, context: Context) -> Message:
        from client.stats import stats_reply

        return stats_reply(msg, context, overrides)

    return client_app


app = make_client_app()

__all__ = ["app", "make_client_app", "train", "evaluate_local"]
