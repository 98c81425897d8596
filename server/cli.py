"""`fedxray federate` (simulation runtime), `fedxray launch` (deployment runtime on loopback) and `fedxray demo`.

All three resolve their settings as every run command does (common/cli.py: profile, file, --data/--out, --set)
and hand Flower the whole result as the run config. `federate_demo()` is the Python entry the README's main
command (`fedxray demo`) calls: synthetic hospitals -> federated training in Flower's simulation runtime ->
headline table -> bundle in runs/demo/bundle, where `fedxray serve` finds it.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common.cli import add_settings_arguments, settings_from_args

DEMO_DATA, DEMO_OUT = "data/synth", "runs/demo"


def add_commands(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("federate", help="federated training in Flower's simulation runtime -> table + bundle")
    add_settings_arguments(f, data_help="hospital_* folders (+ holdout/) or one source to partition (data.path)")
    f.add_argument("--rounds", type=int, default=None, help="federation.rounds")
    f.add_argument("--supernodes", type=int, default=None,
                   help="virtual hospitals (default: the number of hospital_* folders, else 3)")
    f.add_argument("--runtime", choices=["inprocess", "flwr"], default="inprocess",
                   help="inprocess: flwr.simulation.run_simulation here; flwr: `flwr run .` on a private local "
                        "simulation SuperLink (stopped afterwards)")
    f.add_argument("--synth", action="store_true", help="write synthetic hospitals to the data path first if it "
                                                        "is empty (always, with --profile demo)")
    f.set_defaults(func=_cmd_federate)

    la = sub.add_parser("launch", help="deployment runtime on this machine: superlink + a supernode per hospital "
                                       "+ flwr run, stopped afterwards")
    add_launch_arguments(la)
    la.set_defaults(func=run_launch_command)

    d = sub.add_parser("demo", help="the embedded default end to end on synthetic hospitals")
    d.add_argument("--out", default=DEMO_OUT)
    d.add_argument("--quiet", action="store_true", help="no progress output, only the result")
    d.set_defaults(func=_cmd_demo)


def _ensure_demo_data(data: Path, patients: int = 100, size: int = 128, quiet: bool = False) -> None:
    """Synthetic hospitals in `data`, unless it holds anything already (never written into a user's data)."""
    from common.data.synthetic import synthesize

    if data.exists() and any(data.iterdir()):
        return
    if not quiet:
        print(f"writing synthetic hospitals to {data} ...", flush=True)
    synthesize(data, hospitals=3, patients=patients, size=size, seed=0, progress=False)


def hospital_count(data: Path) -> int:
    from common.data.sources import site_folders

    return len(site_folders(data)) if data.is_dir() else 0


def every_hospital(n: int) -> dict:
    """The default for a run over n hospitals: each of them takes part in every round."""
    return {"federation.min_available_nodes": n, "federation.min_train_nodes": n, "federation.min_evaluate_nodes": n}


def federate(settings, *, num_supernodes: int | None = None, synth: bool = False, runtime: str = "inprocess",
             quiet: bool = False) -> dict:
    """One federated run in Flower's simulation runtime -> summary dict (also <output_dir>/federation.json,
    with "table", "bundle", "history", "best_round", "validation", "test", "provenance")."""
    from common.errors import DataError, FedxrayError

    data = Path(settings.data.path)
    if synth:
        _ensure_demo_data(data, quiet=quiet)
    if not settings.data.path or not data.exists():
        raise DataError("no such data folder: pass --data (data.path), write synthetic hospitals with "
                        "`fedxray data synth --out data/synth`, or run the embedded demo with --profile demo",
                        path=str(data))
    from server.evaluation import server_data_path

    server_data_path(settings)   # fail before Flower starts: the server needs its held-out data
    if quiet:   # Flower's own per-round log lines; the result is printed by the caller
        import logging

        logging.getLogger("flwr").setLevel(logging.WARNING)
    n = num_supernodes or hospital_count(data) or 3
    if runtime == "flwr":
        from server.launch import run_flwr_simulation
        from server.progress import print_progress

        outcome = run_flwr_simulation(settings, num_supernodes=n, workdir=tempfile.mkdtemp(prefix="fedxray-sim-"),
                                      on_line=None if quiet else print_progress)
        if not outcome.ok:
            raise FedxrayError(f"federated run did not finish: {outcome.failure()} (log: {outcome.log})")
        summary = outcome.summary
    else:
        from server.federation import run_federated_simulation

        summary = run_federated_simulation(settings, num_supernodes=n)
    from server.tracking import track_federated

    track_federated(settings, summary, kind="federate")
    return summary


def federate_demo(data: str | Path = DEMO_DATA, out: str | Path = DEMO_OUT, *, rounds: int | None = None,
                  num_supernodes: int | None = None, overrides: dict | None = None, synth: bool = True,
                  runtime: str = "inprocess", quiet: bool = False) -> dict:
    """The embedded demo (profile `demo`) on synthetic hospitals written to `data` if missing; `overrides`:
    dotted settings keys on top. About 3 minutes on 2 cores with the demo settings."""
    from common.settings import Settings

    n = num_supernodes or hospital_count(Path(data)) or 3
    settings = Settings.build("demo", every_hospital(n), {"data.path": str(data), "output_dir": str(out)},
                              {"federation.rounds": rounds} if rounds else {}, overrides or {})
    return federate(settings, num_supernodes=num_supernodes, synth=synth, runtime=runtime, quiet=quiet)


def _cmd_demo(a) -> int:
    """The embedded default end to end: synthetic hospitals -> federated training in Flower's simulation
    runtime -> global metrics table -> bundle at <out>/bundle, where `fedxray serve` looks by default."""
    out = Path(a.out)
    summary = federate_demo(data=out / "data", out=out, quiet=a.quiet)
    print("\n" + summary["table"])
    print(f"\nbundle: {summary['bundle']}   (serve it: fedxray serve --bundle {summary['bundle']})")
    return 0


def _cmd_federate(a) -> int:
    data = Path(settings_from_args(a).data.path)   # from --data, the file or the profile
    n = a.supernodes or hospital_count(data) or 3
    settings = settings_from_args(a, every_hospital(n), {"federation.rounds": a.rounds} if a.rounds else {})
    summary = federate(settings, num_supernodes=a.supernodes, synth=a.synth or settings.profile == "demo",
                       runtime=a.runtime, quiet=a.quiet)
    print(summary["table"])
    print(f"\nbundle: {summary['bundle']}   (serve it: fedxray serve --bundle {summary['bundle']})")
    return 0


# ------------------------------------------------------------------------------------------- fedxray launch
def add_launch_arguments(p) -> None:
    add_settings_arguments(p, data_help="folder of hospital_* sites (+ holdout/ for the server)")
    p.add_argument("--rounds", type=int, default=None, help="federation.rounds")
    p.add_argument("--workdir", default=None, help="logs and Flower state (default: a new temp folder)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the run is stopped")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS (default: TLS with a CA)")
    p.add_argument("--certs", default=None, help="folder from `fedxray certs` (default: a fresh CA in the workdir)")
    p.add_argument("--supernode-auth", action="store_true",
                   help="only registered hospital keys may connect (keys from --certs/nodes or generated)")
    p.add_argument("--sign-with", default=None, metavar="KEY",
                   help="Ed25519 app-signing key (`fedxray certs --signing-key`): nodes run only the signed app")


def run_launch_command(a) -> int:
    from common.errors import FedxrayError
    from server.launch import hospitals_in, launch
    from server.progress import print_progress
    from server.security import Security

    hospitals = hospitals_in(settings_from_args(a).data.path)   # from --data, the file or the profile
    settings = settings_from_args(a, every_hospital(len(hospitals)), {"output_dir": "runs/deploy"},
                                  {"federation.rounds": a.rounds} if a.rounds else {})
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="fedxray-launch-"))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FedxrayError(f"cannot create the work folder {workdir}: {e.strerror}") from e
    if a.sign_with and not Path(a.sign_with).is_file():
        raise FedxrayError(f"--sign-with {a.sign_with}: no such key file (`fedxray certs --signing-key` writes one)")
    if a.insecure:
        if a.supernode_auth or a.sign_with:
            raise FedxrayError("--insecure cannot be combined with --supernode-auth or --sign-with")
        security = Security.insecure()
    else:
        security = Security.generate(a.certs or workdir / "certs", list(hospitals), auth=a.supernode_auth)
    if not a.quiet:
        print(f"federation on loopback: work folder {workdir}, output {settings.output_dir}", flush=True)
    outcome = launch(settings, workdir=workdir, timeout=a.timeout, security=security, signing_key=a.sign_with,
                     on_line=None if a.quiet else print_progress)
    if not outcome.ok:
        raise FedxrayError(f"federated run did not finish: {outcome.failure()} (log: {outcome.log}); rerun the same "
                           "command to resume from the last checkpoint")
    from server.tracking import track_federated

    track_federated(settings, outcome.summary, kind="launch")
    print(outcome.summary.get("table", ""))
    print(f"\nbundle: {outcome.summary['bundle']}\nlogs: {outcome.log.parent}  ({outcome.seconds:.0f} s)")
    return 0
