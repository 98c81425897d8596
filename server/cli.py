"""`fedxray federate` (simulation runtime) and `fedxray launch` (deployment runtime on loopback).

`federate_demo()` is the Python entry the README's main command (`fedxray demo`) calls: synthetic
hospitals -> federated training in Flower's simulation runtime -> headline table -> bundle in
runs/demo/bundle, where `fedxray serve` finds it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEMO_DATA, DEMO_OUT = "data/synth", "runs/demo"


def add_commands(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("federate", help="federated training in Flower's simulation runtime -> table + bundle")
    f.add_argument("--data", default=DEMO_DATA, help="hospital_* folders (+ holdout/) or one source to partition")
    f.add_argument("--out", default=DEMO_OUT, help="output-dir: bundle/, federation.json, checkpoint/")
    f.add_argument("--rounds", type=int, default=None, help="num-server-rounds (default: pyproject's)")
    f.add_argument("--supernodes", type=int, default=None,
                   help="virtual hospitals (default: the number of hospital_* folders, else 3)")
    f.add_argument("--runtime", choices=["inprocess", "flwr"], default="inprocess",
                   help="inprocess: flwr.simulation.run_simulation here; flwr: `flwr run .` on a private local "
                        "simulation SuperLink (stopped afterwards)")
    f.add_argument("--synth", action="store_true", help="write synthetic hospitals to --data first if it is empty")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any run-config key of [tool.flwr.app.config], e.g. --set strategy=fedprox")
    f.set_defaults(func=_cmd_federate)

    from server.launch import add_launch_arguments, run_launch_command

    la = sub.add_parser("launch", help="deployment runtime on this machine: superlink + a supernode per hospital "
                                       "+ flwr run, stopped afterwards")
    add_launch_arguments(la)
    la.set_defaults(func=run_launch_command)


def _ensure_demo_data(data: Path, patients: int = 100, size: int = 128) -> None:
    from common.data.sources import site_folders
    from common.data.synthetic import synthesize

    if data.exists() and (site_folders(data) or any(data.iterdir())):
        return
    print(f"writing synthetic hospitals to {data} ...")
    synthesize(data, hospitals=3, patients=patients, size=size, seed=0, progress=False)


def federate_demo(data: str | Path = DEMO_DATA, out: str | Path = DEMO_OUT, *, rounds: int | None = None,
                  num_supernodes: int | None = None, overrides: dict | None = None, synth: bool = True,
                  runtime: str = "inprocess", quiet: bool = False) -> dict:
    """Synthetic hospitals (written if `data` is missing and `synth`) -> federated run -> summary dict.

    The summary (also <out>/federation.json) has "table", "bundle", "history", "best_round", "validation",
    "test" and "provenance". Takes about a minute on 2 cores with the default demo settings.
    """
    from common.data.sources import site_folders
    from common.errors import DataError

    data, out = Path(data), Path(out)
    if synth:
        _ensure_demo_data(data)
    if not data.exists():
        raise DataError("no such folder; write the demo data with `fedxray data synth --out data/synth` or pass "
                        "--synth", path=str(data))
    n = num_supernodes or len(site_folders(data)) or 3
    rc = {"data-path": str(data), "output-dir": str(out), "min-available-nodes": n, "min-train-nodes": n,
          "min-evaluate-nodes": n, **(overrides or {})}
    if rounds:
        rc["num-server-rounds"] = rounds
    if runtime == "flwr":
        import tempfile

        from common.errors import FedxrayError
        from server.launch import run_flwr_simulation

        outcome = run_flwr_simulation(rc, num_supernodes=n, workdir=tempfile.mkdtemp(prefix="fedxray-sim-"))
        if not outcome.ok:
            raise FedxrayError(f"federated run did not finish: {outcome.status.get('message') or outcome.returncode}"
                               f" (log: {outcome.log})")
        summary = outcome.summary
    else:
        from server.federation import run_federated_simulation

        summary = run_federated_simulation(rc, num_supernodes=n)
    if not quiet:
        print("\n" + summary["table"])
        print(f"\nbundle: {summary['bundle']}   (serve it: fedxray serve)")
    return summary


def _cmd_federate(a) -> int:
    from common.cli import parse_overrides

    federate_demo(a.data, a.out, rounds=a.rounds, num_supernodes=a.supernodes, overrides=parse_overrides(a.set),
                  synth=a.synth or a.data == DEMO_DATA, runtime=a.runtime)
    return 0
