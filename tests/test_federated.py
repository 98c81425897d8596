"""Federated training on Flower 1.42: unit tests of the pieces, then both runtimes as real processes.

Integration tests start real Flower processes (SuperLink, SuperNodes, `flwr run`, Ray) with private
FLWR_HOME / RAY_TMPDIR folders and free ports, each in its own process group, and stop them in `finally`
blocks; the session fixture `nothing_left_running` (tests/conftest.py) fails the run if any survived.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from common.arrays import record_bytes, state_to_record, to_fp16, to_fp32
from common.settings import STRATEGIES, Settings
from tests.conftest import REPO, StandInGrid
from tests.run_support import TINY, run_cli, tiny_settings



def _reply(instruction: Message, arrays: dict[str, np.ndarray], n: int, **metrics) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, **metrics})})
    return Message(content, reply_to=instruction)


def _instruction(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)


# ------------------------------------------------------------------------------------------------ aggregation
def test_fedavg_aggregate_is_example_weighted_average(task_identity):
    """Flower's own FedAvg.aggregate_train on two real reply Messages = sum(n_k w_k) / sum(n_k)."""
    from flwr.serverapp.strategy import FedAvg

    rng = np.random.default_rng(0)
    a = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    b = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    replies = [_reply(_instruction(11), a, 10, **{"train-loss": 1.0}),
               _reply(_instruction(12), b, 30, **{"train-loss": 3.0})]
    arrays, metrics = FedAvg().aggregate_train(1, replies)
    for k in a:
        np.testing.assert_allclose(arrays[k].numpy(), (10 * a[k] + 30 * b[k]) / 40, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_named_strategy_is_flowers_and_aggregates(name, task_identity):
    from flwr import serverapp

    from server.strategies import build_strategy

    s = Settings.build("demo", {"federation.strategy": name, "federation.proximal_mu": 0.1 if name == "fedprox" else 0.0, "federation.min_train_nodes": 5})
    strategy = build_strategy(s)
    flower_class = type(strategy).__mro__[2]   # (ours, _RunningStatistics, Flower's class, ...)
    assert flower_class.__module__.startswith("flwr.serverapp.strategy") and isinstance(strategy, flower_class)
    assert isinstance(strategy, serverapp.strategy.Strategy)
    start = {"w": np.zeros((2, 2), np.float32)}

    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(start["w"])}),
                                         ConfigRecord(), StandInGrid([1, 2, 3, 4, 5])))
    replies = [_reply(m, {"w": np.full((2, 2), float(i), np.float32)}, 10 + i) for i, m in enumerate(msgs)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and arrays["w"].numpy().shape == (2, 2)
    if name == "fedprox":
        assert msgs[0].content["config"]["proximal-mu"] == pytest.approx(0.1)


def _bn_rounds(strategy, client_stats: list[list[tuple[float, int]]]) -> list[dict[str, np.ndarray]]:
    """Rounds of two hospitals (10 and 30 examples); client_stats[r][i] = (running_var, num_batches_tracked)."""
    rng = np.random.default_rng(0)
    current = ArrayRecord({"conv.weight": Array(np.zeros(4, np.float32)),
                           "bn.running_var": Array(np.ones(4, np.float32)),
                           "bn.num_batches_tracked": Array(np.array(0, np.int64))})

    out = []
    for rnd, stats in enumerate(client_stats, start=1):
        msgs = list(strategy.configure_train(rnd, current, ConfigRecord(), StandInGrid([1, 2])))
        replies = [_reply(m, {"conv.weight": rng.normal(size=4).astype(np.float32),
                              "bn.running_var": np.full(4, var, np.float32),
                              "bn.num_batches_tracked": np.array(nbt, np.int64)}, n)
                   for m, (var, nbt), n in zip(msgs, stats, (10, 30), strict=True)]
        current, _ = strategy.aggregate_train(rnd, replies)
        out.append({k: v.numpy() for k, v in current.items()})
    return out


# the hospitals' running_var falls from 1 to 0.05: momentum and adaptive steps would overshoot below zero or lag
BN_ROUNDS = [[(0.9, 10), (0.7, 12)], [(0.05, 20), (0.05, 22)], [(0.05, 30), (0.06, 32)]]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimisers_step_weights_but_average_batchnorm_statistics(name, task_identity):
    """Weights exactly as Flower's own class computes them; running statistics = example-weighted mean."""
    from server.strategies import build_strategy

    ours = _bn_rounds(build_strategy(Settings.build("demo", {"federation.strategy": name})), BN_ROUNDS)
    flower_class = type(build_strategy(Settings.build("demo", {"federation.strategy": name}))).__mro__[2]
    s = Settings.build("demo", {"federation.strategy": name})
    kwargs = ({"server_learning_rate": s.federation.fedavgm_server_lr, "server_momentum": s.federation.fedavgm_momentum}
              if name == "fedavgm" else {"eta": s.federation.fedopt_eta, "eta_l": s.train.lr, "beta_1": s.federation.fedopt_beta_1,
                                         "beta_2": s.federation.fedopt_beta_2, "tau": s.federation.fedopt_tau})
    theirs = _bn_rounds(flower_class(**kwargs), BN_ROUNDS)
    for r, (mine, raw, stats) in enumerate(zip(ours, theirs, BN_ROUNDS, strict=True)):
        np.testing.assert_allclose(mine["conv.weight"], raw["conv.weight"], rtol=1e-6)
        np.testing.assert_allclose(mine["bn.running_var"], (10 * stats[0][0] + 30 * stats[1][0]) / 40, rtol=1e-6)
        assert mine["bn.num_batches_tracked"].dtype == np.int64 and mine["bn.num_batches_tracked"].shape == ()
        assert mine["bn.num_batches_tracked"] == round((10 * stats[0][1] + 30 * stats[1][1]) / 40)
        assert mine["conv.weight"].dtype == np.float32 and mine["bn.running_var"].dtype == np.float32, r
    # what the layer prevents: Flower's class alone lets running_var go negative (FedAvgM) or crawl (FedOpt)
    last = theirs[-1]["bn.running_var"]
    assert (last < 0).any() or (last > 0.5).all(), last
    assert theirs[-1]["bn.num_batches_tracked"].dtype != np.int64


def test_fedadam_resumed_after_two_rounds_equals_three_rounds_in_one_go(task_identity):
    """The checkpoint keeps the moments; restore_state also keeps the round count for the bias correction."""
    from server.strategies import build_strategy, export_state, restore_state

    def play(strategy, current, updates):
        for rnd, update in enumerate(updates, start=1):   # Flower's start() numbers its rounds from 1
            msgs = list(strategy.configure_train(rnd, current, ConfigRecord(), StandInGrid([1, 2])))
            current, _ = strategy.aggregate_train(rnd, [_reply(m, update, 10) for m in msgs])
        return current

    updates = [{"w": np.full(4, v, np.float32)} for v in (1.0, 0.5, 2.0)]
    start = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    whole = play(build_strategy(Settings.build("demo", {"federation.strategy": "fedadam"})), start, updates)["w"].numpy()
    first = build_strategy(Settings.build("demo", {"federation.strategy": "fedadam"}))
    after_two = play(first, start, updates[:2])
    resumed = build_strategy(Settings.build("demo", {"federation.strategy": "fedadam"}))
    restore_state(resumed, export_state(first), rounds_done=2)
    np.testing.assert_allclose(play(resumed, after_two, updates[2:])["w"].numpy(), whole, rtol=1e-6)
    restarted = build_strategy(Settings.build("demo", {"federation.strategy": "fedadam"}))
    restore_state(restarted, export_state(first))                        # what resuming did before
    assert not np.allclose(play(restarted, after_two, updates[2:])["w"].numpy(), whole, rtol=1e-3)


def test_a_metric_one_hospital_cannot_compute_does_not_make_the_federation_mean_nan(task_identity):
    from server.strategies import build_strategy

    strategy = build_strategy(Settings())
    replies = [_reply(_instruction(11), {"w": np.zeros(2, np.float32)}, 10,
                      **{"val-auc": float("nan"), "loss": 1.0, "per-finding": [0.5, float("nan")]}),
               _reply(_instruction(12), {"w": np.ones(2, np.float32)}, 30,
                      **{"val-auc": 0.8, "loss": 3.0, "per-finding": [0.9, 0.7]})]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["val-auc"] == pytest.approx(0.8)                    # the one hospital that could compute it
    assert metrics["loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)  # otherwise Flower's weighted mean
    assert metrics["per-finding"] == pytest.approx([(10 * 0.5 + 30 * 0.9) / 40, 0.7])   # lists element-wise
    replies[1].content["metrics"]["val-auc"] = float("nan")
    assert np.isnan(strategy.aggregate_train(1, replies)[1]["val-auc"])


def test_replies_that_cannot_be_aggregated_are_rejected_by_name_and_the_round_goes_on(task_identity):
    """One hospital's garbage must neither end the run (Flower raises on inconsistent replies) nor reach the
    average (NaN, wrong shapes); the rest are aggregated by Flower's FedAvg as usual."""
    from server.grid import REJECTED, GuardedGrid
    from server.strategies import build_strategy

    good = {"w": np.full((2, 3), 2.0, np.float32), "n": np.array(4, np.int64)}
    garbage = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"not an array")
    bad = {  # node id -> (arrays, num-examples, extra metrics)
        2: ({**good, "w": np.zeros((3, 2), np.float32)}, 10, {}),
        3: ({**good, "w": np.full((2, 3), np.nan, np.float32)}, 10, {}),
        4: ({"w": good["w"]}, 10, {}),
        5: (good, 0, {}),
        6: (good, 10, {"surprise": 1.0}),
        7: ({**good, "w": good["w"].astype(np.int32)}, 10, {}),
        8: ({**good, "w": garbage}, 10, {}),
    }
    why = {2: "shape (3, 2)", 3: "NaN/inf", 4: "missing ['n']", 5: "num-examples must be one positive number",
           6: "differ from the other hospitals'", 7: "is int32", 8: "cannot be decoded"}

    def answer(m):
        arrays, n, extra = bad.get(m.metadata.dst_node_id, (good, 10, {}))
        return Message(RecordDict({"arrays": ArrayRecord({k: v if isinstance(v, Array) else Array(v)
                                                          for k, v in arrays.items()}),
                                   "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, **extra})}),
                       reply_to=m)

    strategy = build_strategy(Settings.build("demo", {"federation.min_train_nodes": 9, "federation.min_available_nodes": 9}))
    grid = GuardedGrid(StandInGrid([1, *bad, 9], answer), min_nodes=1, wait_timeout=5)
    start = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "n": Array(np.array(0, np.int64))})
    msgs = list(strategy.configure_train(1, start, ConfigRecord(), grid))
    kept = grid.send_and_receive(msgs, timeout=5)
    assert sorted(r.metadata.src_node_id for r in kept) == [1, 9]
    rows = {r["node_id"]: r for r in grid.replies}
    assert rows[1]["ok"] and rows[9]["ok"]
    for node, reason in why.items():
        assert not rows[node]["ok"] and rows[node]["error"].startswith(REJECTED) and reason in rows[node]["error"], \
            (node, rows[node].get("error"))
    arrays, _ = strategy.aggregate_train(1, kept)
    np.testing.assert_array_equal(arrays["w"].numpy(), good["w"])

    from common.errors import FedxrayError
    from server.app import _require_updates

    with pytest.raises(FedxrayError, match=r"round 3: the server rejected every hospital's update, the first because "
                                           r"weight 'w' has shape \(3, 2\)"):
        _require_updates(3, [rows[2], rows[3]])


def test_central_dp_uses_the_model_without_running_statistics():
    assert Settings.build("demo", {"central_dp.mode": "server-fixed"}).network.dp_compatible
    assert Settings.build("demo", {"privacy.enabled": True}).network.dp_compatible
    assert not Settings().network.dp_compatible


# ------------------------------------------------------------------------------------------------ wire format
def test_fp16_transfer_halves_float_bytes_and_keeps_int_buffers():
    from common.settings import ModelConfig
    from common.models import build_model

    model = build_model(ModelConfig(arch="smallcnn", weights="none"), 4, 1)
    full, half = state_to_record(model), state_to_record(model, fp16=True)
    assert 0.49 < record_bytes(half) / record_bytes(full) < 0.52
    back = to_fp32(half)
    for k, v in model.state_dict().items():
        got = back[k].numpy()
        if v.is_floating_point():
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, v.numpy(), atol=2e-3, rtol=1e-3)
        else:
            assert got.dtype == v.numpy().dtype and np.array_equal(got, v.numpy())
    assert to_fp32(full) is full and to_fp16(full)["fc.weight"].numpy().dtype == np.float16


# ------------------------------------------------------------------------------------------------ bounded wait
def test_wait_for_nodes_is_bounded_and_names_the_count():
    """Flower's sample_nodes polls for ever; through GuardedGrid it fails with how many nodes connected."""
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    from server.grid import GuardedGrid, NotEnoughNodes

    class OneNode:
        def get_node_ids(self):
            return [42]

    t0 = time.monotonic()
    with pytest.raises(NotEnoughNodes, match="only 1 of the 3 SuperNodes"):
        sample_nodes(GuardedGrid(OneNode(), min_nodes=3, wait_timeout=0.5), 3, 3)
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------------------------------------ checkpoint
def test_checkpoint_resume_rules(tmp_path):
    from server.checkpoint import Checkpoint, RunState

    ck = Checkpoint(tmp_path)
    arrays = {"w": np.arange(4, dtype=np.float32), "bn.num_batches_tracked": np.array(7, np.int64)}
    for r in (1, 2):
        st = RunState(fingerprint="abc", rounds_done=r, history=[{"round": r}], best_round=r)
        ck.save(st, {**arrays, "w": arrays["w"] + r}, arrays, {"m_t/w": arrays["w"] * 0}, best_changed=True)
    assert sorted(p.name for p in ck.dir.iterdir()) == ["best-r0002.safetensors", "global-r0002.safetensors",
                                                        "state.json", "strategy-r0002.safetensors"]
    state, glob, best, strat = ck.load("abc", num_rounds=5)
    assert state.rounds_done == 2 and np.array_equal(glob["w"], arrays["w"] + 2) and "m_t/w" in strat
    assert glob["bn.num_batches_tracked"].shape == () == best["bn.num_batches_tracked"].shape   # 0-d stays 0-d
    assert ck.load("abc", num_rounds=2) is None     # finished: a rerun starts fresh
    assert ck.load("other", num_rounds=5) is None   # other settings: start fresh



@pytest.mark.parametrize("select_on,kept", [("val-f1", 1), ("val-auc", 2), ("val-loss", 3)])
def test_server_keeps_the_round_its_selection_rule_ranks_best_across_a_restart(tmp_path, select_on, kept):
    """The ServerApp's best round follows `train.select_on` (the same `selection_key` as centralised `fit`), and
    a resumed server keeps comparing against the best round from before the restart."""
    from server.app import RoundKeeper
    from server.checkpoint import Checkpoint, RunState
    from server.evaluation import GlobalEval

    def ev(g, f1, auc, loss):
        m = {"macro": {"f1": f1, "auc": auc}, "loss": loss}
        return GlobalEval(round=g, thresholds=np.array([0.5]), val=m, test=m)

    def keeper(state):
        k = RoundKeeper.__new__(RoundKeeper)
        k.s, k.state, k.best_arrays = Settings.build("demo", {"train.select_on": select_on}), state, None
        return k

    arrays = {"w": np.zeros(2, np.float32)}
    k = keeper(RunState(fingerprint="abc"))
    for g, figures in enumerate([(0.9, 0.80, 0.50), (0.8, 0.95, 0.40), (0.7, 0.85, 0.30)], start=1):
        k._update_best(ev(g, *figures), ArrayRecord({"w": Array(arrays["w"] + g)}))
        k.state.rounds_done = g
    assert k.state.best_round == kept and k.best_arrays["w"][0] == kept
    Checkpoint(tmp_path).save(k.state, arrays, k.best_arrays, {}, best_changed=True)
    resumed = keeper(Checkpoint(tmp_path).load("abc", num_rounds=5)[0])
    resumed._update_best(ev(4, 0.6, 0.70, 0.60), ArrayRecord({"w": Array(arrays["w"] + 4)}))   # worse on every rule
    assert resumed.state.best_round == kept


# ------------------------------------------------------------------------------------------------ client
def test_node_data_resolution(synth_root, tmp_path):
    from client.data import resolve_source
    from common.errors import DataError

    s = Settings.build("demo", {"data.path": str(synth_root)})
    src = resolve_source({"partition-id": 1, "num-partitions": 3}, s)
    assert Path(src.path).name == "hospital_2" and src.partition_id is None
    with pytest.raises(DataError, match="partition-id 3 has no site folder"):
        resolve_source({"partition-id": 3, "num-partitions": 4}, s)
    dep = resolve_source({"data-path": str(synth_root / "hospital_3")}, s)
    assert dep.site == "hospital_3"
    one = resolve_source({"partition-id": 0, "num-partitions": 2}, Settings.build("demo", {"data.path": str(synth_root / "hospital_1")}))
    assert one.partition_id == 0 and one.site == "partition-0"
    with pytest.raises(DataError, match="no data"):
        resolve_source({}, s)


def test_node_data_cache_reuses_and_is_bounded(synth_root, monkeypatch):
    import client.data as node_data

    monkeypatch.setattr(node_data, "CACHE_ENTRIES", 2)
    node_data.clear_cache()
    s = Settings.build("demo", {"data.path": str(synth_root), "preprocess.image_size": 16})
    first = node_data.load_node_data({"partition-id": 0, "num-partitions": 3}, s)
    assert node_data.load_node_data({"partition-id": 0, "num-partitions": 3}, s) is first   # reused
    for pid in (1, 2):
        node_data.load_node_data({"partition-id": pid, "num-partitions": 3}, s)
    assert len(node_data._CACHE) == 2                                                         # oldest dropped
    assert node_data.load_node_data({"partition-id": 0, "num-partitions": 3}, s) is not first
    node_data.clear_cache()


def test_client_train_reply_has_weights_and_only_aggregate_metrics(synth_root, task_identity):
    from client.app import evaluate_local, train
    from client.data import load_node_data
    from common.models import build_model
    from common.settings import ModelConfig

    settings = Settings.build("demo", {"data.path": str(synth_root)}, TINY)
    run_config = settings.to_run_config()
    model = build_model(ModelConfig(arch="smallcnn", weights="none"), 4, 1)
    findings = ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]
    msg = Message(RecordDict({"arrays": state_to_record(model), "config": ConfigRecord(
        {"server-round": 1, "findings": findings, "fp16": True})}), dst_node_id=3, message_type=MessageType.TRAIN)
    ctx = Context(run_id=7, node_id=3, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config=run_config)
    reply = train(msg, ctx)
    assert set(reply.content.keys()) == {"arrays", "metrics", "node"}
    assert set(reply.content["metrics"]) == {"num-examples", "train-loss", "local-steps", "val-auc", "val-f1",
                                             "seconds"}
    assert dict(reply.content["node"]) == {"site": "hospital_1"}
    assert reply.content["arrays"]["fc.weight"].numpy().dtype == np.float16
    assert reply.content["metrics"]["num-examples"] > 0
    ev_msg = Message(RecordDict({"arrays": state_to_record(model), "config": ConfigRecord({"findings": findings})}),
                     dst_node_id=3, message_type=MessageType.EVALUATE)
    ev = evaluate_local(ev_msg, ctx)
    # federation.local_split=train-val (the default): the global model on the hospital's validation share
    assert "arrays" not in ev.content and {"val-auc", "val-f1", "num-examples"} <= set(ev.content["metrics"])
    assert ev.content["metrics"]["num-examples"] == len(load_node_data(ctx.node_config, settings).datasets["val"])
    settings = Settings.from_run_config(run_config, {"federation.local_split": "train-val-test"})
    ev = evaluate_local(ev_msg, Context(run_id=7, node_id=3, node_config=ctx.node_config, state=RecordDict(),
                                        run_config=settings.to_run_config()))
    assert {"test-auc", "test-f1", "num-examples"} <= set(ev.content["metrics"])
    assert ev.content["metrics"]["num-examples"] == len(load_node_data(ctx.node_config, settings).datasets["test"])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_client_learning_rate_follows_federation_lr_schedule(schedule, synth_root, task_identity, monkeypatch):
    """Round 3 of 4 with 2 local epochs is the run's epochs 4 and 5 of 8 (0-based) on the cosine."""
    import client.app as client_app
    from common.models import build_model
    from common.settings import ModelConfig
    from common.training import cosine_lr

    settings = tiny_settings({"data.path": str(synth_root), "federation.rounds": 4, "federation.local_epochs": 2,
                              "federation.lr_schedule": schedule})
    seen = []
    real = client_app.train_epoch
    monkeypatch.setattr(client_app, "train_epoch", lambda model, loader, optimizer, *a, **k: (
        seen.append(optimizer.param_groups[0]["lr"]), real(model, loader, optimizer, *a, **k))[1])
    model = build_model(ModelConfig(arch="smallcnn", weights="none"), 4, 1)
    msg = Message(RecordDict({"arrays": state_to_record(model), "config": ConfigRecord(
        {"server-round": 3, "findings": ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]})}),
        dst_node_id=3, message_type=MessageType.TRAIN)
    ctx = Context(run_id=7, node_id=3, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config=settings.to_run_config())
    assert not client_app.train(msg, ctx).has_error()
    lr = settings.train.lr
    assert seen == pytest.approx([lr, lr] if schedule == "constant" else [cosine_lr(lr, 4, 8), cosine_lr(lr, 5, 8)])


@pytest.mark.parametrize("mode", ["fresh", "kept"])
def test_hospital_keeps_its_adam_moments_across_rounds_only_when_asked(mode, synth_root, task_identity, monkeypatch):
    """federation.local_optimizer=kept: round 2 starts from round 1's Adam step count and moments, held in the
    node's own state, not in the reply; fresh starts every round at step 0 and keeps nothing."""
    import client.app as client_app
    from client import optimizer_state
    from common.models import build_model
    from common.settings import ModelConfig

    settings = tiny_settings({"data.path": str(synth_root), "federation.rounds": 2, "federation.local_epochs": 1,
                              "federation.local_optimizer": mode})
    first_steps = []
    real = client_app.train_epoch

    def spy(model, loader, optimizer, *a, **k):
        st = optimizer.state_dict()["state"]
        first_steps.append(int(st[0]["step"]) if st else 0)
        return real(model, loader, optimizer, *a, **k)

    monkeypatch.setattr(client_app, "train_epoch", spy)
    findings = ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]
    model = build_model(ModelConfig(arch="smallcnn", weights="none"), 4, 1)
    ctx = Context(run_id=7, node_id=3, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config=settings.to_run_config())
    replies = []
    for rnd in (1, 2):
        msg = Message(RecordDict({"arrays": state_to_record(model), "config": ConfigRecord(
            {"server-round": rnd, "findings": findings})}), dst_node_id=3, message_type=MessageType.TRAIN)
        replies.append(client_app.train(msg, ctx))
        assert not replies[-1].has_error()
    steps = int(replies[0].content["metrics"]["local-steps"])
    assert steps > 0
    assert set(replies[1].content.keys()) == {"arrays", "metrics", "node"}   # the moments never travel
    if mode == "fresh":
        assert first_steps == [0, 0] and optimizer_state.TENSORS not in ctx.state.array_records
        return
    assert first_steps == [0, steps]
    kept = ctx.state.array_records[optimizer_state.TENSORS]
    assert ctx.state.config_records[optimizer_state.SCALARS]["0.step"] == 2 * steps
    params = [p for p in model.parameters() if p.requires_grad]
    assert tuple(kept["0.exp_avg"].shape) == tuple(params[0].shape)

    # another model on the same node (a new trainable set): the kept moments are dropped, not misloaded
    other = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    assert not optimizer_state.restore(other, ctx.state)
    assert optimizer_state.TENSORS not in ctx.state.array_records and optimizer_state.SCALARS not in ctx.state.config_records
    assert not other.state_dict()["state"]


# docker-compose.yml: tests/test_compose.py


# ------------------------------------------------------------------------------------------------ runtimes
def _tiny_run(out: Path, **more) -> dict:
    return {**TINY, "federation.rounds": 2, "output_dir": str(out), "federation.node_wait_timeout": 60.0,
            "federation.round_timeout": 300.0, **more}


def _check_result(out: Path, rounds: int, hospitals: int, evaluated: bool = True) -> dict:
    from common.bundle import load_bundle

    summary = json.loads((out / "federation.json").read_text())
    assert [h["round"] for h in summary["history"]] == list(range(rounds + 1))
    fed = summary["provenance"]["federation"]
    assert fed["rounds_completed"] == rounds and len(fed["nodes"]) == hospitals
    assert all(n > 0 for n in fed["examples_per_node"].values())
    for h in summary["history"][1:]:
        assert len([c for c in h["clients"]["train"] if c["ok"]]) == hospitals
        assert len(h["clients"]["evaluate"]) == (hospitals if evaluated else 0) and h["bytes_per_client"]["up"] > 0
    bundle = load_bundle(out / "bundle")
    card = bundle.card
    assert card["provenance"]["training"] == "federated"
    assert card["provenance"]["federation"]["best_round"] == summary["best_round"] >= 1
    # it learned: on these hospitals (tiny settings) the initial model's validation AUC measured 0.44-0.45 and
    # the selected round's 0.76-0.83 after 1-2 rounds (test 0.73-0.83), seeds 42 and 7
    val_auc = {h["round"]: h["global"]["val"]["auc"] for h in summary["history"]}
    assert val_auc[summary["best_round"]] >= val_auc[0] + 0.15, val_auc
    assert card["metrics"]["test"]["macro"]["auc"] >= 0.65, card["metrics"]["test"]["macro"]
    # calibration reaches federation.json, the history rows and the card (all the server's compute_metrics dicts)
    for split in ("test", "validation"):
        ece = summary[split]["macro"]["ece"]
        assert ece is not None and 0 < ece < 1 and card["metrics"][split]["macro"]["ece"] == ece, split
    assert card["metrics"]["test"]["headline"]["ece"] == summary["test"]["macro"]["ece"]
    assert all(h["global"]["val"]["ece"] is not None for h in summary["history"])
    assert summary["table"].splitlines()[1].split()[-1] == "ECE"
    _assert_exported_calibrated(out, summary, bundle)
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    return summary


def _assert_exported_calibrated(out: Path, summary: dict, bundle) -> None:
    """The bundle holds the kept round Platt-scaled on the server's validation split (train.calibration's
    default): its head is the checkpoint's best round times the recorded scale plus the shift, and the ranking,
    so the test AUC, is the kept round's."""
    from safetensors.numpy import load_file

    from common.models import classifier_head

    cal = bundle.card["provenance"]["calibration"]
    assert cal["method"] == "platt" and cal["val_nll"]["after"] <= cal["val_nll"]["before"], cal
    a, b = np.array(list(cal["scale"].values())), np.array(list(cal["shift"].values()))
    best = load_file(out / "checkpoint" / f"best-r{summary['best_round']:04d}.safetensors")
    head = classifier_head(bundle.model)
    name = next(n for n, p in bundle.model.named_parameters() if p is head.weight).rsplit(".", 1)[0]
    assert head.weight.detach().numpy() == pytest.approx(best[name + ".weight"] * a[:, None], rel=1e-3, abs=1e-6)
    assert head.bias.detach().numpy() == pytest.approx(best[name + ".bias"] * a + b, rel=1e-3, abs=1e-5)
    kept = next(h for h in summary["history"] if h["round"] == summary["best_round"])["global"]["test"]["auc"]
    assert summary["test"]["macro"]["auc"] == pytest.approx(kept, abs=1e-6)


@pytest.fixture
def flower_tmp(tmp_path_factory):
    """A private folder for Flower/Ray state (the session fixture checks no process naming it survives)."""
    return tmp_path_factory.mktemp("flower")


@pytest.mark.slow
@pytest.mark.integration
def test_simulation_inprocess_then_resume(synth_root, flower_tmp):
    """`fedxray federate` (run_simulation in-process, Ray on 2 CPUs), then a restart that resumes."""
    from server.launch import flower_env

    out = flower_tmp / "out"
    ray_tmp = Path("/tmp") / f"rayfx{os.getpid()}"
    env = flower_env(flower_tmp / "home", ray_tmp)
    sets = [f"--set={k}={v}" for k, v in _tiny_run(out).items() if k not in ("federation.rounds", "output_dir")]
    cmd = ["-m", "fedxray", "federate", "--profile", "demo", "--data", str(synth_root), "--out", str(out), "--supernodes", "3"]
    try:
        first = run_cli([*cmd, "--rounds", "2", *sets], env, 600)
        assert first.returncode == 0, first.stdout[-3000:]
        assert first.stdout.count("all-positive baseline") == 1 and "seed paper" not in first.stdout   # once
        assert "bundle:" in first.stdout
        _check_result(out, 2, 3)
        second = run_cli([*cmd, "--rounds", "3", *sets], env, 600)
        assert second.returncode == 0, second.stdout[-3000:]
        assert "resuming from" in second.stdout and "2 of 3 rounds done" in second.stdout
        summary = _check_result(out, 3, 3)
        assert len(summary["provenance"]["federation"]["run_ids"]) == 2
        _assert_federate_tracked(out, summary)
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


def _assert_federate_tracked(out: Path, summary: dict) -> None:
    """Each `fedxray federate` is one MLflow run (server/tracking.py, when MLflow is installed): the resumed
    one holds every round's global metrics as federation.json has them, its tags name both Flower runs, and its
    bundle artifact is the bundle (the weights the card's sha256 names)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return   # tests/test_tracking.py: runs without MLflow
    from common.bundle import CARD_FILE, WEIGHTS_FILE, sha256_file
    from common.tracking import EXPERIMENT, local_store_uri

    client = MlflowClient(tracking_uri=local_store_uri(out))
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], order_by=["start_time"])
    assert [r.data.tags["fedxray.kind"] for r in runs] == ["federate", "federate"]
    last = runs[-1]
    for metric, split, key in (("val_auc", "val", "auc"), ("val_f1", "val", "f1"), ("test_auc", "test", "auc")):
        logged = {m.step: m.value for m in client.get_metric_history(last.info.run_id, metric)}
        assert logged == {h["round"]: pytest.approx(h["global"][split][key]) for h in summary["history"]}, metric
    assert {m.step: m.value for m in client.get_metric_history(last.info.run_id, "hospitals_trained")} == {
        1: 3.0, 2: 3.0, 3: 3.0}
    assert last.data.tags["flower.run_id"] == ",".join(map(str, summary["provenance"]["federation"]["run_ids"]))
    assert last.data.tags["fedxray.best_round"] == str(summary["best_round"])
    assert last.data.params["federation.rounds"] == "3"
    names = {Path(a.path).name for a in client.list_artifacts(last.info.run_id, "bundle")}
    assert names == {CARD_FILE, WEIGHTS_FILE}, names
    weights = Path(client.download_artifacts(last.info.run_id, f"bundle/{WEIGHTS_FILE}"))
    assert sha256_file(weights) == json.loads((out / "bundle" / CARD_FILE).read_text())["weights"]["sha256"]


@pytest.mark.slow
@pytest.mark.integration
def test_simulation_runtime_flwr_run(synth_root, flower_tmp):
    """`flwr run . --stream` on the managed local simulation SuperLink (private ports), which is stopped after."""
    from server.launch import run_flwr_simulation
    from server.processes import pids_with_arg

    out = flower_tmp / "out"
    outcome = run_flwr_simulation(tiny_settings({**_tiny_run(out), "data.path": str(synth_root), "federation.min_available_nodes": 3}),
                                  num_supernodes=3, workdir=flower_tmp / "work", timeout=600)
    assert outcome.returncode == 0 and outcome.ok, outcome.log.read_text()[-3000:]
    _check_result(out, 2, 3)
    assert not pids_with_arg(str(flower_tmp / "work" / "flwr-home")), "local SuperLink still running"


@pytest.mark.slow
@pytest.mark.integration
def test_launch_resumes_after_the_superlink_is_killed_with_the_same_command(synth_root, flower_tmp):
    """`fedxray launch` on the deployment runtime - TLS, SuperNode authentication, a signed app, float16
    weights on the wire, a --workdir that does not exist yet - streams one progress line per round. The SuperLink
    is killed after round 1: the launcher ends at once, says so, and status.json says failed with the cause.
    The same command again resumes from the checkpoint (keys re-registered on the restarted SuperLink): every
    round 0-2 exactly once, in two Flower runs. A process that merely names the work folder is not ours and is
    left alone."""
    import signal
    import threading

    from benchmarks.sections.deployment import STARTUP
    from common.models import build_model
    from common.settings import ModelConfig
    from server.certs import make_signing_key
    from server.launch import flower_env
    from server.processes import pids_with_arg, stop_tree

    out, work, certs = flower_tmp / "out", flower_tmp / "not" / "there" / "yet", flower_tmp / "certs"
    key, _ = make_signing_key(certs)
    args = ["-m", "fedxray", "launch", "--profile", "demo", "--data", str(synth_root), "--out", str(out), "--rounds", "2", "--workdir",
            str(work), "--certs", str(certs), "--supernode-auth", "--sign-with", str(key), "--timeout", "500",
            *[f"--set={k}={json.dumps(v)}" for k, v in TINY.items()], "--set=federation.fp16=true",
            "--set=federation.node_wait_timeout=60.0", "--set=federation.fraction_evaluate=0.0", "--set=federation.min_evaluate_nodes=0"]
    env = flower_env(flower_tmp / "home")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)", str(work)])
    try:
        first = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
        reader.start()
        status = out / "status.json"
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and first.poll() is None:   # the progress line, as an operator sees it
            if "round 1/2 | 3 of 3 hospitals trained" in "".join(lines):
                break
            time.sleep(0.5)
        links = pids_with_arg(str(work / "superlink" / "state.db"), zombies=False)
        assert links and first.poll() is None, "".join(lines)[-3000:]
        killed_at = time.monotonic()
        for pid in links:
            os.kill(pid, signal.SIGKILL)
        first.wait(timeout=120)
        reader.join(timeout=10)
        text = "".join(lines)
        assert first.returncode == 2 and time.monotonic() - killed_at < 100, text[-3000:]
        assert "round 1/2 | 3 of 3 hospitals trained" in text and "round 2/2" not in text
        assert "the SuperLink exited" in text and "rerun the same command to resume" in text, text[-2000:]
        failed = json.loads(status.read_text())
        assert failed["state"] == "failed" and "the SuperLink exited" in failed["message"], failed

        second = run_cli(args, env, 500)
        assert second.returncode == 0, second.stdout[-3000:]
        assert "round 2/2 | 3 of 3 hospitals trained" in second.stdout and "round 1/2" not in second.stdout
    finally:
        stop_tree(first.pid, grace=5)
        alive = bystander.poll() is None
        bystander.kill()
    assert alive, "the launcher stopped a process that only named its work folder"
    summary = _check_result(out, 2, 3, evaluated=False)   # hospitals' own evaluation: elsewhere
    fed = summary["provenance"]["federation"]
    assert len(fed["run_ids"]) == 2 and fed["runtime"] != "InMemoryGrid" and fed["fp16_transfer"] is True
    assert set(fed["nodes"]) == {"hospital_1", "hospital_2", "hospital_3"}
    fp32 = record_bytes(state_to_record(build_model(ModelConfig(arch="smallcnn", weights="none"), 4, 1)))
    per_client = summary["history"][2]["bytes_per_client"]
    assert per_client["down"] < 0.55 * fp32 and per_client["up"] < 0.55 * fp32
    assert not pids_with_arg(str(work / "superlink")), "launcher left processes running"
    for k in (1, 2, 3):   # every task started warm (fedxray/warm_exec.py) and read the node's prepared images
        assert STARTUP.search((work / "logs" / f"superexec-hospital_{k}.log").read_text())
        assert any((work / "supernodes" / f"hospital_{k}" / "fedxray-cache").iterdir())
