"""What Flower costs: R rounds x N hospitals in each runtime vs the same local training in a plain loop.

    .venv/bin/python benchmarks/federation_overhead.py [--rounds 3] [--clients 3] [--patients 60]
        [--image-size 64] [--arch smallcnn] [--epochs 2] [--runtimes plain,sim,sim-fp16,flwr,deploy]

Runtimes, each in a fresh interpreter (peak memory is per configuration):
  plain     one process, no Flower: the same local epochs per hospital one after the other, FedAvg by torch,
            the same client and server evaluations; 1 torch thread like each ClientApp (the baseline)
  plain-mt  the same with torch on every core
  sim       flwr.simulation.run_simulation in-process (Ray, 1 CPU per ClientApp): what `simulations` uses
  sim-fp16  the same with float16 weights on the wire (bytes and the AUC effect)
  flwr      `flwr run .` on Flower's local simulation SuperLink (subprocesses, FAB build and install)
  deploy    flower-superlink + one flower-supernode per hospital + `flwr run` (a process per message)
Printed: wall time (total and per steady-state round) and its ratio to plain, local steps (must match),
test AUC, bytes per client per round, and the peak RSS of every kind of process involved.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import run_worker, table  # noqa: E402
from common.process_memory import PeakMemory  # noqa: E402

ROLES = [("flower-superlink", "superlink"), ("flower-supernode", "supernode"), ("flower-superexec", "superexec"),
         ("flwr-clientapp", "flwr-clientapp"), ("flwr-serverapp", "flwr-serverapp"),
         ("flwr-simulation", "flwr-simulation"), ("bin/flwr ", "flwr CLI"), ("ClientAppActor", "Ray ClientApp actor"),
         ("raylet", "raylet"), ("gcs_server", "Ray GCS"), ("ray", "Ray (other)")]


# ------------------------------------------------------------------------------------------- memory sampling
def _role(proc: psutil.Process) -> str:
    """What kind of process this is, for the peak-memory table."""
    if proc.pid == os.getpid():
        return "benchmark process"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "?"
    return next((name for key, name in ROLES if key in cmd), "other python")


# ------------------------------------------------------------------------------------------- workers
def _run_config(a) -> dict:
    return {"data.path": a.data, "federation.rounds": a.rounds, "federation.local_epochs": a.epochs, "preprocess.image_size": a.image_size,
            "model.arch": a.arch, "output_dir": a.out, "federation.min_available_nodes": a.clients, "federation.min_train_nodes": a.clients,
            "federation.min_evaluate_nodes": a.clients, "federation.resume": False}


def _summary_row(summary: dict, wall: float) -> dict:
    hist = summary["history"]
    steps = sum(int(c["metrics"].get("local-steps", 0)) for h in hist[1:] for c in h["clients"]["train"] if c["ok"])
    return {"wall": wall, "round_seconds": [h["seconds"] for h in hist[1:]], "steps": steps,
            "test_auc": summary["history"][-1]["global"]["test"]["auc"],
            "bytes": hist[-1]["bytes_per_client"]}


def worker_plain(a, threads: int = 1) -> dict:
    """The same work as the federation, in one process, without Flower."""
    import numpy as np
    import torch

    from common.arrays import state_to_record
    from client.data import load_node_data
    from common.settings import Settings
    from common.models import build_model
    from common.training import evaluate, make_criterion, make_loader, make_optimizer, seed_everything, train_epoch
    from server.evaluation import GlobalEvaluator

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    s = Settings.from_run_config({}, {**_run_config(a), "federation.client_threads": threads})
    evaluator = GlobalEvaluator(s)
    findings = evaluator.findings
    cfg = s.experiment(findings=findings)
    nodes = [load_node_data({"partition-id": k, "num-partitions": a.clients}, s, findings) for k in range(a.clients)]
    model = build_model(cfg.model, len(findings), s.preprocess.channels)
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    evaluator(0, state_to_record(model))
    round_seconds, steps = [], 0
    for r in range(1, a.rounds + 1):
        tr = time.perf_counter()
        updates = []
        for k, data in enumerate(nodes):
            model.load_state_dict(glob)
            seed_everything(s.train.seed + 1000 * r + k)
            ds = data.datasets
            crit = make_criterion(cfg.train, ds["train"].labels)
            loader = make_loader(ds["train"], s.train.batch_size, shuffle=True, seed=r, drop_last=True)
            opt = make_optimizer(model, cfg.train)
            for _ in range(s.federation.local_epochs):
                train_epoch(model, loader, opt, crit)
                steps += len(loader)
            evaluate(model, make_loader(ds["val"], 2 * s.train.batch_size, shuffle=False), findings, criterion=crit,
                     tune="f1")
            updates.append((len(ds["train"]), {k2: v.detach().clone() for k2, v in model.state_dict().items()}))
        total = sum(n for n, _ in updates)
        glob = {k: sum(n * sd[k].double() for n, sd in updates) / total for k in glob}
        glob = {k: v.to(model.state_dict()[k].dtype) for k, v in glob.items()}
        model.load_state_dict(glob)
        for data in nodes:  # the clients' federated evaluation
            ds = data.datasets
            val = evaluate(model, make_loader(ds["val"], 2 * s.train.batch_size, shuffle=False), findings, tune="f1")
            thr = np.array([val["per_finding"][f]["threshold"] for f in findings])
            evaluate(model, make_loader(ds["test"], 2 * s.train.batch_size, shuffle=False), findings, thresholds=thr)
        ev = evaluator(r, state_to_record(model))
        round_seconds.append(time.perf_counter() - tr)
    return {"wall": time.perf_counter() - t0, "round_seconds": round_seconds, "steps": steps,
            "test_auc": ev.test["macro"]["auc"], "bytes": None}


def worker_sim(a, fp16: bool = False) -> dict:
    from server.federation import run_federated_simulation

    t0 = time.perf_counter()
    summary = run_federated_simulation({**_run_config(a), "federation.fp16": fp16}, num_supernodes=a.clients)
    return _summary_row(summary, time.perf_counter() - t0)


def worker_flwr(a) -> dict:
    from server.launch import run_flwr_simulation

    outcome = run_flwr_simulation(_run_config(a), num_supernodes=a.clients, workdir=Path(a.out) / "flwr-work", timeout=1200)
    if not outcome.ok:
        raise RuntimeError(f"flwr run failed: {outcome.status} (log {outcome.log})")
    return _summary_row(outcome.summary, outcome.seconds)


def worker_deploy(a) -> dict:
    from server.launch import LocalFederation, hospitals_in

    t0 = time.perf_counter()
    with LocalFederation(Path(a.out) / "deploy-work", hospitals_in(a.data)) as fed:
        outcome = fed.submit(_run_config(a), timeout=1800)
    if not outcome.ok:
        raise RuntimeError(f"deployment run failed: {outcome.status} (log {outcome.log})")
    row = _summary_row(outcome.summary, time.perf_counter() - t0)
    row["submit_seconds"] = outcome.seconds
    return row


WORKERS = {"plain": worker_plain, "plain-mt": lambda a: worker_plain(a, os.cpu_count() or 1), "sim": worker_sim, "sim-fp16": lambda a: worker_sim(a, fp16=True),
           "flwr": worker_flwr, "deploy": worker_deploy}


def run_one(a) -> None:
    os.environ["TQDM_DISABLE"] = "1"
    with PeakMemory(interval=0.2, role=_role) as mem:
        res = WORKERS[a.worker](a)
    res["memory_mb"] = mem.by_role_mb()
    print(json.dumps(res))


# ------------------------------------------------------------------------------------------- report
def model_bytes() -> list[list]:
    """Bytes of one weight transfer for the real-use models (14 findings, 3 channels), float32 vs float16."""
    from common.arrays import record_bytes, state_to_record
    from common.settings import ModelConfig
    from common.models import build_model

    rows = []
    for arch, outputs, ch in (("smallcnn", 4, 1), ("resnet18", 14, 3), ("resnet50", 14, 3), ("densenet121", 14, 3)):
        m = build_model(ModelConfig(arch=arch, weights="none"), outputs, ch)
        b32, b16 = record_bytes(state_to_record(m)), record_bytes(state_to_record(m, fp16=True))
        rows.append([arch, round(b32 / 2**20, 2), round(b16 / 2**20, 2), round(b16 / b32, 3)])
    return rows


def fp16_roundtrip(data: Path, run_dir: Path) -> str:
    """AUC of the sim run's exported model before and after a float16 round trip (quantisation alone)."""
    from common.arrays import load_record, state_to_record, to_fp32
    from common.bundle import load_bundle
    from common.settings import Settings
    from server.evaluation import GlobalEvaluator

    b = load_bundle(run_dir / "bundle")
    rc = b.card["provenance"]["run_config"]
    ev = GlobalEvaluator(Settings.from_run_config(rc))
    full = ev(0, state_to_record(b.model))
    load_record(b.model, to_fp32(state_to_record(b.model, fp16=True)))
    half = ev(0, state_to_record(b.model))
    fa, ha = full.test["macro"]["auc"], half.test["macro"]["auc"]
    return (f"float16 round trip of the sim run's exported model: test macro AUC {fa:.4f} -> {ha:.4f} "
            f"(delta {ha - fa:+.5f}), F1 {full.test['macro']['f1']:.4f} -> {half.test['macro']['f1']:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--patients", type=int, default=60, help="per hospital (1-3 images each)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--arch", default="smallcnn")
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    p.add_argument("--runtimes", default="plain,plain-mt,sim,sim-fp16,flwr,deploy")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return run_one(a)

    from common.data.synthetic import synthesize

    work = Path(tempfile.mkdtemp(prefix="fedbench-"))
    data = work / "data"
    synthesize(data, hospitals=a.clients, patients=a.patients, size=128, seed=3, progress=False)
    common = ["--rounds", str(a.rounds), "--clients", str(a.clients), "--image-size", str(a.image_size),
              "--arch", a.arch, "--epochs", str(a.epochs), "--data", str(data)]
    results = {}
    for name in a.runtimes.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(__file__, [name, *common, "--out", str(work / name)])
    load = os.getloadavg()

    base = results.get("plain")
    rows = []
    for name, r in results.items():
        steady = r["round_seconds"][1:] or r["round_seconds"]
        per_round = sum(steady) / len(steady)
        b_steady = (sum(base["round_seconds"][1:] or base["round_seconds"]) /
                    len(base["round_seconds"][1:] or base["round_seconds"])) if base else None
        rows.append([name, r["wall"], per_round, r["wall"] / base["wall"] if base else None,
                     per_round / b_steady if b_steady else None, r["steps"], r["test_auc"]])
    print(table(["runtime", "wall s", "s/round (2..R)", "wall / plain", "round / plain", "local steps", "test AUC"],
                rows, title=f"{a.rounds} rounds x {a.clients} hospitals, {a.arch} at {a.image_size} px, "
                            f"{a.epochs} local epochs, {os.cpu_count()} CPUs (load average at the end: "
                            f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f})"))
    brow = [[name, r["bytes"]["down"], r["bytes"]["up"]] for name, r in results.items() if r.get("bytes")]
    if brow:
        print()
        print(table(["runtime", "bytes down / client / round", "bytes up / client / round"], brow,
                    title="Measured weight transfer (ArrayRecord payload)"))
    print()
    print(table(["model", "float32 MiB", "float16 MiB", "ratio"], model_bytes(),
                title="One weight transfer per client per direction, by model (14 findings, RGB input)"))
    if "sim" in results:
        print()
        print(fp16_roundtrip(data, work / "sim"))
    roles = sorted({k for r in results.values() for k in r["memory_mb"]})
    print()
    print(table(["process", *results], [[role, *[r["memory_mb"].get(role) for r in results.values()]]
                                        for role in roles], title="Peak RSS (VmHWM) per process kind, MiB"))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nraw results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
