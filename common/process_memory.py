"""Peak resident memory of a process and everything it started (Ray workers, Flower's subprocesses), via psutil.

`resource.getrusage` sees only this process (or children already waited for), while Flower runs ClientApps in
Ray workers and subprocesses; what a machine has to hold is the whole tree. Two measures:
- `peak_rss(pid)`: the kernel's own high-water mark for one process (VmHWM on Linux), which no sampling misses;
- `PeakMemory`: samples the tree every `interval` s for the largest sum held at once (`peak`), and, given a
  `role` function, the largest high-water mark per kind of process (`by_role`).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import psutil


def family(root: psutil.Process) -> list[psutil.Process]:
    """`root` and its descendants now (none when `root` has gone)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def peak_rss(pid: int) -> int:
    """Bytes: the process's high-water mark of resident memory. psutil has no call for it, so it is read from
    /proc/<pid>/status (Linux); elsewhere the current RSS stands in."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process(pid).memory_info().rss


class PeakMemory:
    """Context manager (or start()/stop()) sampling the process tree of `root` (default: this process).

    `peak` (bytes) is the largest total RSS of the tree seen in one sample; `by_role` maps `role(process)` to the
    largest peak_rss of any process of that role (only when `role` is given; a role of None is left out)."""

    def __init__(self, interval: float = 0.5, root: int | None = None,
                 role: Callable[[psutil.Process], str | None] | None = None):
        self.interval, self.role = interval, role
        self.root = psutil.Process(root)
        self.peak = 0
        self.by_role: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedxray-peak-memory", daemon=True)

    def sample(self) -> None:
        total = 0
        for p in family(self.root):
            try:
                if p.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped: holds no memory, has no command
                    continue
                total += p.memory_info().rss
                if self.role is not None and (kind := self.role(p)) is not None:
                    self.by_role[kind] = max(self.by_role.get(kind, 0), peak_rss(p.pid))
            except psutil.Error:  # it ended between listing and reading
                continue
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def start(self) -> PeakMemory:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    def by_role_mb(self) -> dict[str, int]:
        return {k: round(v / 2**20) for k, v in sorted(self.by_role.items())}
