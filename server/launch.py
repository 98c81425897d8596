"""Both Flower runtimes as real processes on loopback, started and - always - stopped again.

* `LocalFederation`: the deployment topology without Docker: `flower-superlink` + one `flower-supernode`
  per hospital (its own data folder via --node-config, its own FLWR_HOME and port), then
  `flwr run <app> <connection>` submits the run. docker-compose.yml describes the same topology.
* `run_flwr_simulation`: `flwr run <app> --stream` against Flower's managed local simulation SuperLink,
  on private ports and a private FLWR_HOME, and stops that detached SuperLink afterwards.

Processes are tracked and stopped by server/processes.py (each with the descendants it was seen with). The
run's stream is written to logs/run.log and its per-round progress lines are printed as they come. When the run
ends without the ServerApp saying so (the SuperLink died, the run timed out), the launcher marks status.json
failed with the cause. Rerunning with the same --workdir and output folder resumes from the checkpoint.
server/standing.py keeps a LocalFederation running between commands (`fedxray federation up|run|down`);
`fedxray launch --profile demo` is its up + run + down.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

from common.data.sources import site_folders
from common.errors import FedxrayError
from common.fileio import write_atomic, write_json
from common.net import free_port, wait_http
from common.settings import Settings, nest
from server.federation import FLOWER_ENV, absolute_paths
from server.processes import TOKEN_ENV, Proc, pids_with_arg, start, stop, stop_tree

if TYPE_CHECKING:
    from server.security import Security

REPO = Path(__file__).resolve().parents[1]


def flower_env(flwr_home: Path, ray_tmp: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for a Flower process: local-only, no runtime installs, this venv's executables first."""
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home), **extra}
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # default 1 s before each ClientApp starts
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def write_run_config(path: Path, run_config: dict) -> Path:
    """The run config as a TOML file: `--run-config FILE.toml` avoids every shell-quoting problem."""
    path.write_text(tomli_w.dumps(nest(run_config)))
    return path


def node_config(values: dict) -> str:
    """`--node-config` text (Flower's `k=v k2=v2`, values as TOML): strings as literal strings where they can be."""
    def val(v):
        return f"'{v}'" if isinstance(v, str) and "'" not in v else tomli_w.dumps({"v": v})[4:].strip()
    return " ".join(f"{k}={val(v)}" for k, v in values.items())


def superlink_command(host: str, port: int, database: str, transport: list[str] | None = None) -> list[str]:
    """`transport`: Security.superlink_args() (TLS, auth); LocalFederation always passes it explicitly."""
    return ["flower-superlink", *(transport or ["--insecure"]), "--host", host, "--port", str(port),
            "--database", database]


EXECUTORS = ("warm", "subprocess")


def supernode_command(superlink: str, port: int, data_path: str, site: str,
                      transport: list[str] | None = None, *, executor: str = "warm",
                      superexec_secret: str | None = None, **node: str) -> list[str]:
    """One hospital: its own data folder and site name (and, from its operator, e.g. `site-policy`, `log-file`)
    travel in the node config, nothing else. `executor="warm"`: the SuperNode leaves starting ClientApps to
    `superexec_command` (`--isolation process`); "subprocess": Flower starts a cold `flwr-clientapp` per message."""
    isolation = ["--isolation", "process", "--superexec-auth-secret-file", superexec_secret] \
        if executor == "warm" else []
    return ["flower-supernode", *(transport or ["--insecure"]), "--superlink", superlink, "--port", str(port),
            *isolation, "--node-config", node_config({"data-path": data_path, "site": site, **node})]


def superexec_command(port: int, parent_pid: int, superexec_secret: str) -> list[str]:
    """The hospital's warm SuperExec (fedxray/warm_exec.py) for the SuperNode whose Runtime API is on `port`:
    loopback HTTP as Flower's own SuperExec uses it, and requests signed with the node's SuperExec secret."""
    return [sys.executable, "-m", "fedxray.warm_exec", "--runtime-api-address", f"127.0.0.1:{port}", "--insecure",
            "--parent-pid", str(parent_pid), "--superexec-auth-secret-file", superexec_secret]


def write_superexec_secret(path: Path) -> Path:
    """32 random bytes shared by one SuperNode and its SuperExec, readable by this user only."""
    return write_atomic(path, os.urandom(32))


def add_connection(flwr_home: Path, name: str, address: str, transport: dict | None = None) -> None:
    """Set the `[superlink.<name>]` entry of $FLWR_HOME/config.toml (where Flower 1.42 keeps connections) to this
    address and transport, replacing what an earlier launch left there (a restarted SuperLink has a new port)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    cfg = flwr_home / "config.toml"
    data = tomllib.loads(cfg.read_text()) if cfg.is_file() else {
        "superlink": {"default": "local", "local": {"address": ":local:"}}}
    data.setdefault("superlink", {})[name] = {"address": address, **(transport or {"insecure": True})}
    cfg.write_text(tomli_w.dumps(data))


@dataclass
class RunOutcome:
    returncode: int
    seconds: float
    log: Path
    output_dir: Path
    status: dict = field(default_factory=dict)
    summary: dict | None = None
    cause: str = ""          # why it ended badly, when the ServerApp could not say so itself

    @property
    def ok(self) -> bool:
        return self.status.get("state") == "done" and self.summary is not None

    def failure(self) -> str:
        return self.status.get("message") or self.cause or f"flwr run exited with {self.returncode}"


def _outcome(rc: int, seconds: float, log: Path, output_dir: Path, cause: str = "") -> RunOutcome:
    """Read status.json and its `result` file (federation.json for training, server/jobs.py for the other jobs);
    a run the ServerApp left 'starting'/'running' is marked failed."""
    status_f = output_dir / "status.json"
    status = json.loads(status_f.read_text()) if status_f.is_file() else {}
    summary_f = output_dir / str(status.get("result") or "federation.json")
    if status.get("state") != "done":
        cause = cause or _last_error(log) or f"flwr run exited with {rc}"
        if status.get("state") in (None, "starting", "running"):
            from server.app import write_status

            output_dir.mkdir(parents=True, exist_ok=True)
            write_status(output_dir, "failed", message=cause, error="RunAborted",
                         **{k: status[k] for k in ("run_id", "round", "rounds") if k in status})
            status = json.loads(status_f.read_text())
    summary = json.loads(summary_f.read_text()) if status.get("state") == "done" and summary_f.is_file() else None
    return RunOutcome(rc, seconds, log, output_dir, status, summary, cause)


_ERROR_LINE = re.compile(r"(ERROR|Error|error:|Exception|refused|failed)")


def _last_error(log: Path, lines: int = 400) -> str:
    """The last line of a Flower log that names an error, without Flower's level prefix."""
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    for line in reversed(tail):
        if _ERROR_LINE.search(line) and "Traceback" not in line:
            return re.sub(r"^\s*(ERROR|WARNING|INFO)\s*:\s*", "", line).strip()[:500]
    return ""


def flwr_run(app_dir: Path | str, args: list[str], env: dict, log: Path, timeout: float, *,
             on_line: Callable[[str], None] | None = None, watch: list[Proc] = (),
             give_up: Callable[[], bool] = lambda: False) -> tuple[int, float]:
    """`flwr run ... --stream`: its output appended to `log` and handed line by line to `on_line`; the processes
    in `watch` are refreshed while it runs (their families stay known); stopped when it outlives `timeout` or
    `give_up()` turns true (the SuperLink died: the run cannot go on, however long flwr would retry)."""
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8", errors="replace") as fh:
        p = subprocess.Popen(["flwr", "run", str(app_dir), *args, "--stream"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

        def pump():
            for line in p.stdout:
                fh.write(line)
                fh.flush()
                if on_line is not None:
                    on_line(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        rc = None
        try:
            while rc is None and time.monotonic() < deadline:
                try:
                    rc = p.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    for w in watch:
                        w.refresh()
                    if give_up():
                        time.sleep(2)          # let flwr print its own error first
                        rc = p.poll() if p.poll() is not None else 1
            if rc is None:
                rc = 124
        finally:
            stop_tree(p.pid, grace=5)
            reader.join(timeout=5)
    return rc, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- deployment
class LocalFederation:
    """SuperLink + one SuperNode per hospital on 127.0.0.1; a context manager that always cleans up.

    `node_extra`: per hospital, node-config keys its operator sets (e.g. {"hospital_1": {"site-policy": ...}})."""

    def __init__(self, workdir: str | Path, hospitals: dict[str, str], *, app_dir: Path = REPO,
                 security: "Security | None" = None, node_extra: dict[str, dict] | None = None,
                 executor: str = "warm", state_file: Path | None = None):
        from server.security import Security

        if executor not in EXECUTORS:
            raise FedxrayError(f"unknown ClientApp executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
        self.executor = executor

        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)   # keys, logs and Flower state: this user's
        self.hospitals, self.app_dir = hospitals, Path(app_dir).resolve()
        self.node_extra = node_extra or {}
        # TLS unless told otherwise (Security.insecure()): a fresh CA for localhost in <workdir>/certs
        self.security = security or Security.generate(self.workdir / "certs", list(hospitals))
        self.logs = self.workdir / "logs"
        self.procs: list[Proc] = []
        self.stopped: list[Proc] = []   # kept so that alive() can still check them after stop()
        self.port = 0
        self.connection = "fedxray-local"
        self.cli_home = self.workdir / "cli"
        self.token = uuid.uuid4().hex        # in every process's environment (server/processes.py: TOKEN_ENV)
        self.state_file = state_file         # server/standing.py: rewritten as each process starts
        self.extra_state: dict = {}          # what else the state file keeps (server/standing.py)

    def _env(self, home: Path, **extra: str) -> dict[str, str]:
        return flower_env(home, **{TOKEN_ENV: self.token}, **extra)

    def _track(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        if self.state_file is not None:
            write_json(self.state_file, self.state())
        return proc

    def state(self) -> dict:
        """Everything another command needs to attach to this federation (server/standing.py reads it back)."""
        return {"token": self.token, "workdir": str(self.workdir), "hospitals": self.hospitals,
                "app_dir": str(self.app_dir), "executor": self.executor, "node_extra": self.node_extra,
                "port": self.port, "connection": self.connection, "cli_home": str(self.cli_home),
                "security": self.security.to_json(), "processes": [p.record() for p in self.procs],
                **self.extra_state}

    @classmethod
    def from_state(cls, state: dict, state_file: Path | None = None) -> "LocalFederation":
        """The federation another command started, its processes adopted (server/processes.py: Proc.adopt)."""
        from server.security import Security

        fed = cls(state["workdir"], state["hospitals"], app_dir=Path(state["app_dir"]),
                  security=Security.from_json(state["security"]), node_extra=state.get("node_extra"),
                  executor=state["executor"], state_file=state_file)
        fed.token, fed.port, fed.connection = state["token"], int(state["port"]), state["connection"]
        fed.cli_home = Path(state["cli_home"])
        fed.procs = [Proc.adopt(r) for r in state["processes"]]
        fed.extra_state = {k: v for k, v in state.items() if k not in fed.state()}
        return fed

    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def superlink(self) -> Proc | None:
        return next((p for p in self.procs if p.name == "superlink"), None)

    def start(self, timeout: float = 60.0) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        link_home = self.workdir / "superlink"
        link_home.mkdir(parents=True, exist_ok=True)
        database = link_home / "state.db"
        if database.exists():
            # A SuperLink that died leaves its nodes "online" in its database until their heartbeat times out
            # (about a minute), and refuses to activate them again before. The run's progress is in the
            # ServerApp's checkpoint, so a restart starts on a fresh database and keeps the old one beside it.
            database.replace(link_home / "state.db.previous")
        sec = self.security
        link = self._track(start("superlink", superlink_command("127.0.0.1", self.port, str(database),
                                                                sec.superlink_args()),
                                 self._env(link_home, **sec.superlink_env()), self.logs, cwd=self.workdir))
        wait_http(f"{sec.scheme}://127.0.0.1:{self.port}/health", timeout, link, sec.ssl_context())
        add_connection(self.cli_home, self.connection, f"127.0.0.1:{self.port}", sec.connection())
        if sec.supernode_auth:  # only registered hospitals' keys may connect
            from server.security import register_node

            for name in self.hospitals:
                register_node(f"{sec.node_keys[name]}.pub", self.connection, flower_env(self.cli_home))
        for name, path in self.hospitals.items():
            self.add_node(name, path)

    def add_node(self, name: str, data_path: str | Path, **transport) -> Proc:
        """Start one hospital's SuperNode (`transport`: Security.supernode_args options, e.g. trust_ca=False)."""
        home = self.workdir / "supernodes" / name
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        secret = str(write_superexec_secret(home / "superexec.secret")) if self.executor == "warm" else None
        cmd = supernode_command(f"127.0.0.1:{self.port}", port, str(Path(data_path).resolve()), name,
                                self.security.supernode_args(name, **transport), executor=self.executor,
                                superexec_secret=secret, **self.node_extra.get(name, {}))
        proc = self._track(start(f"supernode-{name}", cmd, self._env(home), self.logs, cwd=self.workdir))
        if secret is not None:
            self._track(start(f"superexec-{name}", superexec_command(port, proc.pid, secret), self._env(home),
                              self.logs, cwd=self.workdir))
        return proc

    def submit(self, settings: Settings, timeout: float = 900.0, app: str | None = None,
               on_line: Callable[[str], None] | None = None) -> RunOutcome:
        """Submit the app with these settings as its whole run config, stream its log to logs/run.log (and each
        line to `on_line`), wait for the end. `app`: a published app spec (`@fedxray/fedxray==0.1.0`, signed
        apps) instead of the app folder."""
        settings = absolute_paths(settings)
        overrides = write_run_config(self.workdir / "run-config.toml", settings.to_run_config())
        log = self.logs / "run.log"
        link = self.superlink
        from server.appsign import stage_app

        app = app or stage_app(self.app_dir, self.workdir / "app")   # `flwr run` builds its FAB in ms, not s
        rc, secs = flwr_run(app, [self.connection, "--run-config", str(overrides)],
                            self._env(self.cli_home), log, timeout, on_line=on_line, watch=self.procs,
                            give_up=lambda: link is not None and link.exited)
        out = Path(settings.output_dir)
        cause = ""
        if link is not None and link.exited:
            cause = f"the SuperLink exited with code {link.returncode} during the run (see {link.log})"
        elif rc == 124:
            cause = f"the run did not finish within {timeout:.0f} s and was stopped"
        return _outcome(rc, secs, log, out, cause)

    def stop(self) -> None:
        """Stop every process this federation started, with every descendant it was seen with."""
        stop(list(reversed(self.procs)))
        self.stopped.extend(self.procs)
        self.procs.clear()

    def alive(self) -> list[str]:
        """What is still running of this federation: each process it ever started or saw started by one of its
        processes (also after `stop`). Empty after a clean `stop`."""
        out = []
        for p in (*self.stopped, *self.procs):
            p.refresh()
            out += [p.name if m.pid == p.pid else f"{p.name}/{m.name()}[{m.pid}]" for m in p.running()]
        return out


def hospitals_in(root: str | Path) -> dict[str, str]:
    """{site name: folder} for a folder of hospital_* sites (the synthetic layout)."""
    sites = site_folders(Path(root))
    if not sites:
        raise FedxrayError(f"{root}: no hospital folders found (expected e.g. hospital_1/, hospital_2/ as written "
                           "by `fedxray data synth`)")
    key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
    return {p.name: str(p) for p in sorted(sites, key=key)}


# ------------------------------------------------------------------------------------------- simulation
def run_flwr_simulation(settings: Settings, *, num_supernodes: int, workdir: str | Path, app_dir: Path = REPO,
                        cpus_per_client: int = 1, timeout: float = 900.0,
                        on_line: Callable[[str], None] | None = None) -> RunOutcome:
    """`flwr run <app> --stream` on Flower's local simulation SuperLink (private ports and FLWR_HOME), then
    stop that detached SuperLink: `flwr` leaves it running on purpose, a test or script must not. It is not our
    child (flwr starts it detached), so it is found by the private FLWR_HOME its command line names."""
    workdir = Path(workdir).resolve()
    home, logs = workdir / "flwr-home", workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = flower_env(home, ray_tmp, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                     FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    settings = absolute_paths(settings)
    overrides = write_run_config(workdir / "run-config.toml", settings.to_run_config())
    log = logs / "run.log"
    try:
        from server.appsign import stage_app

        rc, secs = flwr_run(stage_app(app_dir, workdir / "app"), ["--run-config", str(overrides), "--federation-config",
                                      f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"],
                            env, log, timeout, on_line=on_line)
    finally:
        for pid in pids_with_arg(str(home / "local-superlink")):
            stop_tree(pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return _outcome(rc, secs, log, Path(settings.output_dir))
