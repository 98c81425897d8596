"""The hospital's Flower ClientApp: local training and evaluation on the node's own patients.

Replies carry weights, counts and aggregate metrics only (examples, loss, AUC/F1, seconds): never an image,
a label vector, a file name or a patient id. The incoming "config" record carries `findings` (the label
order the server's model uses) and, from FedProx, `proximal-mu`.
"""
from __future__ import annotations

import time
import zlib
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.arrays import load_record, state_to_record, to_fp32
from client.data import NodeData, load_node_data
from client.mods import make_mods
from client.privacy import RoundPrivacy, unwrap
from client.settings import RunSettings
from common.models import build_model
from common.training import evaluate, make_criterion, make_loader, make_optimizer, seed_everything, train_epoch


def _num(x: Any) -> float:
    """MetricRecord needs a number: an undefined metric (None) travels as NaN."""
    return float("nan") if x is None else float(x)


def _setup(msg: Message, context: Context, overrides: dict | None):
    settings = RunSettings.from_run_config(context.run_config, overrides)
    config = msg.content["config"] if "config" in msg.content.config_records else ConfigRecord()
    findings = list(config["findings"]) if "findings" in config else None
    data = load_node_data(dict(context.node_config), settings, findings)
    cfg = settings.experiment(findings=data.findings)
    if settings.client_threads:
        torch.set_num_threads(settings.client_threads)
    model = build_model(cfg.model.model_copy(update={"weights": "none"}), len(data.findings),
                        cfg.preprocess.channels)
    load_record(model, to_fp32(msg.content["arrays"]))
    return settings, config, data, cfg, model


def _seed(settings: RunSettings, data: NodeData, server_round: int) -> int:
    """Different per round and per hospital, reproducible across runs."""
    return settings.seed + 1000 * server_round + zlib.crc32(data.site.encode()) % 1000


def train(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    t0 = time.perf_counter()
    settings, config, data, cfg, model = _setup(msg, context, overrides)
    server_round = int(config.get("server-round", 0)) + int(config.get("round-offset", 0))
    seed = _seed(settings, data, server_round)
    seed_everything(seed)
    ds = data.datasets
    dp = RoundPrivacy.start(settings, context.state, len(ds["train"]), server_round) if settings.dp_enabled else None
    if dp is not None and not dp.allowed():  # this round would break the hospital's budget: do not train
        return Message(dp.decline(data.site), reply_to=msg)
    criterion = make_criterion(cfg.train, ds["train"].labels)
    loader = make_loader(ds["train"], cfg.train.batch_size, shuffle=True, seed=seed, drop_last=True)
    optimizer = make_optimizer(model, cfg.train)
    mu = float(config.get("proximal-mu", settings.proximal_mu))
    global_params = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    if dp is not None:  # Opacus: per-sample clipping + noise, Poisson sampling over the same examples
        engine, model, optimizer, loader = dp.budget.attach(model, optimizer, loader)
    losses, steps = [], 0
    for _ in range(settings.local_epochs):
        r = train_epoch(model, loader, optimizer, criterion, proximal_mu=mu, global_params=global_params)
        losses.append(r["train_loss"])
        steps += len(loader)
    val = evaluate(unwrap(model), make_loader(ds["val"], cfg.train.batch_size * 2, shuffle=False), data.findings,
                   criterion=criterion, tune=cfg.train.threshold_method, multilabel=data.multilabel)
    metrics = MetricRecord({
        "num-examples": len(ds["train"]), "train-loss": float(losses[-1]), "local-steps": steps,
        "val-auc": _num(val["macro"]["auc"]), "val-f1": _num(val["macro"]["f1"]),
        "seconds": time.perf_counter() - t0, **(dp.finish(engine, context.state) if dp is not None else {}),
    })
    fp16 = bool(config.get("fp16", settings.fp16))
    content = RecordDict({"arrays": state_to_record(model, fp16=fp16), "metrics": metrics,
                          "node": ConfigRecord({"site": data.site})})
    return Message(content=content, reply_to=msg)


def evaluate_local(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    """The global model on this hospital's test split, thresholds tuned on its validation split."""
    t0 = time.perf_counter()
    settings, _, data, cfg, model = _setup(msg, context, overrides)
    ds, bs = data.datasets, cfg.train.batch_size * 2
    criterion = make_criterion(cfg.train)
    val = evaluate(model, make_loader(ds["val"], bs, shuffle=False), data.findings, tune=cfg.train.threshold_method,
                   multilabel=data.multilabel)
    thr = [val["per_finding"][f]["threshold"] for f in data.findings]
    test = evaluate(model, make_loader(ds["test"], bs, shuffle=False), data.findings, criterion=criterion,
                    thresholds=thr, multilabel=data.multilabel)
    m = test["macro"]
    metrics = MetricRecord({
        "num-examples": len(ds["test"]), "test-loss": float(test["loss"]), "test-auc": _num(m["auc"]),
        "test-f1": _num(m["f1"]), "test-accuracy": _num(m["accuracy"]), "test-precision": _num(m["precision"]),
        "test-recall": _num(m["recall"]), "seconds": time.perf_counter() - t0,
    })
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

    return client_app


app = make_client_app()

__all__ = ["app", "make_client_app", "train", "evaluate_local"]
