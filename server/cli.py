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

    add_federation_commands(sub)

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

    if settings.job == "train":
        server_data_path(settings)   # fail before Flower starts: the server needs its held-out data to train
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
    if settings.job == "train":   # the other jobs (server/jobs.py) train nothing to track
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
    if settings.job != "train":   # --set job=stats|evaluate (server/jobs.py): its table, no bundle
        from server.jobs import format_result

        print(format_result(summary))
        return 0
    print(summary["table"])
    print(f"\nbundle: {summary['bundle']}   (serve it: fedxray serve --bundle {summary['bundle']})")
    return 0


# ------------------------------------------------------------------------------------------- fedxray launch
def add_launch_arguments(p) -> None:
    add_settings_arguments(p, data_help="folder of hospital_* sites (+ holdout/ for the server)")
    p.add_argument("--rounds", type=int, default=None, help="federation.rounds")
    p.add_argument("--workdir", default=None, help="logs and Flower state (default: a new temp folder)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the run is stopped")
    add_security_arguments(p)
    p.add_argument("--sign-with", default=None, metavar="KEY",
                   help="Ed25519 app-signing key (`fedxray certs --signing-key`): nodes run only the signed app")


def run_launch_command(a) -> int:
    from common.errors import FedxrayError
    from server.launch import hospitals_in
    from server.progress import print_progress
    from server.standing import launch

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
    if a.insecure and a.sign_with:
        raise FedxrayError("--insecure cannot be combined with --sign-with")
    security = security_from_args(a, workdir, list(hospitals))
    if not a.quiet:
        print(f"federation on loopback: work folder {workdir}, output {settings.output_dir}", flush=True)
    outcome = launch(settings, workdir=workdir, timeout=a.timeout, security=security, signing_key=a.sign_with,
                     on_line=None if a.quiet else print_progress)
    if not outcome.ok:
        raise FedxrayError(f"federated run did not finish: {outcome.failure()} (log: {outcome.log}); rerun the same "
                           "command to resume from the last checkpoint")
    if settings.job != "train":
        from server.jobs import format_result

        print(format_result(outcome.summary))
        return 0
    from server.tracking import track_federated

    track_federated(settings, outcome.summary, kind="launch")
    print(outcome.summary.get("table", ""))
    print(f"\nbundle: {outcome.summary['bundle']}\nlogs: {outcome.log.parent}  ({outcome.seconds:.0f} s)")
    return 0


def add_security_arguments(p) -> None:
    p.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS, no node authentication (demo and "
                                                           "debugging only; default: TLS with a CA)")
    p.add_argument("--certs", default=None, help="folder from `fedxray certs` (default: a fresh CA in the workdir)")
    p.add_argument("--no-supernode-auth", dest="supernode_auth", action="store_false",
                   help="let any node with the CA connect (default: only registered hospital keys, from "
                        "--certs/nodes or generated)")
    p.add_argument("--supernode-auth", dest="supernode_auth", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(supernode_auth=True)


def security_from_args(a, workdir: Path, hospitals: list[str]):
    from server.security import Security

    if a.insecure:
        return Security.insecure()
    return Security.generate(a.certs or workdir / "certs", hospitals, auth=a.supernode_auth)


# ------------------------------------------------------------------------------------------- fedxray federation
FEDERATION_WORKDIR = "runs/federation"


def add_federation_commands(sub) -> None:
    fed = sub.add_parser("federation", help="a local federation that stays up between runs: up, run, status, "
                                            "logs, down (deployment runtime on loopback)")
    fsub = fed.add_subparsers(dest="federation_cmd", required=True)

    def workdir_arg(p):
        p.add_argument("--workdir", default=FEDERATION_WORKDIR,
                       help=f"the federation's folder: its record, certificates, logs, Flower state "
                            f"(default: {FEDERATION_WORKDIR})")

    u = fsub.add_parser("up", help="start a SuperLink and a SuperNode per hospital folder, wait until every node "
                                   "is online, return")
    u.add_argument("--data", required=True, help="folder of hospital_* sites (+ holdout/ for the server)")
    workdir_arg(u)
    add_security_arguments(u)
    u.add_argument("--site-policy", action="append", default=[], metavar="[SITE=]FILE",
                   help="a hospital's site policy (client/policy.py); without SITE= for every hospital")
    u.add_argument("--executor", choices=["warm", "subprocess"], default="warm",
                   help="warm: fedxray's warm SuperExec per node (default); subprocess: Flower's, a cold process "
                        "per message")
    u.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every node to be online")
    u.set_defaults(func=_cmd_federation_up)

    r = fsub.add_parser("run", help="submit a run to the federation (any run config) and stream its rounds")
    add_settings_arguments(r, data_help="hospital_* folders + holdout/ (default: the folder `up` was given)")
    workdir_arg(r)
    r.add_argument("--rounds", type=int, default=None, help="federation.rounds")
    r.add_argument("--timeout", type=float, default=900.0, help="seconds before the run is stopped")
    r.set_defaults(func=_cmd_federation_run)

    sa = fsub.add_parser("stats", help="every hospital's data statistics (counts per finding and split, views, "
                                       "image sizes, exclusions; small counts suppressed by each hospital)")
    add_settings_arguments(sa, data_help="hospital_* folders (default: the folder `up` was given)")
    workdir_arg(sa)
    sa.add_argument("--timeout", type=float, default=300.0, help="seconds before the job is stopped")
    sa.set_defaults(func=_cmd_federation_stats)

    st = fsub.add_parser("status", help="the federation's processes, the nodes online and the runs")
    workdir_arg(st)
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(func=_cmd_federation_status)

    lg = fsub.add_parser("logs", help="the federation's logs: superlink, supernode-<site>, superexec-<site> (the "
                                      "hospital's ClientApp log), run")
    workdir_arg(lg)
    lg.add_argument("name", nargs="?", default=None, help="one log (default: the last lines of each)")
    lg.add_argument("-n", "--lines", type=int, default=20)
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended (Ctrl-C ends)")
    lg.set_defaults(func=_cmd_federation_logs)

    rk = fsub.add_parser("rotate-key", help="give one hospital a new SuperNode key (unregister the old node, "
                                            "register the new key, restart its node)")
    workdir_arg(rk)
    rk.add_argument("site", help="the hospital, e.g. hospital_2")
    rk.set_defaults(func=_cmd_federation_rotate_key)

    dn = fsub.add_parser("down", help="stop exactly what `up` started (also after a crash)")
    workdir_arg(dn)
    dn.set_defaults(func=_cmd_federation_down)

    ev = sub.add_parser("evaluate", help="cross-site evaluation on the federation: every hospital scores each "
                                         "bundle on its own held-out patients -> bundle x hospital matrix")
    ev.add_argument("--bundle", action="append", required=True, metavar="DIR",
                    help="a model bundle folder (repeat for several, e.g. each local-only model and the global one)")
    add_settings_arguments(ev, data_help="hospital_* folders (default: the folder `up` was given)")
    workdir_arg(ev)
    ev.add_argument("--timeout", type=float, default=600.0, help="seconds before the job is stopped")
    ev.set_defaults(func=_cmd_evaluate)


def _site_policies(values: list[str], hospitals: list[str]) -> dict[str, dict]:
    from common.errors import FedxrayError

    out: dict[str, dict] = {}
    for v in values:
        site, _, path = v.partition("=") if "=" in v else ("", "", v)
        if site and site not in hospitals:
            raise FedxrayError(f"--site-policy {v}: no hospital {site!r} (hospitals: {', '.join(hospitals)})")
        if not Path(path).is_file():
            raise FedxrayError(f"--site-policy {v}: no such file")
        for h in ([site] if site else hospitals):
            out.setdefault(h, {})["site-policy"] = str(Path(path).resolve())
    return out


def _cmd_federation_up(a) -> int:
    from server.launch import hospitals_in
    from server.standing import up

    workdir = Path(a.workdir)
    hospitals = list(hospitals_in(a.data))
    fed = up(a.data, workdir, security=security_from_args(a, workdir.resolve(), hospitals), executor=a.executor,
             node_extra=_site_policies(a.site_policy, hospitals), timeout=a.timeout,
             say=lambda m: print(m, flush=True))
    print(f"federation up: SuperLink 127.0.0.1:{fed.port}, record {fed.state_file}\n"
          f"  fedxray federation run --workdir {a.workdir} --profile demo --rounds 2\n"
          f"  fedxray federation status --workdir {a.workdir}\n  fedxray federation down --workdir {a.workdir}")
    return 0


def federation_settings(a, job: str, *layers: dict):
    """A run's settings for the federation in a.workdir: every hospital takes part, data from `up`, output
    under the workdir by job, then the shared settings arguments on top."""
    from common.errors import FedxrayError
    from server.standing import read_state

    state = read_state(a.workdir)
    if state is None:
        raise FedxrayError(f"no federation is up in {Path(a.workdir).resolve()}: `fedxray federation up --data "
                           f"<hospital folders> --workdir {a.workdir}` first")
    base = {"data.path": state["data"], "output_dir": str(Path(a.workdir) / "results" / job)}
    return settings_from_args(a, every_hospital(len(state["hospitals"])), base, *layers)


def _submit_to_federation(a, settings) -> int:
    """`federation run|stats` and `evaluate`: submit, stream, print the job's table and where its files are.
    The tables are the ones the ServerApp wrote (federation.json's table, stats.md, crosssite.md): printing them
    needs no import of the jobs' code (seconds of torch and matplotlib) before or after the run."""
    from common.errors import FedxrayError
    from server.progress import print_progress
    from server.standing import run

    outcome = run(a.workdir, settings, timeout=a.timeout, on_line=None if a.quiet else print_progress)
    if not outcome.ok:
        again = "; the same command resumes from the last checkpoint" if settings.job == "train" else ""
        raise FedxrayError(f"the {settings.job} run did not finish: {outcome.failure()} (log: {outcome.log}){again}")
    out = Path(settings.output_dir)
    if settings.job == "train":
        from server.tracking import track_federated

        track_federated(settings, outcome.summary, kind="federation")
        print(outcome.summary.get("table", ""))
        print(f"\nbundle: {outcome.summary.get('bundle')}  ({outcome.seconds:.0f} s)")
        return 0
    tables = {"stats": ["stats.md"], "evaluate": ["crosssite.md", "crosssite.png"]}[settings.job]
    print((out / tables[0]).read_text())
    files = [outcome.status.get("result"), *tables]
    print(f"\n{', '.join(str(out / f) for f in files if f)}  ({outcome.seconds:.0f} s)")
    return 0


def _cmd_federation_run(a) -> int:
    rounds = {"federation.rounds": a.rounds} if a.rounds else {}
    job = federation_settings(a, "train", rounds).job   # --set job=stats|evaluate works here too
    return _submit_to_federation(a, federation_settings(a, job, rounds))


def _cmd_federation_stats(a) -> int:
    return _submit_to_federation(a, federation_settings(a, "stats", {"job": "stats"}))


def _cmd_evaluate(a) -> int:
    from common.bundle import CARD_FILE
    from common.errors import FedxrayError

    for b in a.bundle:
        if not (Path(b) / CARD_FILE).is_file():
            raise FedxrayError(f"--bundle {b}: not a model bundle (no model.json); `fedxray federation run` or "
                               "`fedxray train` export one")
    bundles = [str(Path(b).resolve()) for b in a.bundle]
    return _submit_to_federation(a, federation_settings(a, "evaluate", {"job": "evaluate",
                                                                       "crosssite.bundles": bundles}))


def _cmd_federation_status(a) -> int:
    import json

    from server.standing import format_status, status

    st = status(a.workdir)
    print(json.dumps(st, indent=1) if a.json else format_status(st))
    return 0


def _cmd_federation_logs(a) -> int:
    import time

    from common.errors import FedxrayError
    from server.standing import log_files, tail

    files = log_files(a.workdir)
    if not files:
        raise FedxrayError(f"no logs in {Path(a.workdir).resolve() / 'logs'}: was a federation started there?")
    if a.name is None:
        for name, path in files.items():
            print(f"==> {name} ({path}) <==\n{tail(path, a.lines)}\n")
        return 0
    if a.name not in files:
        raise FedxrayError(f"no log {a.name!r}: choose one of {', '.join(files)}")
    path = files[a.name]
    print(tail(path, a.lines), flush=True)
    if a.follow:
        with open(path, errors="replace") as fh:
            fh.seek(0, 2)
            while True:
                line = fh.readline()
                if line:
                    print(line, end="", flush=True)
                else:
                    time.sleep(0.5)
    return 0


def _cmd_federation_rotate_key(a) -> int:
    from server.standing import rotate_key

    r = rotate_key(a.workdir, a.site)
    print(f"{r['site']}: new key {r['public_key']} registered; node {r['node_id']} online "
          f"(retired node ids: {', '.join(r['retired_node_ids']) or 'none'})")
    return 0


def _cmd_federation_down(a) -> int:
    from server.standing import down

    stopped = down(a.workdir)
    print(f"stopped {len(stopped)} processes: {', '.join(stopped)}" if stopped else
          f"nothing was running in {Path(a.workdir).resolve()}")
    return 0
