"""`fedxray serve` as a child process on a free loopback port: for the tests and benchmarks that need the real
server (uvicorn, the streamed upload parser, the process's own memory) rather than an in-process client."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from common.net import free_port, wait_http


@contextlib.contextmanager
def serving(bundle: Path, log_dir: Path, env: dict | None = None, timeout: float = 90,
            grace: float = 20) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the server on `bundle` with `env` added to this process's environment, wait until /ready answers
    200 (FedxrayError quoting its log when it exits or is not ready within `timeout` s), yield (base URL, Popen);
    always stop it afterwards (SIGTERM, SIGKILL after `grace` s). Its output goes to <log_dir>/serve-<port>.log."""
    port = free_port()
    log = Path(log_dir) / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedxray", "serve", "--bundle", str(bundle), "--port",
                                 str(port), "--log-level", "warning"], env={**os.environ, **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/ready", timeout, proc, name="fedxray serve", log=log, log_tail=3000)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
