"""A local federation that outlives the command that started it: `fedxray federation up|run|status|logs|down`.

* `up` starts server/launch.py's LocalFederation - one SuperLink, a SuperNode (+ its warm SuperExec) per
  hospital folder, TLS and SuperNode authentication on - returns once every hospital's node is online, and
  leaves it running. Its record, <workdir>/federation-state.json (owner-only), is rewritten as each process
  starts, so a crash of `up` itself still leaves what `down` needs.
* `run` submits one run (any run config, any job: train, stats, evaluate) to it and streams its rounds;
  `status` lists the processes, the nodes Flower sees online and the runs; `logs` shows each process's log.
* `down` stops exactly what `up` started, also after the caller crashed: each recorded process only after
  checking it is the same one (pid and creation time: a recycled pid is someone else's), every descendant
  of them, and every process carrying the federation's random token in its environment (server/processes.py:
  TOKEN_ENV), which also finds a child re-parented after its parent died. Nothing is matched by command line.

`fedxray launch` is `up` + `run` + `down` in one command (server/cli.py).
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import FedxrayError
from common.fileio import write_json
from common.settings import Settings
from server.launch import REPO, LocalFederation, RunOutcome, flower_env, hospitals_in
from server.processes import Proc, pids_with_token, start_time, stop

if TYPE_CHECKING:
    from server.security import Security

STATE_FILE = "federation-state.json"
NODE_ID = re.compile(r"SuperNode ID: (\d+)")
OTHER_NODE = "(joined by itself)"   # a node `up` did not start: a hospital's own SuperNode that joined by itself


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def state_path(workdir: str | Path) -> Path:
    return Path(workdir).resolve() / STATE_FILE


def read_state(workdir: str | Path) -> dict | None:
    path = state_path(workdir)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FedxrayError(f"{path}: unreadable federation record ({e}); stop its processes by hand "
                           "(`fedxray federation status` cannot list them) and remove the file") from e


def up(data_root: str | Path, workdir: str | Path, *, security: "Security | None" = None, executor: str = "warm",
       node_extra: dict[str, dict] | None = None, timeout: float = 120.0,
       say: Callable[[str], None] | None = None) -> LocalFederation:
    """Start the federation for the hospital_* folders of `data_root` and wait until every node is online.

    security: None = TLS with a CA and SuperNode authentication with one key per hospital, created in
    <workdir>/certs (kept for the next `up`). On any failure everything started so far is stopped again."""
    from server.security import Security

    workdir = Path(workdir).resolve()
    prior = read_state(workdir)
    if prior is not None:
        running = LocalFederation.from_state(prior).alive() or pids_with_token(prior["token"])
        if running:
            raise FedxrayError(f"a federation is already up in {workdir} ({len(running)} processes, started "
                               f"{prior.get('started', '?')}): use it (`fedxray federation run --workdir {workdir}`) "
                               f"or stop it first (`fedxray federation down --workdir {workdir}`)")
    hospitals = hospitals_in(data_root)
    security = security or Security.generate(workdir / "certs", list(hospitals), auth=True)
    fed = LocalFederation(workdir, hospitals, security=security, node_extra=node_extra, executor=executor,
                          state_file=state_path(workdir))
    fed.extra_state = {"data": str(Path(data_root).resolve()), "started": _now(), "runs": []}
    say = say or (lambda line: None)
    try:
        say(f"starting a SuperLink and {len(hospitals)} SuperNodes in {workdir} "
            f"({'TLS' if security.tls else 'no TLS'}, SuperNode auth {'on' if security.supernode_auth else 'off'})")
        fed.start()
        online = wait_online(fed, len(hospitals), timeout)
        say(f"{len(online)} of {len(hospitals)} hospitals online: {', '.join(sorted(online))}")
    except BaseException:
        fed.stop()
        state_path(workdir).unlink(missing_ok=True)
        raise
    write_json(fed.state_file, fed.state())
    return fed


def attach(workdir: str | Path) -> LocalFederation:
    """The federation `up` started in `workdir`, with its SuperLink checked to be running."""
    state = read_state(workdir)
    if state is None:
        raise FedxrayError(f"no federation is up in {Path(workdir).resolve()}: start one with "
                           f"`fedxray federation up --data <hospital folders> --workdir {workdir}`")
    fed = LocalFederation.from_state(state, state_file=state_path(workdir))
    link = fed.superlink
    if link is None or link.exited:
        raise FedxrayError(f"the federation in {fed.workdir} is not running (its SuperLink is gone; see "
                           f"{fed.logs / 'superlink.log'}): `fedxray federation down --workdir {workdir}` stops what "
                           "is left, then `up` again")
    return fed


def nodes(fed: LocalFederation, timeout: float = 60.0) -> list[dict]:
    """Flower's own view (`flwr supernode ls --format json`): node id, status, site (read from the node's log)."""
    r = subprocess.run(["flwr", "supernode", "ls", fed.connection, "--format", "json"], env=flower_env(fed.cli_home),
                       capture_output=True, text=True, timeout=timeout)
    try:
        listed = json.loads(r.stdout).get("nodes", [])
    except ValueError:
        raise FedxrayError(f"`flwr supernode ls` failed: {(r.stdout + r.stderr).strip()[-500:]}") from None
    sites = {}
    for name in fed.hospitals:
        log = fed.logs / f"supernode-{name}.log"
        for node_id in NODE_ID.findall(log.read_text(errors="replace")) if log.is_file() else []:
            sites[node_id] = name   # every id the node ever had (a rotated key gives it a new one)
    return [{"site": sites.get(n["node-id"], OTHER_NODE), "node_id": n["node-id"], "status": n["status"],
             "online_s": n.get("online-elapsed")} for n in listed]


def wait_online(fed: LocalFederation, n: int, timeout: float) -> list[str]:
    """Sites whose node Flower lists as online, once `n` are (or a FedxrayError naming the missing ones)."""
    deadline = time.monotonic() + timeout
    while True:
        online = [x["site"] for x in nodes(fed) if x["status"] == "online"]
        if len(online) >= n:
            return online
        dead = [p.name for p in fed.procs if p.exited]
        if dead or time.monotonic() > deadline:
            missing = sorted(set(fed.hospitals) - set(online))
            why = f"{', '.join(dead)} exited" if dead else f"not online after {timeout:.0f} s"
            raise FedxrayError(f"the federation did not come up: {why}; missing: {', '.join(missing) or '?'} "
                               f"(their logs: {fed.logs})")
        time.sleep(1.0)


def run(workdir: str | Path, settings: Settings, *, timeout: float = 900.0, app: str | None = None,
        on_line: Callable[[str], None] | None = None) -> RunOutcome:
    """Submit one run to the federation in `workdir` and wait for its end; the run is listed by `status`.
    `app`: a published app spec (signed apps, server/appsign.py) instead of the app folder."""
    fed = attach(workdir)
    entry = {"job": getattr(settings, "job", "train"), "output_dir": str(Path(settings.output_dir).resolve()),
             "submitted": _now()}
    outcome = fed.submit(settings, timeout=timeout, app=app, on_line=on_line)
    entry.update(state=outcome.status.get("state", "failed"), seconds=round(outcome.seconds, 1),
                 flower_run_id=outcome.status.get("run_id"), result=outcome.status.get("result"))
    state = read_state(workdir) or fed.state()
    state.setdefault("runs", []).append(entry)
    write_json(state_path(workdir), state)
    return outcome


def status(workdir: str | Path) -> dict:
    """Processes (running or not), the nodes Flower lists and the runs (Flower's list and ours)."""
    state = read_state(workdir)
    if state is None:
        return {"workdir": str(Path(workdir).resolve()), "up": False, "processes": [], "nodes": [], "runs": []}
    fed = LocalFederation.from_state(state)
    procs = [{"name": p.name, "pid": p.pid, "running": not p.exited} for p in fed.procs]
    link = fed.superlink
    up_now = link is not None and not link.exited
    listed, flower_runs = [], []
    if up_now:
        listed = nodes(fed)
        r = subprocess.run(["flwr", "ls", fed.connection, "--format", "json"], env=flower_env(fed.cli_home),
                           capture_output=True, text=True, timeout=60)
        try:
            flower_runs = json.loads(r.stdout).get("runs", [])
        except ValueError:
            flower_runs = []
    return {"workdir": str(fed.workdir), "up": up_now, "started": state.get("started"), "data": state.get("data"),
            "address": f"127.0.0.1:{fed.port}", "processes": procs, "nodes": listed,
            "flower_runs": [{"run_id": r["run-id"], "status": r["status"], "elapsed": r["elapsed"]}
                            for r in flower_runs],
            "runs": state.get("runs", [])}


def format_status(st: dict) -> str:
    if not st["processes"]:
        return f"no federation is up in {st['workdir']}"
    lines = [f"federation in {st['workdir']}: {'up' if st['up'] else 'DOWN'} (SuperLink {st.get('address')}, "
             f"started {st.get('started')}, data {st.get('data')})", "", "processes:"]
    lines += [f"  {p['name']:<26} pid {p['pid']:<8} {'running' if p['running'] else 'exited'}" for p in st["processes"]]
    lines += ["", f"nodes ({sum(n['status'] == 'online' for n in st['nodes'])} online):"]
    lines += [f"  {n['site']:<16} node {n['node_id']:<22} {n['status']}" for n in st["nodes"]] or ["  (none listed)"]
    lines += ["", "runs:"]
    flower = {str(r["run_id"]): r for r in st.get("flower_runs", [])}
    for r in st["runs"]:
        f = flower.pop(str(r.get("flower_run_id")), None)
        lines.append(f"  {r['submitted']}  {r['job']:<9} {r['state']:<7} {r.get('seconds', '?')} s  "
                     f"flower run {r.get('flower_run_id')}{' (' + f['status'] + ')' if f else ''}  -> "
                     f"{r['output_dir']}/{r.get('result') or ''}")
    lines += [f"  flower run {k}: {r['status']} ({r['elapsed']})" for k, r in flower.items()]
    if not st["runs"] and not flower:
        lines.append("  (none yet)")
    return "\n".join(lines)


def rotate_key(workdir: str | Path, site: str, *, timeout: float = 120.0) -> dict:
    """Give one hospital a new SuperNode key: stop its node, unregister its node id, write and register a new
    key pair, start the node with it and wait until it is online again. The old public key is kept beside the
    new one as `<site>.pub.retired-<time>` (the private half is overwritten); the other hospitals keep running."""
    from server.certs import make_node_key
    from server.security import register_node

    fed = attach(workdir)
    if site not in fed.hospitals:
        raise FedxrayError(f"no hospital {site!r} in this federation (hospitals: {', '.join(fed.hospitals)})")
    if not fed.security.supernode_auth or site not in fed.security.node_keys:
        raise FedxrayError("this federation runs without SuperNode authentication: there is no key to rotate "
                           "(`fedxray federation up` turns it on unless --no-supernode-auth)")
    env = flower_env(fed.cli_home)
    old_ids = [n["node_id"] for n in nodes(fed) if n["site"] == site]
    mine = [p for p in fed.procs if p.name in (f"supernode-{site}", f"superexec-{site}")]
    stop(mine)
    fed.procs = [p for p in fed.procs if p not in mine]
    for node_id in old_ids:
        r = subprocess.run(["flwr", "supernode", "unregister", node_id, fed.connection], env=env,
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise FedxrayError(f"could not unregister node {node_id} of {site}: {(r.stdout + r.stderr)[-500:]}")
    key = Path(fed.security.node_keys[site])
    pub = key.with_name(f"{key.name}.pub")
    if pub.is_file():
        pub.replace(pub.with_name(f"{pub.name}.retired-{time.strftime('%Y%m%dT%H%M%S')}"))
    _, new_pub = make_node_key(key.parent.parent, key.name, force=True)
    register_node(new_pub, fed.connection, env)
    fed.add_node(site, fed.hospitals[site])
    write_json(fed.state_file, fed.state())
    wait_online(fed, len(fed.hospitals), timeout)
    new_ids = [n["node_id"] for n in nodes(fed) if n["site"] == site and n["status"] == "online"]
    return {"site": site, "retired_node_ids": old_ids, "node_id": new_ids[-1] if new_ids else None,
            "public_key": str(new_pub)}


def log_files(workdir: str | Path) -> dict[str, Path]:
    """{process name: log file}: superlink, supernode-<site>, superexec-<site>, run (every run's stream)."""
    logs = Path(workdir).resolve() / "logs"
    return {p.stem: p for p in sorted(logs.glob("*.log"))} if logs.is_dir() else {}


def tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def down(workdir: str | Path, grace: float = 10.0) -> list[str]:
    """Stop everything `up` started in `workdir` (see the module docstring); returns what was running."""
    state = read_state(workdir)
    if state is None:
        return []
    fed = LocalFederation.from_state(state)
    running = fed.alive()
    token_pids = set(pids_with_token(state["token"]))
    known = {m.pid for p in fed.procs for m in p.running()}
    strays = [Proc.adopt({"name": f"stray[{pid}]", "pid": pid, "started": start_time(pid), "log": ""})
              for pid in sorted(token_pids - known)]
    stop([*reversed(fed.procs), *strays], grace=grace)
    left = pids_with_token(state["token"])
    if left:
        raise FedxrayError(f"could not stop every process of the federation in {fed.workdir}: pids {left} remain")
    state_path(workdir).replace(state_path(workdir).with_suffix(".down.json"))
    return running + [p.name for p in strays]


def launch(settings: Settings, *, workdir: str | Path | None = None, timeout: float = 900.0,
           security: "Security | None" = None, signing_key: str | Path | None = None,
           on_line: Callable[[str], None] | None = None, node_extra: dict[str, dict] | None = None) -> RunOutcome:
    """`up` + `run` + `down`: the hospital_* folders of settings.data.path as a federation for one run.

    security: None = TLS and SuperNode authentication, keys in <workdir>/certs. signing_key: an Ed25519 OpenSSH
    key (its .pub beside it): the app is signed, served by a loopback AppRegistry, and every node only runs it
    if it verifies."""
    import contextlib
    import tempfile

    from server.security import Security

    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedxray-launch-"))
    workdir.mkdir(parents=True, exist_ok=True)
    security = security or Security.generate(workdir / "certs", list(hospitals_in(settings.data.path)), auth=True)
    with contextlib.ExitStack() as stack:
        app = None
        if signing_key:
            from server.appsign import publish_signed

            app, security = publish_signed(stack, REPO, signing_key, security, workdir)
        stack.callback(down, workdir)
        up(settings.data.path, workdir, security=security, node_extra=node_extra,
           say=on_line and (lambda m: print(m, flush=True)))
        return run(workdir, settings, timeout=timeout, app=app, on_line=on_line)
