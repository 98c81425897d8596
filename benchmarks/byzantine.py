"""One hostile hospital among five: attack x strategy -> macro test AUC, and what the guards cost honest runs.

    .venv/bin/python benchmarks/byzantine.py [--rounds 6] [--image-size 32] [--patients 60]
        [--attacks none,scaled,...] [--columns fedavg+guards,...] [--dirichlet] [--out benchmarks/results]

Every cell is a whole federated run on Flower's simulation runtime (`flwr.simulation.run_simulation`, Ray,
1 CPU per ClientApp) with the product's ServerApp (`server.app.make_server_app`: GuardedGrid, the guards,
Flower's strategy, the server's held-out evaluation and best-round selection) and the product's ClientApp
(`client.app.make_client_app`: its data loading, preprocessing and training), on 5 synthetic hospitals
(`common.data.synthetic.synthesize`). Each cell runs in a fresh interpreter.

The attacker is partition 4 (hospital_5): the product's ClientApp inside a ClientApp whose Flower mod
(`attack_mod`, defined here and nowhere in the product) changes what leaves that hospital:
  scaled        every float array of its reply x 1000
  sign-flipped  its update reversed: w_global - (w - w_global)
  nan           one weight array all NaN
  inflated      num-examples = 1e9
  label-flipped no mod: the hospital's own CSV lists the complement of each image's findings (a poisoned copy
                of hospital_5's labels), so it trains honestly on wrong labels
Columns: the product's default (FedAvg + guards), FedAvg with every guard off, FedAvg + the opt-in
direction check (guards.min_cosine=0), and Flower's FedMedian, FedTrimmedAvg (beta 0.2) and Krum
(federation.krum_malicious_nodes=1), each with the default guards. AUC is the test macro AUC of the model the product
ships (the best round on the server's validation split); the delta is against the same column's honest run
(same seeds, so the difference is the attack's). Goal (issue 10): <= 0.02 AUC loss with the default guards.

--dirichlet adds honest runs on PneumoniaMNIST (../shared/data, skipped when absent) cut into 5 hospitals by
Dirichlet alpha 0.3: replies the guards rejected or capped when every hospital was honest.
Results: <out>/byzantine.json (rewritten after every cell; a rerun with the same settings skips done cells).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import REPO, SHARED_DATA, run_worker, table  # noqa: E402

HOSPITALS, ATTACKER = 5, 4          # partition 4 = hospital_5
ATTACKS = ("none", "scaled", "sign-flipped", "nan", "label-flipped", "inflated")
NO_GUARDS = {"guards.examples_ratio": 0.0, "guards.examples_growth": 0.0, "guards.norm_ratio": 0.0,
             "guards.min_cosine": -1.0}
COLUMNS = {
    "fedavg+guards": {"federation.strategy": "fedavg"},
    "fedavg no guards": {"federation.strategy": "fedavg", **NO_GUARDS},
    "fedavg+guards+direction": {"federation.strategy": "fedavg", "guards.min_cosine": 0.0},
    "fedmedian": {"federation.strategy": "fedmedian"},
    "fedtrimmedavg": {"federation.strategy": "fedtrimmedavg", "federation.trimmed_beta": 0.2},
    "krum": {"federation.strategy": "krum", "federation.krum_malicious_nodes": 1},
}
GOAL = 0.02
PNEUMONIAMNIST = SHARED_DATA / "pneumoniamnist.npz"


# ------------------------------------------------------------------------------------------------ the attacker
def attack_mod(attack: str):
    """A Flower mod that corrupts the train reply of partition ATTACKER (every other message passes as is)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, MessageType

    def mod(msg, ctx, call_next):
        if (attack in ("none", "label-flipped") or msg.metadata.message_type != MessageType.TRAIN
                or int(ctx.node_config.get("partition-id", -1)) != ATTACKER):
            return call_next(msg, ctx)
        glob = {k: np.array(a.numpy()) for k, a in msg.content["arrays"].items()}   # before training
        reply = call_next(msg, ctx)
        if reply.has_error():
            return reply
        arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
        floats = [k for k, v in arrays.items() if v.dtype.kind == "f"]
        if attack == "scaled":
            arrays.update({k: arrays[k] * 1000 for k in floats})
        elif attack == "sign-flipped":
            arrays.update({k: (2 * glob[k].astype(arrays[k].dtype) - arrays[k]) for k in floats})
        elif attack == "nan":
            arrays[floats[0]] = np.full_like(arrays[floats[0]], np.nan)
        elif attack == "inflated":
            reply.content["metrics"]["num-examples"] = 10 ** 9
        reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v).reshape(v.shape))
                                               for k, v in arrays.items()})
        return reply

    return mod


def attacked_client_app(product, attack: str):
    """The product's ClientApp, whole (its own mods included), behind the attacker's mod."""
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=[attack_mod(attack)])

    @app.train()
    def _train(msg, ctx):
        return product(msg, ctx)

    @app.evaluate()
    def _evaluate(msg, ctx):
        return product(msg, ctx)

    return app


def label_flipped_copy(root: Path, out: Path) -> Path:
    """`root` with hospital_5's findings complemented in its CSV (images and other hospitals linked, not copied)."""
    from common.data.synthetic import SYNTH_FINDINGS

    if (out / "hospital_5" / "Data_Entry_2017.csv").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for d in root.iterdir():
        if d.name != f"hospital_{ATTACKER + 1}" and not (out / d.name).exists():
            (out / d.name).symlink_to(d.resolve(), target_is_directory=True)
    src, dst = root / f"hospital_{ATTACKER + 1}", out / f"hospital_{ATTACKER + 1}"
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name == "images":
            (dst / "images").symlink_to(f.resolve(), target_is_directory=True)
        elif f.name != "Data_Entry_2017.csv":
            shutil.copy(f, dst / f.name)
    with open(src / "Data_Entry_2017.csv", newline="") as fin, open(dst / "Data_Entry_2017.csv", "w", newline="") as fo:
        rows = list(csv.reader(fin))
        w = csv.writer(fo)
        w.writerow(rows[0])
        for r in rows[1:]:
            have = set(r[1].split("|")) - {"No Finding"}
            r[1] = "|".join(sorted(set(SYNTH_FINDINGS) - have)) or "No Finding"
            w.writerow(r)
    return out


# ------------------------------------------------------------------------------------------------ one cell
def run_config(a, data: Path, out: Path, column: dict) -> dict:
    rc = {"federation.rounds": a.rounds, "federation.min_train_nodes": HOSPITALS, "federation.min_evaluate_nodes": HOSPITALS,
          "federation.min_available_nodes": HOSPITALS, "federation.local_epochs": a.epochs, "preprocess.image_size": a.image_size,
          "model.arch": "smallcnn", "federation.client_threads": 1, "federation.round_timeout": 1800.0, "federation.node_wait_timeout": 300.0,
          "federation.resume": False, "data.path": str(data), "output_dir": str(out), **column}
    if a.dataset == "pneumoniamnist":
        rc.update({"data.source": "medmnist", "federation.server_data_path": str(data), "data.findings": "Pneumonia",
                   "federation.partition_method": "dirichlet", "federation.partition_alpha": 0.3})
    return rc


def worker(a) -> dict:
    """One federated run; prints its row as JSON."""
    from server.federation import FLOWER_ENV, backend_config

    for k, v in {**FLOWER_ENV, "TQDM_DISABLE": "1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_TMPDIR", tempfile.gettempdir())
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    overrides = run_config(a, Path(a.data).resolve(), out, COLUMNS.get(a.column, {}) if a.column else
                           json.loads(a.column_json))
    t0 = time.perf_counter()
    error = None
    try:
        run_simulation(server_app=make_server_app(overrides),
                       client_app=attacked_client_app(make_client_app(overrides), a.attack),
                       num_supernodes=HOSPITALS, backend_config=backend_config(HOSPITALS, a.cpus, 1))
    except BaseException as e:  # noqa: BLE001 - the run's own failure is a result of this cell
        error = f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    status = json.loads((out / "status.json").read_text()) if (out / "status.json").is_file() else {}
    state_file = out / "checkpoint" / "state.json"
    if not state_file.is_file():
        return {"status": "failed", "error": status.get("message") or error or "no checkpoint", "wall_s": wall}
    state = json.loads(state_file.read_text())
    return {"status": status.get("state", "unknown"), "error": status.get("message"), "wall_s": round(wall, 1),
            "rounds_done": state["rounds_done"], "best_round": state["best_round"],
            "test_auc": (state["best_metrics"].get("test") or {}).get("macro", {}).get("auc"),
            "final_test_auc": state["history"][-1]["global"]["test"]["auc"] if state["history"] else None,
            "per_round_test_auc": [h["global"]["test"]["auc"] for h in state["history"]],
            "guards": guard_counts(state["history"])}


def guard_counts(history: list[dict]) -> dict:
    """Per site: train replies rejected (and the first reason), capped, accepted; and the honest extremes."""
    sites: dict[str, dict] = {}
    cosines, ratios = [], []
    for h in history[1:]:
        for r in h.get("clients", {}).get("train", []):
            s = sites.setdefault(r.get("site") or str(r["node_id"]), {"ok": 0, "rejected": 0, "capped": 0})
            g = r.get("guard", {})
            if r["ok"]:
                s["ok"] += 1
            else:
                s["rejected"] += 1
                s.setdefault("reason", (r.get("error") or "")[:160])
            s["capped"] += "capped" in g
            cosines.append((r.get("site"), g.get("update-cosine")))
            ratios.append((r.get("site"), g.get("update-norm-ratio")))
    return {"sites": sites, "cosines": cosines, "norm_ratios": ratios}


# ------------------------------------------------------------------------------------------------ tables
def _attacker(c: dict) -> str:
    s = c.get("guards", {}).get("sites", {}).get(f"hospital_{ATTACKER + 1}")
    return f"{s['rejected']}R/{s['capped']}C" if s else "-"


def _honest_hits(c: dict, attacker: str | None) -> tuple[int, int]:
    sites = {k: v for k, v in c.get("guards", {}).get("sites", {}).items() if k != attacker}
    return sum(v["rejected"] for v in sites.values()), sum(v["capped"] for v in sites.values())


def auc_table(cells: dict, attacks, columns, key: str = "test_auc") -> str:
    rows = []
    for attack in attacks:
        row = [attack]
        for col in columns:
            c, base = cells.get(f"{attack}|{col}"), cells.get(f"none|{col}")
            if not c or c.get(key) is None:
                row.append(c["status"] if c else "-")
                continue
            cell = f"{c[key]:.3f}"
            if attack != "none" and base and base.get(key) is not None:
                cell += f" ({c[key] - base[key]:+.3f})"
            if c["status"] != "done":
                cell += f" [{c['status']} r{c.get('rounds_done')}]"
            row.append(cell)
        rows.append(row)
    return table(["attack \\ strategy", *columns], rows)


def best_round_line(cells: dict, rounds: int) -> str:
    last = [c for c in cells.values() if c.get("best_round") == c.get("rounds_done") == rounds]
    return (f"the shipped (best validation) round was the last one in {len(last)} of {len(cells)} runs; "
            "per-round test AUC of every run: byzantine.json")


def guard_table(cells: dict, attacks, columns) -> str:
    """Attacker's train replies rejected (R) / capped (C), and honest hospitals' (false) rejections / caps."""
    rows = []
    for attack in attacks:
        row = [attack]
        for col in columns:
            c = cells.get(f"{attack}|{col}")
            if not c or "guards" not in c:
                row.append("-")
                continue
            fr, fc = _honest_hits(c, None if attack == "none" else f"hospital_{ATTACKER + 1}")
            row.append(f"{_attacker(c) if attack != 'none' else '-'} | honest {fr}R/{fc}C")
        rows.append(row)
    return table(["attack \\ strategy", *columns], rows)


def goal_line(cells: dict, attacks) -> str:
    worst = []
    for attack in attacks:
        c, base = cells.get(f"{attack}|fedavg+guards"), cells.get("none|fedavg+guards")
        if attack != "none" and c and base and c.get("test_auc") is not None and base.get("test_auc") is not None:
            worst.append((base["test_auc"] - c["test_auc"], attack))
    if not worst:
        return ""
    missed = [f"{att} ({loss:+.3f} loss)" for loss, att in sorted(worst, reverse=True) if loss > GOAL]
    loss, att = max(worst)
    return (f"goal (default FedAvg + guards, <= {GOAL} AUC loss vs honest): "
            + ("MET" if not missed else "MISSED for " + ", ".join(missed))
            + f"; largest AUC loss: {loss:.3f} ({att})")


def dirichlet_table(cells: dict) -> str:
    rows = []
    for col, c in cells.items():
        sites = c.get("guards", {}).get("sites", {})
        cos = [x for _, x in c.get("guards", {}).get("cosines", []) if x is not None]
        rat = [x for _, x in c.get("guards", {}).get("norm_ratios", []) if x is not None]
        rej = {s: v["rejected"] for s, v in sites.items() if v["rejected"]}
        cap = {s: v["capped"] for s, v in sites.items() if v["capped"]}
        rows.append([col, c.get("test_auc"), sum(v["ok"] + v["rejected"] for v in sites.values()),
                     ", ".join(f"{s} {n}" for s, n in rej.items()) or "0",
                     ", ".join(f"{s} {n}" for s, n in cap.items()) or "0",
                     min(cos) if cos else None, max(rat) if rat else None, c.get("wall_s")])
    return table(["honest run", "test AUC", "train replies", "rejected (site rounds)", "capped (site rounds)",
                  "min cosine", "max norm ratio", "wall s"], rows)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patients", type=int, default=60, help="per hospital (1-3 images each)")
    p.add_argument("--holdout-patients", type=int, default=300, help="the server's validation + test set")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--columns", default=",".join(COLUMNS))
    p.add_argument("--dirichlet", action="store_true", help="also honest runs on PneumoniaMNIST, Dirichlet 0.3")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--work", default=None, help="data and run folders (default: a temporary folder)")
    for hidden in ("--worker", "--data", "--attack", "--column", "--column-json", "--dataset"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return

    from common.data.synthetic import synthesize

    attacks, columns = a.attacks.split(","), a.columns.split(",")
    unknown = sorted(set(attacks) - set(ATTACKS)) + sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise SystemExit(f"unknown attacks/columns {unknown}; attacks: {ATTACKS}, columns: {list(COLUMNS)}")
    work = Path(a.work or tempfile.mkdtemp(prefix="fedxray-byz-")).resolve()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"rounds": a.rounds, "epochs": a.epochs, "image_size": a.image_size, "patients": a.patients,
                "holdout_patients": a.holdout_patients, "hospitals": HOSPITALS, "attacker": f"hospital_{ATTACKER + 1}",
                "cpus": a.cpus, "model.arch": "smallcnn"}
    path = out / "byzantine.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    results = saved if saved.get("settings") == settings else {"settings": settings, "cells": {}, "dirichlet": {}}
    data = work / "synth"
    if not (data / "holdout").is_dir():
        print(f"writing {HOSPITALS} synthetic hospitals to {data} ...", flush=True)
        synthesize(data, hospitals=HOSPITALS, patients=a.patients, size=64, seed=3,
                   holdout_patients=a.holdout_patients, progress=False)
    flipped = label_flipped_copy(data, work / "synth-label-flipped")
    common = ["--rounds", str(a.rounds), "--epochs", str(a.epochs), "--image-size", str(a.image_size),
              "--cpus", str(a.cpus)]

    todo = [(att, col) for att in attacks for col in columns if f"{att}|{col}" not in results["cells"]]
    t_all = time.perf_counter()
    for i, (attack, col) in enumerate(todo, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(todo)}] {attack} x {col} ...", end=" ", flush=True)
        root = flipped if attack == "label-flipped" else data
        row = run_worker(__file__, ["1", *common, "--data", str(root), "--attack", attack, "--column", col,
                                    "--dataset", "synth", "--out", str(work / "runs" / f"{attack}-{col}")])
        results["cells"][f"{attack}|{col}"] = row
        path.write_text(json.dumps(results, indent=1))
        auc = row.get("test_auc")
        print(f"{row['status']}, test AUC {auc if auc is None else round(auc, 3)}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    if a.dirichlet:
        if not PNEUMONIAMNIST.is_file():
            print(f"--dirichlet skipped: {PNEUMONIAMNIST} is absent (only in the fedxray workplace's ../shared/data)")
        else:
            honest = {"fedavg+guards": COLUMNS["fedavg+guards"], "fedavg no guards": COLUMNS["fedavg no guards"],
                      "fedavg+guards+direction": COLUMNS["fedavg+guards+direction"]}
            for col, spec in honest.items():
                if col in results["dirichlet"]:
                    continue
                print(f"[dirichlet] honest x {col} ...", end=" ", flush=True)
                row = run_worker(__file__, ["1", *common, "--data", str(PNEUMONIAMNIST), "--attack", "none",
                                            "--column-json", json.dumps(spec), "--dataset", "pneumoniamnist",
                                            "--out", str(work / "runs" / f"dirichlet-{col}")])
                results["dirichlet"][col] = row
                path.write_text(json.dumps(results, indent=1))
                print(f"{row['status']}, test AUC {row.get('test_auc')}, {row['wall_s']} s", flush=True)

    cells = results["cells"]
    walls = [c["wall_s"] for c in cells.values()]
    title = (f"{HOSPITALS} synthetic hospitals, attacker hospital_{ATTACKER + 1}, smallcnn {a.image_size} px, "
             f"{a.rounds} rounds x {a.epochs} local epoch(s); test macro AUC of the shipped model (best validation "
             f"round), (delta vs the column's honest run)")
    text = "\n\n".join(x for x in [
        title, auc_table(cells, attacks, columns), best_round_line(cells, a.rounds),
        "train replies rejected (R) / capped (C): the attacker's | the honest hospitals' (false):\n"
        + guard_table(cells, attacks, columns),
        goal_line(cells, attacks),
        (f"wall: {sum(walls):.0f} s for {len(walls)} runs ({min(walls):.0f}-{max(walls):.0f} s each; this "
         f"invocation {time.perf_counter() - t_all:.0f} s)") if walls else "",
        ("Honest hospitals, PneumoniaMNIST cut by Dirichlet alpha 0.3 into 5 (what the guards do to them):\n"
         + dirichlet_table(results["dirichlet"])) if results["dirichlet"] else "",
    ] if x)
    results["table"] = text
    path.write_text(json.dumps(results, indent=1))
    print("\n" + text + f"\n\nresults: {path}")


if __name__ == "__main__":
    main()
