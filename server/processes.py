"""The processes a launcher starts, and only those: started, watched, stopped (psutil).

A Flower process starts others (the SuperLink its `flwr-serverapp`, a SuperNode its `flower-superexec` and one
`flwr-clientapp` per message), some in process groups of their own. So each started process keeps the family
of descendants it has been seen with (`Proc.refresh`, called while a run is watched and again before stopping):
`stop` ends exactly those, also when their parent died first and they were re-parented. Nothing is stopped by
matching a command line: a `--workdir` a user chose could name anyone's processes. psutil's Process objects pin
each pid's creation time, so a recycled pid is never signalled.

A federation that outlives its command (server/standing.py) records each process (`Proc.record`: pid and
start time) and a later command adopts it (`Proc.adopt`) only if both match. Processes whose recorded parent is
gone are found by the random token every process of that federation carries in its environment
(`TOKEN_ENV`, `pids_with_token`).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

TOKEN_ENV = "FEDXRAY_FEDERATION"   # set on every process a federation starts; its descendants inherit it


@dataclass
class Proc:
    """A process we started (`popen`), or one an earlier command started and recorded (`adopt`)."""
    name: str
    popen: subprocess.Popen | None
    log: Path
    family: dict[int, psutil.Process] = field(default_factory=dict)   # the process and every descendant seen
    pid: int = 0

    def __post_init__(self):
        if self.popen is not None:
            self.pid = self.popen.pid
            try:
                self.family[self.pid] = psutil.Process(self.pid)
            except psutil.NoSuchProcess:
                pass
        self.refresh()

    def record(self) -> dict:
        """What `adopt` needs to find this very process again from another command: pid + start time."""
        return {"name": self.name, "pid": self.pid, "started": start_time(self.pid), "log": str(self.log)}

    @classmethod
    def adopt(cls, record: dict) -> "Proc":
        """The recorded process, if it still runs AND is the same process (same start time: a recycled pid
        is someone else's); else a Proc with an empty family, which counts as exited."""
        proc = cls(record["name"], None, Path(record["log"]), pid=int(record["pid"]))
        started = start_time(proc.pid)
        if started is not None and started == record.get("started"):
            try:
                proc.family[proc.pid] = psutil.Process(proc.pid)
                proc.refresh()
            except psutil.Error:
                pass
        return proc

    def refresh(self) -> None:
        """Remember every current descendant of every family member (cheap: a few /proc reads)."""
        for p in list(self.family.values()):
            try:
                for child in p.children(recursive=True):
                    self.family.setdefault(child.pid, child)
            except psutil.Error:
                continue

    def running(self) -> list[psutil.Process]:
        """Family members still running (zombies waiting to be reaped do not count)."""
        out = []
        for p in self.family.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def poll(self) -> int | None:
        """The exit code once the process has exited (common.net.wait_http watches this); an adopted process's
        exit code is unknown to us (-1)."""
        if self.popen is not None:
            return self.popen.poll()
        root = self.family.get(self.pid)
        try:
            return None if root is not None and root.is_running() and root.status() != psutil.STATUS_ZOMBIE else -1
        except psutil.Error:
            return -1

    @property
    def returncode(self) -> int | None:
        return self.poll()

    @property
    def exited(self) -> bool:
        return self.poll() is not None


def start_time(pid: int) -> str | None:
    """When the process started, exactly and stably across commands: Linux's start time in clock ticks since
    boot (/proc/PID/stat field 22). psutil's create_time() adds a boot time it re-derives in each process,
    which was seen 1 s apart between two commands on one machine. Elsewhere: create_time() rounded to seconds."""
    try:
        return "ticks:" + Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        pass
    try:
        return f"s:{round(psutil.Process(pid).create_time())}"
    except psutil.Error:
        return None


def start(name: str, cmd: list[str], env: dict, log_dir: Path, cwd: Path | None = None) -> Proc:
    """Start `cmd` with its output appended to <log_dir>/<name>.log, in its own session (a terminal's Ctrl-C
    reaches the launcher, which stops its processes in order)."""
    log = log_dir / f"{name}.log"
    fh = open(log, "ab")
    try:
        p = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    finally:
        fh.close()
    return Proc(name, p, log)


def _end(members: list[psutil.Process], grace: float) -> None:
    """SIGTERM them all at once, SIGKILL what outlives `grace` seconds, wait until they are gone."""
    for m in members:
        try:
            m.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(members, timeout=grace)
    for m in left:
        try:
            m.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)


def stop(procs: list[Proc], grace: float = 10.0) -> None:
    """Stop every process of these families (see the module docstring) and reap the ones we started."""
    for p in procs:
        p.refresh()
    _end([m for p in procs for m in p.running()], grace)
    for p in procs:
        if p.popen is None:
            continue
        try:
            p.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def pids_with_token(token: str) -> list[int]:
    """This user's processes whose environment carries TOKEN_ENV=token: every process a federation started and
    every descendant, also one re-parented after its parent died. The token is random per federation, and other
    users' environments are not readable, so this names only our own processes."""
    out, me = [], psutil.Process().pid
    for p in psutil.process_iter(["pid", "uids"]):
        try:
            if p.info["pid"] == me or p.info["uids"].real != os.getuid():
                continue
            if p.environ().get(TOKEN_ENV) == token and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.info["pid"])
        except psutil.Error:
            continue
    return out


def stop_tree(pid: int, grace: float = 10.0) -> None:
    """Stop a process we did not start through `start` (e.g. a CLI run by a test) and all its descendants."""
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    except psutil.Error:
        members = [root]
    _end(members, grace)


def pids_with_arg(fragment: str, *, zombies: bool = True) -> list[int]:
    """Processes (not this one) whose command line contains `fragment`: for tests and checks that nothing is
    left running, never to decide what to stop. `zombies=False` leaves out exited, unreaped ones."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["pid"] == psutil.Process().pid or not p.info["cmdline"]:
                continue
            if fragment in " ".join(p.info["cmdline"]) and (zombies or p.info["status"] != psutil.STATUS_ZOMBIE):
                out.append(p.info["pid"])
        except psutil.Error:
            continue
    return out


def describe(pid: int) -> str:
    try:
        return f"pid {pid} ({' '.join(psutil.Process(pid).cmdline()[:3])})"
    except psutil.Error:
        return f"pid {pid}"
