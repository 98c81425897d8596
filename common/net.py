"""Loopback plumbing for the processes fedxray starts (a SuperLink and its SuperNodes, `fedxray serve`): a free
port to give one, and waiting until it answers over HTTP, failing with the reason when it never does."""
from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

from common.errors import FedxrayError


class Exits(Protocol):
    """A started process as wait_http watches it: subprocess.Popen, or server.processes.Proc."""

    def poll(self) -> int | None: ...


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; another process could still take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, process: Exits | None = None, context=None, *, name: str | None = None,
              log: Path | None = None, log_tail: int = 0) -> None:
    """Poll `url` until it answers 200. Raises FedxrayError at once when `process` exits (naming its exit code),
    and after `timeout` seconds (with the last answer, if any); both name `log` and, with `log_tail`, quote its
    last that many characters.
    `name` and `log` default to the process's own attributes of that name (server.processes.Proc has both)."""
    name = name or getattr(process, "name", None) or "the process"
    log = log or getattr(process, "log", None)
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        if process is not None and (code := process.poll()) is not None:
            raise FedxrayError(f"{name} exited with code {code}" + _see(log, log_tail))
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                if r.status == 200:
                    return
                last = f"{r.status}"
        except urllib.error.HTTPError as e:  # answering, not ready: say what it answered (e.g. /ready's detail)
            last = f"{e.code}: {_body(e)}"
        except (OSError, http.client.HTTPException):  # not listening yet, or a half-open answer
            pass
        time.sleep(0.3)
    raise FedxrayError(f"{url} did not answer 200 within {timeout:.0f} s" + (f" (last answer {last})" if last else "")
                       + _see(log, log_tail))


def _body(answer, limit: int = 300) -> str:
    try:
        return answer.read(limit).decode(errors="replace").strip()
    except (OSError, http.client.HTTPException):
        return ""


def _see(log: Path | None, tail: int) -> str:
    if log is None:
        return ""
    text = ""
    if tail:
        try:
            text = Path(log).read_text(errors="replace")[-tail:].strip()
        except OSError:
            pass
    return f"; see {log}" + (f"; it ends:\n{text}" if text else "")
