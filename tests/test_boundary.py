"""The hospital boundary and the site policy, in-process through the real ClientApp (Flower's mods included).

What may leave a hospital is a fixed vocabulary (client/boundary.py); the detail stays in the hospital's log.
The deployment-runtime versions of these checks are in tests/test_hospital_boundary.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from common.settings import Settings
from common.audit import identifying_strings
from common.data.synthetic import break_hospital
from tests.conftest import SYNTH_FINDINGS, StandInGrid
from tests.run_support import TINY



# ------------------------------------------------------------------------------------------ broken hospitals
BREAKS = {"missing-images": "data-missing-images", "bad-header": "data-csv", "unknown-label": "data-labels",
          "missing-folder": "data-not-found", "corrupt-images": "data-too-small"}


def _msg(kind=MessageType.TRAIN, server_round=1, dp=False):
    from common.arrays import state_to_record
    from common.models import build_model

    model = build_model(Settings.build("demo", {"privacy.enabled": dp}).network, len(SYNTH_FINDINGS), 1)   # GroupNorm with DP
    return Message(RecordDict({"arrays": state_to_record(model), "config": ConfigRecord(
        {"server-round": server_round, "findings": SYNTH_FINDINGS})}), dst_node_id=3, message_type=kind)


def _ctx(node_config: dict, run_config: dict, run_id: int = 7) -> Context:
    return Context(run_id=run_id, node_id=3, node_config=node_config, state=RecordDict(), run_config=run_config)


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_a_broken_hospital_replies_a_code_and_keeps_the_detail_in_its_own_log(how, synth_root, tmp_path,
                                                                             task_identity):
    from client.app import make_client_app
    from client.boundary import parse_reply_error

    data = break_hospital(synth_root / "hospital_2", tmp_path / "st-mary-00100077", how)
    secrets_ = identifying_strings(data if how != "missing-folder" else synth_root / "hospital_2") | {str(data)}
    log_file = tmp_path / "node-log" / "fedxray-node.log"
    app = make_client_app()
    ctx = _ctx({"data-path": str(data), "site": "st-mary", "log-file": str(log_file)},
               {**Settings.build("demo", {"data.path": str(synth_root)}).to_run_config(), **TINY})
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = app(_msg(kind), ctx)
        assert reply.has_error()
        text = reply.error.reason
        info = parse_reply_error(text)
        assert info is not None and info["code"] == BREAKS[how] and info["site"] == "st-mary", text
        assert info["type"] == "DataError" and re.fullmatch(r"[0-9a-f]{8}", info["incident"])
        leaked = [s for s in secrets_ if s in text]
        assert not leaked, (leaked, text)
        local = log_file.read_text()
        assert f"incident {info['incident']}" in local and "Traceback" in local
    assert oct(log_file.stat().st_mode & 0o777) == "0o600"
    if how == "missing-images":   # the hospital's own log says exactly which files and lines
        assert "Data_Entry_2017.csv:6" in local and "missing on disk" in local


def test_any_exception_and_any_text_that_would_leak_become_internal(synth_root, task_identity):
    from flwr.app import Error

    from client.boundary import make_boundary_mod, parse_reply_error

    ctx = _ctx({"partition-id": 0, "num-partitions": 3}, Settings.build("demo", {"data.path": str(synth_root)}).to_run_config())
    mod = make_boundary_mod()

    def boom(m, c):
        raise KeyError("/data/hospital/00012345_000.png")

    reply = mod(_msg(), ctx, boom)
    info = parse_reply_error(reply.error.reason)
    assert info["code"] == "internal" and info["type"] == "KeyError" and info["site"] == "hospital_1"
    assert "00012345" not in reply.error.reason
    chatty = mod(_msg(), ctx, lambda m, c: Message(Error(2, "<class 'ValueError'>:<'00012345_000.png'>"),
                                                   reply_to=m))
    assert parse_reply_error(chatty.error.reason)["type"] == "ReplyWithheld"
    note = mod(_msg(), ctx, lambda m, c: Message(RecordDict({"node": ConfigRecord(
        {"site": "h1", "note": "patient 00012345"})}), reply_to=m))
    assert note.has_error() and "00012345" not in note.error.reason
    ok = mod(_msg(), ctx, lambda m, c: Message(RecordDict({"node": ConfigRecord({"site": "h1"})}), reply_to=m))
    assert not ok.has_error()


def test_an_invalid_run_config_is_named_by_its_keys_only(synth_root, task_identity):
    from client.app import make_client_app
    from client.boundary import parse_reply_error

    ctx = _ctx({"partition-id": 0, "num-partitions": 3},
               {**Settings.build("demo", {"data.path": str(synth_root)}).to_run_config(), "num-server-round": 3, "train.lr": "fast"})
    info = parse_reply_error(make_client_app()(_msg(), ctx).error.reason)
    assert info["code"] == "run-config" and info["type"] == "SettingsError"
    assert info["check"].endswith(": num-server-round, train.lr") and "fast" not in json.dumps(info)


def test_site_names_that_could_identify_are_replaced():
    from client.site import safe_site

    assert safe_site("st-mary") == "st-mary" and safe_site("hospital_3") == "hospital_3"
    for bad in ("00012345", "/data/x", "name with spaces", "a" * 70, ""):
        assert re.fullmatch(r"site-[0-9a-f]{8}", safe_site(bad, "/data/x")), bad


def test_the_server_records_the_vocabulary_and_names_a_silent_node_by_its_site(task_identity):
    """GuardedGrid: a failure reply is described from its code; a node that never replies is named by the site
    it gave before; Flower's raw exception text is not kept."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Error, MetricRecord

    from client.boundary import FAILED, reason
    from server.grid import GuardedGrid

    def answer(m):
        node = m.metadata.dst_node_id
        if node == 1 or nodes.pushes == 1:
            return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2, np.float32))}),
                                       "metrics": MetricRecord({"num-examples": 5}),
                                       "node": ConfigRecord({"site": f"h{node}"})}), reply_to=m)
        if node == 2:
            return Message(Error(FAILED, reason("data-missing-images", site="h2", exc_type="DataError",
                                                incident="abcd0123")), reply_to=m)
        return None          # node 3 went silent after the first round

    nodes = StandInGrid([1, 2, 3], answer)
    grid = GuardedGrid(nodes, min_nodes=1, wait_timeout=5)

    def send():
        msgs = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))})}),
                        dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2, 3)]
        return grid.send_and_receive(msgs, timeout=0.3)

    send()
    grid.drain()
    send()
    rows = {r["node_id"]: r for r in grid.drain()[0]}
    assert rows[1]["ok"] and rows[1]["site"] == "h1"
    assert rows[2]["site"] == "h2" and rows[2]["code"] == "data-missing-images"
    assert "missing on disk" in rows[2]["error"] and "abcd0123" in rows[2]["error"]
    assert rows[3]["site"] == "h3" and rows[3]["code"] == "no-reply"


def test_flowers_raw_exception_text_is_withheld():
    from server.grid import flower_error_text

    assert "00012345" not in flower_error_text(2, "<class 'DataError'>:<'/x/00012345_000.png'>")
    assert "TTL" in flower_error_text(3, "message TTL expired")


# ------------------------------------------------------------------------------------------ site policy
def _policy(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.toml").write_text(text)
    return folder / "policy.toml"


DP_RUN = {"privacy.enabled": True, "privacy.delta": 1e-5, "federation.rounds": 1, "privacy.secure_rng": False}


def _train(synth_root, policy: Path, run_config: dict, run_id: int = 7, **msg):
    from client.app import make_client_app

    rc = {**Settings.build("demo", {"data.path": str(synth_root)}).to_run_config(), **TINY, **run_config}
    ctx = _ctx({"data-path": str(synth_root / "hospital_1"), "site": "h1", "site-policy": str(policy)}, rc, run_id)
    return make_client_app()(_msg(dp=bool(rc["privacy.enabled"]), **msg), ctx)


@pytest.mark.parametrize("rules, run, rule", [
    ("[privacy]\nrequire-dp = true\n", {}, "require-dp"),
    ("[privacy]\nmax-epsilon-total = 5.0\n", {}, "require-dp"),     # an epsilon limit implies DP
    ("[privacy]\nmax-epsilon-per-run = 2.0\n", {**DP_RUN, "privacy.target_epsilon": 4.0}, "max-epsilon-per-run"),
    ("[privacy]\nmax-delta = 1e-6\n", {**DP_RUN, "privacy.target_epsilon": 4.0}, "max-delta"),
    ("[privacy]\nmin-noise-multiplier = 5.0\n", {**DP_RUN, "privacy.target_epsilon": 4.0}, "min-noise-multiplier"),
    ("[privacy]\nmax-clipping-norm = 0.5\n", {**DP_RUN, "privacy.target_epsilon": 4.0}, "max-clipping-norm"),
    ("[training]\nmin-train-examples = 100000\n", {}, "min-train-examples"),
    ("[aggregation]\nrequire-secure-aggregation = true\n", {}, "require-secure-aggregation"),
])
def test_a_run_that_asks_for_less_than_the_site_policy_is_refused_by_rule(rules, run, rule, synth_root, tmp_path,
                                                                           task_identity):
    from client.boundary import is_decline, parse_reply_error

    reply = _train(synth_root, _policy(tmp_path, rules), run)
    assert reply.has_error() and is_decline(reply.error.reason), reply.error.reason
    info = parse_reply_error(reply.error.reason)
    assert info["code"] == "policy-refused" and info["detail"]["rule"] == rule and info["site"] == "h1"


def test_an_invalid_policy_refuses_everything(synth_root, tmp_path, task_identity):
    from client.boundary import parse_reply_error

    reply = _train(synth_root, _policy(tmp_path, "[privacy]\nrequire-dpp = true\n"), {})
    assert parse_reply_error(reply.error.reason)["code"] == "site-policy"
    reply = _train(synth_root, tmp_path / "no-such-policy.toml", {})
    assert parse_reply_error(reply.error.reason)["code"] == "site-policy"


def test_within_policy_it_trains_the_ledger_carries_across_runs_and_only_allowed_metrics_leave(
        synth_root, tmp_path, task_identity):
    import math

    from client.boundary import parse_reply_error

    policy = _policy(tmp_path / "site", '[privacy]\nrequire-dp = true\nmax-epsilon-per-run = 2.5\n'
                                        'max-epsilon-total = 2.3\nledger = "ledger/privacy.json"\n'
                                        '[disclosure]\nmetrics = ["train-loss", "dp-epsilon"]\n')
    first = _train(synth_root, policy, {**DP_RUN, "privacy.target_epsilon": 2.0}, run_id=11)
    assert not first.has_error(), first.error.reason
    m = first.content["metrics"]
    assert m["num-examples"] > 0 and m["train-loss"] > 0 and 0 < m["dp-epsilon"] <= 2.0 * 1.02
    assert math.isnan(m["val-auc"]) and math.isnan(m["seconds"])       # not allowed by the policy: NaN
    ledger_file = tmp_path / "site" / "ledger" / "privacy.json"
    ledger = json.loads(ledger_file.read_text())
    assert list(ledger["runs"]) == ["11"] and ledger["runs"]["11"]["rounds"] == [1]
    assert ledger["total_epsilon"] == pytest.approx(m["dp-epsilon"], rel=0.05)
    assert oct(ledger_file.stat().st_mode & 0o777) == "0o600"
    # a second run of the same size would fit its own per-run limit, but not the hospital's total
    second = _train(synth_root, policy, {**DP_RUN, "privacy.target_epsilon": 2.0, "train.seed": 43}, run_id=12)
    info = parse_reply_error(second.error.reason)
    assert info["code"] == "policy-refused" and info["detail"]["rule"] == "max-epsilon-total"
    assert info["detail"]["asked"] > 2.3 and info["detail"]["limit"] == 2.3
    assert list(json.loads(ledger_file.read_text())["runs"]) == ["11"]      # refused: nothing spent


# ------------------------------------------------------------------------------------------ private files
def test_what_fedxray_writes_is_owner_only(tmp_path):
    """Partitions (patient ids), checkpoints, status files, ledgers: 0600, whoever's umask."""
    import os

    import numpy as np

    from server.app import write_status
    from server.checkpoint import Checkpoint, RunState
    from simulations.store import ResultStore, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "partitions" / "iid.json", {"hospital_1": ["00012345"]})
        ResultStore(tmp_path).save("iid", "federated", {"status": "done"}, {"y": np.zeros(3)})
        Checkpoint(tmp_path).save(RunState(fingerprint="f", rounds_done=1), {"w": np.zeros(2, np.float32)},
                                  {"w": np.zeros(2, np.float32)}, {}, best_changed=True)
        write_status(tmp_path, "running")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 7
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}, [(p.name, oct(p.stat().st_mode)) for p in files]
