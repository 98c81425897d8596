"""common.net (free port, waiting until a URL answers) and common.process_memory (peaks of a process tree), on
real processes and a real HTTP server on loopback."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from common.errors import FedxrayError
from common.net import free_port, wait_http
from common.process_memory import PeakMemory, peak_rss

MiB = 2**20


def _http_server(status: int, body: bytes = b""):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], **kw)


def test_wait_http_returns_once_the_url_answers_200():
    srv = _http_server(200)
    try:
        wait_http(f"http://127.0.0.1:{srv.server_port}/ready", timeout=10)
    finally:
        srv.shutdown()


def test_wait_http_fails_at_once_when_the_process_exits_and_quotes_its_log(tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = _python("import sys; print('bad setting FEDXRAY_X'); sys.exit(3)", stdout=out)
    t0 = time.monotonic()
    with pytest.raises(FedxrayError) as e:
        wait_http(f"http://127.0.0.1:{free_port()}/ready", 20, proc, name="fedxray serve", log=log, log_tail=500)
    assert time.monotonic() - t0 < 10  # the exit is noticed, not the 20 s timeout
    msg = str(e.value)
    assert msg.startswith("fedxray serve exited with code 3") and str(log) in msg and "bad setting FEDXRAY_X" in msg


def test_wait_http_gives_up_after_the_timeout_on_a_live_process_or_a_503(tmp_path):
    proc = _python("import time; time.sleep(60)")
    try:
        with pytest.raises(FedxrayError, match=r"did not answer 200 within 1 s$"):
            wait_http(f"http://127.0.0.1:{free_port()}/ready", 1, proc)
    finally:
        proc.kill()
        proc.wait()
    srv = _http_server(503, b"loading")  # answering, but not ready
    try:
        with pytest.raises(FedxrayError, match=r"did not answer 200 within 1 s \(last answer 503: loading\)"):
            wait_http(f"http://127.0.0.1:{srv.server_port}/ready", 1)
    finally:
        srv.shutdown()


_HOLD = "import sys, time; b = b'x' * ({mb} * 2**20); {then}; print('ready', flush=True); time.sleep(60)"


def test_peak_rss_is_the_high_water_mark_not_the_current_rss():
    if not sys.platform.startswith("linux"):
        pytest.skip("the kernel's high-water mark (VmHWM) is Linux's")
    proc = _python(_HOLD.format(mb=300, then="del b"), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        now = psutil.Process(proc.pid).memory_info().rss
        assert peak_rss(proc.pid) > 290 * MiB > now + 200 * MiB, (peak_rss(proc.pid), now)
    finally:
        proc.kill()
        proc.wait()


def test_peak_memory_counts_the_children_and_their_roles():
    with PeakMemory(interval=0.1, role=lambda p: "child" if p.pid != psutil.Process().pid else None) as mem:
        proc = _python(_HOLD.format(mb=200, then="pass"), stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.5)  # a few samples while the child holds its 200 MiB
        finally:
            proc.kill()
            proc.wait()
    own = psutil.Process().memory_info().rss
    assert mem.peak > own + 190 * MiB, (mem.peak, own)
    assert set(mem.by_role) == {"child"} and mem.by_role["child"] > 190 * MiB
