"""Bytes on the wire per client per round, float32 vs float16, and the AUC change float16 causes.

- A tiny federation on Flower's simulation runtime (`server.federation.run_federated_simulation`: 3 synthetic
  hospitals, smallcnn, the demo profile made small) once with `federation.fp16=false` and once with `true`,
  each in a fresh interpreter: the server's own byte counts of what it sent and what the ClientApps replied
  (federation.json, `bytes_per_client_per_round`) and the test AUC of the selected round. Same seeds, so the
  two runs differ only by what the wire does to the weights.
- The float16 round trip alone: the float32 run's exported model evaluated by the server's evaluator
  (`server.evaluation.GlobalEvaluator`) before and after `to_fp16`/`to_fp32`.
- The reply of each architecture (`common.arrays.state_to_record`, what `client.app.train` sends) in both.
- bfloat16 is not on the wire: Flower's Array serialises through numpy's .npy format, which has no bfloat16;
  carrying its 16-bit words as integers would make `Array.numpy()` return integers that Flower's client mods
  (central-DP clipping, SecAgg+ quantisation) would process as numbers. Its bytes would equal float16's.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from benchmarks.sections._federation import fresh, small_settings
from benchmarks.suite import Row


def _settings(data: str, out: str, fp16: bool, rounds: int):
    return small_settings(data, out, rounds, {"federation.fp16": fp16})


def sim_worker(data: str, out: str, fp16: bool, rounds: int) -> dict:
    """One federated simulation in this fresh process; the server's byte counts and the selected round's AUC."""
    from server.federation import run_federated_simulation

    summary = run_federated_simulation(_settings(data, out, fp16, rounds), num_supernodes=3)
    fed = summary["provenance"]["federation"] if "federation" in summary.get("provenance", {}) else summary
    result = {"bytes": fed.get("bytes_per_client_per_round") or summary["history"][-1]["bytes_per_client"],
              "test_auc": summary["test"]["macro"]["auc"], "best_round": summary["best_round"]}
    if not fp16:   # the float16 round trip alone, on this run's exported model, by the server's evaluator
        from common.arrays import load_record, state_to_record, to_fp16, to_fp32
        from common.bundle import load_bundle
        from server.evaluation import GlobalEvaluator

        b = load_bundle(Path(out) / "bundle")
        ev = GlobalEvaluator(_settings(data, out, fp16, rounds))
        full = ev(0, state_to_record(b.model)).test["macro"]["auc"]
        load_record(b.model, to_fp32(to_fp16(state_to_record(b.model))))
        result["roundtrip_auc"] = {"float32": full, "float16": ev(0, state_to_record(b.model)).test["macro"]["auc"]}
    return result


def _sim(data: Path, out: Path, fp16: bool, rounds: int) -> dict:
    return fresh("benchmarks.sections.wire", str(data), str(out), "fp16" if fp16 else "fp32", str(rounds),
                 what=f"fp16={fp16}")


def client_round(data: Path, out: Path) -> dict:
    """--quick: one ClientApp round in this process (client.app.train, no runtime), float32 and float16 replies
    from the same training; bytes from the messages, AUC of each reply by the server's evaluator."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import train
    from common.arrays import record_bytes, state_to_record, to_fp16, to_fp32
    from common.models import build_model
    from server.evaluation import GlobalEvaluator

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1   # as a Flower runtime sets it
    s = _settings(str(data), str(out), False, 1)
    ev = GlobalEvaluator(s)
    findings = ev.findings
    model = build_model(s.network, len(findings), s.preprocess.channels)
    result: dict = {}
    for fp16 in (False, True):
        down = state_to_record(model, fp16=fp16)
        msg = Message(RecordDict({"arrays": down, "config": ConfigRecord(
            {"server-round": 1, "findings": findings, "fp16": fp16})}), dst_node_id=1, message_type=MessageType.TRAIN)
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config=s.to_run_config())
        reply = train(msg, ctx)
        up = reply.content["arrays"]
        result[fp16] = {"bytes": {"up": record_bytes(up), "down": record_bytes(down)},
                        "test_auc": ev(1, to_fp32(up)).test["macro"]["auc"], "best_round": 1}
    result[False]["roundtrip_auc"] = {"float32": result[False]["test_auc"],
                                      "float16": ev(1, to_fp32(to_fp16(up))).test["macro"]["auc"]}
    return result


def reply_bytes(archs: tuple[str, ...]) -> list[Row]:
    """What a ClientApp's reply carries for each architecture, float16 vs float32 (state_to_record)."""
    from common.arrays import record_bytes, state_to_record
    from common.models import build_model
    from common.settings import ModelConfig

    out = []
    for arch in archs:
        m = build_model(ModelConfig(arch=arch, weights="none"), 14, 1 if arch == "smallcnn" else 3)
        full, half = record_bytes(state_to_record(m)), record_bytes(state_to_record(m, fp16=True))
        out.append(Row(what=f"reply bytes, {arch} (14 findings), float16 wire", ours=half / 2**20, unit="MiB",
                       reference=full / 2**20, reference_what="float32", goal_max=0.55,
                       detail={"bytes_fp16": half, "bytes_fp32": full}))
    return out


def rows(quick: bool) -> list[Row]:
    from common.data.synthetic import synthesize

    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="fedxray-bench-wire-") as tmp:
        data = Path(tmp) / "data"
        synthesize(data, hospitals=3, patients=12 if quick else 40, size=64, seed=2, progress=False)
        if quick:   # no runtime start-up (Ray takes ~30 s here): one ClientApp round in this process
            runs = client_round(data, Path(tmp) / "quick")
        else:
            runs = {fp16: _sim(data, Path(tmp) / ("fp16" if fp16 else "fp32"), fp16, rounds) for fp16 in (False, True)}
    b32, b16 = runs[False]["bytes"], runs[True]["bytes"]
    what = ("one ClientApp round in-process (--quick)" if quick
            else f"simulation, 3 hospitals, smallcnn 32 px, {rounds} rounds")
    out = [Row(what=f"bytes per client per round, up (reply), float16 wire ({what})", ours=b16["up"], unit="B",
               reference=b32["up"], reference_what="float32 wire", goal_max=0.55),
           Row(what="bytes per client per round, down (global weights), float16 wire", ours=b16["down"], unit="B",
               reference=b32["down"], reference_what="float32 wire", goal_max=0.55),
           Row(what="test macro AUC of the selected round, float16 wire", ours=runs[True]["test_auc"], unit="AUC",
               reference=runs[False]["test_auc"], reference_what="float32 wire", goal_min=0.99,
               note=f"AUC change {runs[True]['test_auc'] - runs[False]['test_auc']:+.4f} (same seeds; the runs "
                    "differ only by the wire)", detail={"runs": {str(k): v for k, v in runs.items()}})]
    rt = runs[False]["roundtrip_auc"]
    out.append(Row(what="test macro AUC, the float32 run's model after a float16 round trip", ours=rt["float16"],
                   unit="AUC", reference=rt["float32"], reference_what="the same model in float32", goal_min=0.999,
                   note=f"AUC change {rt['float16'] - rt['float32']:+.5f} (quantisation alone)"))
    out += reply_bytes(("smallcnn", "resnet18", "resnet50", "densenet121"))   # --quick too: ~3 s, same rows
    out.append(Row(what="bfloat16 wire", ours=None, unit="", note="not supported: Flower's Array is numpy's .npy "
                   "format, which has no bfloat16, and 16-bit words carried as integers would reach Flower's client "
                   "mods (central-DP clipping, SecAgg+) as numbers; its bytes would equal float16's"))
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--sim-worker":
        data, out, arm, rounds = sys.argv[2:6]
        print(json.dumps(sim_worker(data, out, arm == "fp16", int(rounds))))
