"""The deployment round vs the simulation round: the same federation (3 synthetic hospitals, smallcnn, 64 px) run
by Flower's simulation runtime in-process and by the deployment topology on loopback (`server.launch.
LocalFederation`: TLS, flower-superlink, a flower-supernode per hospital), with the warm SuperExec
(fedxray/warm_exec.py, the default) and with Flower's own cold one (a new `flwr-clientapp` per message).

Rows: steady-state seconds per round (rounds 2..R) of each deployment vs the simulation's (goal <= 1.5x for
the warm default); per message, seconds from its ClientApp process starting to its first training step
(from the hospital's log, `client.app` logs it; goal <= 1 s, a ratio to 1 s).
"""
from __future__ import annotations

import re
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.suite import Row

STARTUP = re.compile(r"first training step ([0-9.]+) s after its process started")


def _settings(data: Path, out: Path, rounds: int):
    from common.settings import Settings

    return Settings.build("demo", {"data.path": str(data), "output_dir": str(out), "federation.rounds": rounds,
                                   "federation.local_epochs": 1, "federation.resume": False,
                                   "federation.min_available_nodes": 3, "federation.min_train_nodes": 3,
                                   "federation.min_evaluate_nodes": 3})


def _steady(summary: dict) -> float:
    secs = [h["seconds"] for h in summary["history"][1:] if "seconds" in h]
    steady = secs[1:] or secs
    return statistics.median(steady)


def _simulation(data: Path, work: Path, rounds: int) -> float:
    from server.federation import run_federated_simulation

    return _steady(run_federated_simulation(_settings(data, work / "sim", rounds), num_supernodes=3))


def _deployment(data: Path, work: Path, rounds: int, executor: str) -> tuple[float, list[float]]:
    from server.launch import LocalFederation, hospitals_in

    wd = work / f"deploy-{executor}"
    with LocalFederation(wd, hospitals_in(data), executor=executor) as fed:
        outcome = fed.submit(_settings(data, wd / "out", rounds), timeout=1200)
    if not outcome.ok:
        raise RuntimeError(f"the {executor} deployment run failed: {outcome.failure()} (log {outcome.log})")
    startups = [float(m) for log in (wd / "logs").glob("*.log") for m in STARTUP.findall(log.read_text())]
    return _steady(outcome.summary), startups


def rows(quick: bool) -> list[Row]:
    from common.data.synthetic import synthesize

    rounds = 2 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    synthesize(work / "data", hospitals=3, patients=20 if quick else 60, size=128, seed=3, progress=False)
    t0 = time.perf_counter()
    sim = _simulation(work / "data", work, rounds)
    warm, warm_start = _deployment(work / "data", work, rounds, "warm")
    out = [Row("deployment round, warm SuperExec (default)", warm, "s", sim, "simulation round", goal_max=1.5,
               note=f"{rounds} rounds, 3 hospitals, smallcnn 64 px; median of rounds 2..{rounds}")]
    if not quick:
        cold, cold_start = _deployment(work / "data", work, rounds, "subprocess")
        out.append(Row("deployment round, Flower's subprocess SuperExec", cold, "s", sim, "simulation round"))
    else:
        cold_start = []
    for label, starts in (("warm", warm_start), ("subprocess", cold_start)):
        if starts:
            out.append(Row(f"per message: process start -> first step ({label}, median of {len(starts)})",
                           statistics.median(starts), "s", 1.0, "1 s", goal_max=1.0 if label == "warm" else None,
                           detail={"max": max(starts)}))
    out[0].detail["section_run_seconds"] = round(time.perf_counter() - t0, 1)
    return out
