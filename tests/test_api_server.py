"""The inference API as a real `fedxray serve` process on loopback (uvicorn, no test client in between): the
streamed upload cap stops reading early, the server's memory stays bounded under the oversized batch, and
schemathesis `--checks all` over its OpenAPI schema (bounded examples, fixed seed)."""
from __future__ import annotations

import asyncio
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import psutil
import pytest

from benchmarks.image_files import png
from common.process_memory import peak_rss
from inference_api.local_server import serving
from tests.inference_support import trained_bundle, xray

pytestmark = pytest.mark.integration
CAP = 1_000_000
KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bundle = trained_bundle(tmp_path_factory)
    env = {"FEDXRAY_MAX_UPLOAD_BYTES": str(CAP), "FEDXRAY_API_KEY": KEY, "FEDXRAY_MAX_PIXELS": "40000000",
           "FEDXRAY_MIN_RESOLUTION": "32"}
    with serving(bundle, tmp_path_factory.mktemp("server"), env) as (url, proc):
        yield url, proc


def _connect(url: str) -> socket.socket:
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)  # little client-side slack
    return s


def _read_answer(s: socket.socket, first: bytes = b"") -> bytes:
    """The whole HTTP answer: headers, then Content-Length bytes of body (it may come in several segments)."""
    data = first
    s.settimeout(10)
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return data
        try:
            more = s.recv(65536)
        except (ConnectionResetError, socket.timeout):  # the server closed the socket it stopped reading
            return data
        if not more:
            return data
        data += more


def _head(extra: str) -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary=b0undary\r\n{extra}\r\n").encode()


PART = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'


def test_chunked_upload_above_the_cap_is_cut_off_while_streaming(server):
    """No Content-Length: the server must answer 413 once the cap is passed and stop reading, not swallow 64 MB."""
    url, _ = server
    total, chunk = 64 * 2**20, bytes(64 * 1024)
    s = _connect(url)
    sent, answer = 0, b""
    try:
        s.sendall(_head("Transfer-Encoding: chunked\r\n") + b"%x\r\n%s\r\n" % (len(PART), PART))
        while sent < total:
            if select.select([s], [], [], 0)[0]:
                answer = s.recv(65536)
                break
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = _read_answer(s, answer)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"upload_too_large" in answer and b"1,000,000 bytes" in answer
    # what the client got out before the answer: the cap plus what loopback's socket buffers hold, far below 64 MB
    assert sent < CAP + 16 * 2**20, sent


def test_declared_length_above_the_cap_is_refused_before_the_body(server):
    url, _ = server
    s = _connect(url)
    try:
        s.sendall(_head(f"Content-Length: {50 * CAP}\r\n") + PART)  # the 50 MB body never comes
        s.settimeout(5)
        answer = _read_answer(s, s.recv(65536))  # a server that waited for the body would time out here
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"upload_too_large" in answer, answer[:200]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak is the kernel's VmHWM (Linux)")
def test_memory_stays_bounded_under_the_oversized_batch(server):
    """The issue's request (16 all-zero 6300x6300 PNGs, 603 KB) took 11-12 GB: now bounded by the budgets."""
    url, proc = server
    headers = {"X-API-Key": KEY}
    zero = png(np.zeros((6300, 6300)))  # ~40 KB each: the pixels, not the bytes, are the threat
    with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
        assert c.post("/v1/predict", files={"file": ("w.png", png(xray(96)), "image/png")}).status_code == 200
    idle = psutil.Process(proc.pid).memory_info().rss

    async def send(n: int):
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as c:
            return await c.post("/v1/predict/batch", files=[("files", (f"{i}.png", zero, "image/png"))
                                                            for i in range(n)])

    async def burst():
        return await asyncio.gather(send(16), send(16), send(4), send(4))  # two oversized, two within budget

    big16a, big16b, four_a, four_b = asyncio.run(burst())
    for r in (big16a, big16b):
        assert r.status_code == 413 and r.json()["code"] == "too_many_pixels", r.text
    for r in (four_a, four_b):  # 4 x 39.7 Mpx < 160 Mpx: decoded (at most 2 at once), then refused as blank
        assert r.status_code == 200 and [it["error"]["code"] for it in r.json()["items"]] == ["near_constant"] * 4
    peak = peak_rss(proc.pid)
    bound = 2**30  # the stated bound: idle + 1 GiB (decode budget 768 MiB + upload budget 256 MiB)
    assert peak - idle < bound, f"peak {peak / 2**20:.0f} MiB, idle {idle / 2**20:.0f} MiB"


@pytest.mark.skipif(shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None,
                    reason="schemathesis is not installed (pip install -e '.[dev]')")
def test_schemathesis_all_checks(server, tmp_path):
    url, _ = server
    exe = str(Path(sys.executable).parent / "schemathesis")
    config = Path(__file__).with_name("schemathesis.toml")
    cmd = [exe, "--config-file", str(config), "--no-color", "run", f"{url}/openapi.json", "--checks", "all",
           "--max-examples", "40", "--seed", "20261201", "--generation-deterministic", "-H", f"X-API-Key: {KEY}",
           "--request-timeout", "30"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                         env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    assert "6 selected" in text and " passed" in text, text[-2000:]
    assert time.monotonic() - t0 < 200
