"""Both Flower runtimes as real processes on loopback, started and - always - stopped again.

* `LocalFederation`: the deployment topology without Docker: `flower-superlink` + one `flower-supernode`
  per hospital (its own data folder via --node-config, its own FLWR_HOME and port), then
  `flwr run <app> <connection>` submits the run. docker-compose.yml describes the same topology.
* `run_flwr_simulation`: `flwr run <app> --stream` against Flower's managed local simulation SuperLink,
  on private ports and a private FLWR_HOME, and stops that detached SuperLink afterwards.

Every process starts in its own session (process group) and is stopped by group id: SIGTERM, then SIGKILL.
`python -m server.launch --data data/synth` (or `fedxray launch`) runs the deployment topology end to end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.data.sources import site_folders
from common.errors import FedxrayError
from server.federation import FLOWER_ENV

if TYPE_CHECKING:
    from server.security import Security

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path, ray_tmp: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for a Flower process: local-only, no runtime installs, this venv's executables first."""
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home), **extra}
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # default 1 s before each ClientApp starts
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_run_config(path: Path, run_config: dict) -> Path:
    """Overrides as a TOML file: `--run-config FILE.toml` avoids every shell-quoting problem."""
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
    return path


def node_config(values: dict) -> str:
    """`--node-config` text; strings as TOML literal strings ('...') where they allow it."""
    def val(v):
        return f"'{v}'" if isinstance(v, str) and "'" not in v else toml_value(v)
    return " ".join(f"{k}={val(v)}" for k, v in values.items())


def superlink_command(host: str, port: int, database: str, transport: list[str] | None = None) -> list[str]:
    """`transport`: Security.superlink_args() (TLS, auth); LocalFederation always passes it explicitly."""
    return ["flower-superlink", *(transport or ["--insecure"]), "--host", host, "--port", str(port),
            "--database", database]


def supernode_command(superlink: str, port: int, data_path: str, site: str,
                      transport: list[str] | None = None) -> list[str]:
    """One hospital: its own data folder and site name travel in the node config, nothing else."""
    return ["flower-supernode", *(transport or ["--insecure"]), "--superlink", superlink, "--port", str(port),
            "--node-config", node_config({"data-path": data_path, "site": site})]


def add_connection(flwr_home: Path, name: str, address: str, transport: str = "insecure = true\n") -> None:
    """A `[superlink.<name>]` entry in $FLWR_HOME/config.toml (where Flower 1.42 keeps connections)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    cfg = flwr_home / "config.toml"
    text = cfg.read_text() if cfg.is_file() else ('[superlink]\ndefault = "local"\n\n'
                                                  '[superlink.local]\naddress = ":local:"\n')
    if f"[superlink.{name}]" not in text:
        text += f'\n[superlink.{name}]\naddress = "{address}"\n{transport}'
    cfg.write_text(text)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path


def start(name: str, cmd: list[str], env: dict, log_dir: Path, cwd: Path | None = None) -> Proc:
    log = log_dir / f"{name}.log"
    fh = open(log, "ab")
    try:
        p = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    finally:
        fh.close()
    return Proc(name, p, log)


def stop_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group led by `pid`, SIGKILL what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def pids_with_arg(fragment: str, *, zombies: bool = True) -> list[int]:
    """Processes (not us) whose command line contains `fragment` (e.g. our private FLWR_HOME path);
    `zombies=False` leaves out those that have exited and wait to be reaped."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if fragment in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") and (
                        zombies or ") Z " not in (d / "stat").read_text()):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def wait_http(url: str, timeout: float, proc: Proc | None = None, context=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise FedxrayError(f"{proc.name} exited with code {proc.popen.returncode}; see {proc.log}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise FedxrayError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class RunOutcome:
    returncode: int
    seconds: float
    log: Path
    output_dir: Path
    status: dict = field(default_factory=dict)
    summary: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status.get("state") == "done" and self.summary is not None


def _outcome(rc: int, seconds: float, log: Path, output_dir: Path) -> RunOutcome:
    status_f, summary_f = output_dir / "status.json", output_dir / "federation.json"
    status = json.loads(status_f.read_text()) if status_f.is_file() else {}
    summary = json.loads(summary_f.read_text()) if status.get("state") == "done" and summary_f.is_file() else None
    return RunOutcome(rc, seconds, log, output_dir, status, summary)


def flwr_run(app_dir: Path, args: list[str], env: dict, log: Path, timeout: float) -> tuple[int, float]:
    """`flwr run` in its own process group; killed (group) when it outlives `timeout`."""
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        p = subprocess.Popen(["flwr", "run", str(app_dir), *args, "--stream"], env=env, stdout=fh,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = 124
        finally:
            stop_group(p.pid, grace=5)
    return rc, time.perf_counter() - t0


def _absolute(run_config: dict) -> dict:
    out = dict(run_config)
    for k in ("data-path", "server-data-path", "output-dir"):
        if out.get(k):
            out[k] = str(Path(out[k]).expanduser().resolve())
    return out


# ------------------------------------------------------------------------------------------- deployment
class LocalFederation:
    """SuperLink + one SuperNode per hospital on 127.0.0.1; a context manager that always cleans up."""

    def __init__(self, workdir: str | Path, hospitals: dict[str, str], *, app_dir: Path = REPO,
                 security: "Security | None" = None):
        from server.security import Security

        self.workdir = Path(workdir).resolve()
        self.hospitals, self.app_dir = hospitals, Path(app_dir).resolve()
        # TLS unless told otherwise (Security.insecure()): a fresh CA for localhost in <workdir>/certs
        self.security = security or Security.generate(self.workdir / "certs", list(hospitals))
        self.logs = self.workdir / "logs"
        self.procs: list[Proc] = []
        self.stopped: list[Proc] = []   # kept so that alive() can still check them after stop()
        self.port = 0
        self.connection = "fedxray-local"

    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        link_home = self.workdir / "superlink"
        link_home.mkdir(parents=True, exist_ok=True)
        sec = self.security
        link = start("superlink", superlink_command("127.0.0.1", self.port, str(link_home / "state.db"),
                                                    sec.superlink_args()),
                     flower_env(link_home, **sec.superlink_env()), self.logs, cwd=self.workdir)
        self.procs.append(link)
        wait_http(f"{sec.scheme}://127.0.0.1:{self.port}/health", timeout, link, sec.ssl_context())
        self.cli_home = self.workdir / "cli"
        add_connection(self.cli_home, self.connection, f"127.0.0.1:{self.port}", sec.connection_toml())
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
        cmd = supernode_command(f"127.0.0.1:{self.port}", free_port(), str(Path(data_path).resolve()), name,
                                self.security.supernode_args(name, **transport))
        proc = start(f"supernode-{name}", cmd, flower_env(home), self.logs, cwd=self.workdir)
        self.procs.append(proc)
        return proc

    def submit(self, run_config: dict, timeout: float = 900.0, app: str | None = None) -> RunOutcome:
        """Submit the app with these run-config overrides, stream its log to logs/run.log, wait for the end.
        `app`: a published app spec (`@fedxray/fedxray==0.1.0`, signed apps) instead of the app folder."""
        run_config = _absolute(run_config)
        overrides = write_run_config(self.workdir / "run-config.toml", run_config)
        log = self.logs / "run.log"
        rc, secs = flwr_run(app or self.app_dir, [self.connection, "--run-config", str(overrides)],
                            flower_env(self.cli_home), log, timeout)
        out = Path(run_config.get("output-dir", self.app_dir / "runs" / "demo"))
        return _outcome(rc, secs, log, out)

    def stop(self) -> None:
        """SIGTERM every group at once (supernodes first), then wait; SIGKILL what outlives the grace time."""
        for p in reversed(self.procs):
            try:
                os.killpg(p.popen.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for p in reversed(self.procs):
            stop_group(p.popen.pid)
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.stopped.extend(self.procs)
        self.procs.clear()
        _kill_stragglers(str(self.workdir))

    def alive(self) -> list[str]:
        """What is still running of this federation: every process it ever started (also after `stop`) and
        any other process whose command line names its work folder. Empty after a clean `stop`."""
        names = [p.name for p in (*self.stopped, *self.procs) if p.popen.poll() is None]
        ours = {p.popen.pid for p in (*self.stopped, *self.procs)}
        return names + [_describe(pid) for pid in pids_with_arg(str(self.workdir), zombies=False) if pid not in ours]


def _describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return f"pid {pid} ({' '.join(c.decode(errors='ignore') for c in cmd[:3])})"
    except OSError:
        return f"pid {pid}"


def _kill_stragglers(marker: str, wait: float = 10.0) -> None:
    """SIGKILL any process whose command line names our work folder (e.g. a flwr-serverapp that Flower
    started in a process group of its own), then wait until they are gone."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        left = pids_with_arg(marker, zombies=False)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)


def hospitals_in(root: str | Path) -> dict[str, str]:
    """{site name: folder} for a folder of hospital_* sites (the synthetic layout)."""
    sites = site_folders(Path(root))
    if not sites:
        raise FedxrayError(f"{root}: no hospital folders found (expected e.g. hospital_1/, hospital_2/ as written "
                           "by `fedxray data synth`)")
    key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
    return {p.name: str(p) for p in sorted(sites, key=key)}


def launch(data_root: str | Path, run_config: dict | None = None, *, workdir: str | Path | None = None,
           timeout: float = 900.0, security: "Security | None" = None, signing_key: str | Path | None = None
           ) -> RunOutcome:
    """Deployment runtime end to end: start superlink + a supernode per hospital, run, stop everything.

    security: None = TLS with a fresh CA in <workdir>/certs. signing_key: an Ed25519 OpenSSH key (its .pub
    beside it): the app is signed, served by a loopback AppRegistry, and every node only runs it if it verifies.
    """
    import contextlib

    from server.security import Security

    hospitals = hospitals_in(data_root)
    rc = {"data-path": str(data_root), "min-available-nodes": len(hospitals), "min-train-nodes": len(hospitals),
          "min-evaluate-nodes": len(hospitals), **(run_config or {})}
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedxray-launch-"))
    security = security or Security.generate(workdir / "certs", list(hospitals))
    with contextlib.ExitStack() as stack:
        app = None
        if signing_key:
            from server.appsign import publish_signed

            app, security = publish_signed(stack, REPO, signing_key, security, workdir)
        fed = stack.enter_context(LocalFederation(workdir, hospitals, security=security))
        return fed.submit(rc, timeout=timeout, app=app)


# ------------------------------------------------------------------------------------------- simulation
def run_flwr_simulation(run_config: dict, *, num_supernodes: int, workdir: str | Path, app_dir: Path = REPO,
                        cpus_per_client: int = 1, timeout: float = 900.0) -> RunOutcome:
    """`flwr run <app> --stream` on Flower's local simulation SuperLink (private ports and FLWR_HOME), then
    stop that detached SuperLink: `flwr` leaves it running on purpose, a test or script must not."""
    workdir = Path(workdir).resolve()
    home, logs = workdir / "flwr-home", workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = flower_env(home, ray_tmp, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                     FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    run_config = _absolute(run_config)
    overrides = write_run_config(workdir / "run-config.toml", run_config)
    log = logs / "run.log"
    try:
        rc, secs = flwr_run(app_dir, ["--run-config", str(overrides), "--federation-config",
                                      f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"],
                            env, log, timeout)
    finally:
        for pid in pids_with_arg(str(home / "local-superlink")):
            stop_group(pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return _outcome(rc, secs, log, Path(run_config.get("output-dir", app_dir / "runs" / "demo")))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m server.launch", description=__doc__.split("\n\n")[0])
    add_launch_arguments(p)
    return run_launch_command(p.parse_args(argv))


def add_launch_arguments(p) -> None:
    p.add_argument("--data", default="data/synth", help="folder of hospital_* sites (+ holdout/ for the server)")
    p.add_argument("--out", default="runs/deploy", help="output-dir of the run (bundle, federation.json)")
    p.add_argument("--rounds", type=int, default=None, help="num-server-rounds")
    p.add_argument("--workdir", default=None, help="logs and Flower state (default: a new temp folder)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the run is stopped")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run-config key")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS (default: TLS with a CA)")
    p.add_argument("--certs", default=None, help="folder from `fedxray certs` (default: a fresh CA in the workdir)")
    p.add_argument("--supernode-auth", action="store_true",
                   help="only registered hospital keys may connect (keys from --certs/nodes or generated)")
    p.add_argument("--sign-with", default=None, metavar="KEY",
                   help="Ed25519 app-signing key (`fedxray certs --signing-key`): nodes run only the signed app")


def run_launch_command(a) -> int:
    from common.cli import parse_overrides

    rc = {"output-dir": a.out, **parse_overrides(a.set)}
    if a.rounds:
        rc["num-server-rounds"] = a.rounds
    from server.security import Security

    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="fedxray-launch-"))
    if a.insecure:
        if a.supernode_auth or a.sign_with:
            raise FedxrayError("--insecure cannot be combined with --supernode-auth or --sign-with")
        security = Security.insecure()
    else:
        security = Security.generate(a.certs or workdir / "certs", list(hospitals_in(a.data)), auth=a.supernode_auth)
    outcome = launch(a.data, rc, workdir=workdir, timeout=a.timeout, security=security, signing_key=a.sign_with)
    if not outcome.ok:
        msg = outcome.status.get("message") or f"flwr run exited with {outcome.returncode}"
        raise FedxrayError(f"federated run did not finish: {msg} (log: {outcome.log})")
    print(outcome.summary.get("table", ""))
    print(f"\nbundle: {outcome.summary['bundle']}\nlogs: {outcome.log.parent}  ({outcome.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FedxrayError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
