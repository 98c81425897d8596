"""What a lost node, bad data or a dead SuperLink does to a federated run, on the real deployment runtime.

    .venv/bin/python benchmarks/reliability.py [--rounds 3] [--patients 40] [--image-size 32] [--out DIR]

Each case starts the product's own deployment topology on loopback (server.launch.LocalFederation: TLS,
flower-superlink, one flower-supernode per hospital, `flwr run` of the fedxray app), injects one fault while the
run streams its per-round progress, and records:
  runs completed  | time to outcome (s) | rounds each hospital contributed to | test macro AUC vs the undisturbed run
  | identifying strings (image names, patient ids, paths of every hospital) found in anything the server side
  holds afterwards: the SuperLink's database and log, the submitter's stream, every file the ServerApp wrote.
Faults: none; one SuperNode killed (SIGKILL, its whole process family) during round 2; two killed during
round 2 (the run needs 2: federation.min_available_nodes = federation.min_train_nodes = 2, so it must stop and say so); one hospital whose label CSV lists images missing on disk; the SuperLink killed during round 2, then
the same launch again with the same work folder (the run resumes from its checkpoint).
Writes benchmarks/results/reliability.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import REPO, table  # noqa: E402

CASES = ["none", "one node killed", "two nodes killed", "bad data at one hospital", "SuperLink killed + rerun"]


def _kill_family(proc) -> None:
    proc.refresh()
    for m in proc.running():
        try:
            os.kill(m.pid, signal.SIGKILL)
        except OSError:
            pass


def run_case(case: str, synth: Path, work: Path, a) -> dict:
    from common.audit import files_under, find_identifying, identifying_strings
    from server.launch import LocalFederation, hospitals_in

    hospitals = hospitals_in(synth)
    if case == "bad data at one hospital":
        from common.data.synthetic import break_hospital

        hospitals["hospital_3"] = str(break_hospital(synth / "hospital_3", work / "broken-hospital_3",
                                                     "missing-images"))
    out = work / "out"
    rc = {"data.path": str(synth), "federation.server_data_path": str(synth / "holdout"), "output_dir": str(out),
          "federation.rounds": a.rounds, "preprocess.image_size": a.image_size, "train.batch_size": 8, "federation.local_epochs": 1,
          "federation.min_available_nodes": 2, "federation.min_train_nodes": 2, "federation.min_evaluate_nodes": 1, "federation.node_wait_timeout": 60.0,
          "federation.round_timeout": float(a.round_timeout)}
    t0 = time.perf_counter()
    launches, outcome = 0, None
    for attempt in range(2):
        fed = LocalFederation(work / "fed", hospitals)
        killed: list[str] = []

        def on_line(line: str, fed=fed, killed=killed) -> None:
            if "fedxray | round 1/" not in line or killed or attempt:
                return
            victims = {"one node killed": ["hospital_2"], "two nodes killed": ["hospital_2", "hospital_3"],
                       "SuperLink killed + rerun": ["superlink"]}.get(case, [])
            time.sleep(1.0)                                  # round 2 is under way
            for v in victims:   # a hospital is its SuperNode and its SuperExec
                for proc in [p for p in fed.procs if p.name in (v, f"supernode-{v}", f"superexec-{v}")]:
                    _kill_family(proc)
                killed.append(v)
            if victims:
                print(f"  [{case}] killed {', '.join(victims)} during round 2", flush=True)

        try:
            fed.start()
            launches += 1
            outcome = fed.submit(rc, timeout=a.timeout, on_line=on_line)
        finally:
            fed.stop()
        print(f"  [{case}] launch {launches}: {outcome.status.get('state')} "
              f"({outcome.failure() if not outcome.ok else 'ok'})", flush=True)
        if outcome.ok or case != "SuperLink killed + rerun":
            break
    seconds = time.perf_counter() - t0
    secrets = set().union(*(identifying_strings(p) for p in hospitals.values()))
    secrets |= identifying_strings(synth / "hospital_3")
    found = find_identifying(secrets, files_under(work / "fed" / "superlink", work / "fed" / "logs" / "superlink.log",
                                                  work / "fed" / "logs" / "run.log", out))
    rounds = {}
    auc = None
    if outcome.ok:
        nodes = outcome.summary["provenance"]["federation"]["nodes"]
        rounds = {site: sorted(set(n["rounds"])) for site, n in nodes.items()}
        auc = outcome.summary["test"]["macro"]["auc"]
    return {"case": case, "completed": bool(outcome.ok), "launches": launches, "seconds": round(seconds, 1),
            "state": outcome.status.get("state"), "message": outcome.failure() if not outcome.ok else "",
            "rounds_per_hospital": rounds, "test_auc": auc, "identifying_found": len(found),
            "identifying_examples": found[:5]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--patients", type=int, default=40, help="patients per synthetic hospital")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--round-timeout", type=float, default=60.0, help="seconds a round waits for a lost node")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--out", default=None, help="work folder (default: a temp folder, removed afterwards)")
    a = p.parse_args()
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    from common.data.synthetic import synthesize

    root = Path(a.out or tempfile.mkdtemp(prefix="fedxray-reliability-"))
    synth = root / "synth"
    if not synth.exists():
        synthesize(synth, hospitals=3, patients=a.patients, size=64, seed=1, progress=False)
    results = []
    for i, case in enumerate(c.strip() for c in a.cases.split(",")):
        print(f"[{i + 1}] {case} ...", flush=True)
        results.append(run_case(case, synth, root / f"case{i}", a))
    base = next((r["test_auc"] for r in results if r["case"] == "none"), None)
    rows = []
    for r in results:
        delta = (r["test_auc"] - base) if r["test_auc"] is not None and base is not None else None
        outcome = "yes" if r["completed"] else f"no: {r['message'][:90]}"
        rounds = "; ".join(f"{s}: {','.join(map(str, v)) or '-'}" for s, v in sorted(r["rounds_per_hospital"].items()))
        rows.append([r["case"], outcome, r["launches"], r["seconds"], rounds or "-", r["test_auc"], delta,
                     r["identifying_found"]])
    print()
    print(table(["fault injected", "run completed", "launches", "time to outcome (s)", "rounds with each hospital",
                 "test AUC", "AUC vs undisturbed", "identifying strings in server files"], rows,
                title=f"Reliability on the deployment runtime (3 hospitals, {a.rounds} rounds, smallcnn "
                      f"{a.image_size} px, federation.round_timeout {a.round_timeout:.0f} s)"))
    res = REPO / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "reliability.json").write_text(json.dumps({"settings": vars(a), "results": results}, indent=1))
    if not a.out:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
