"""The inference API under load: `fedxray serve` in a subprocess with an API key (uvicorn, the upload parser, the
decoders, the input gate, the micro-batcher: the product's own path), POST /v1/predict with a 512 px PNG.

- 8 concurrent closed-loop clients' images/s vs the model's batched throughput measured in the same run: the
  forward the server runs (its /ready names it), built here the same way, at batch 8 on preprocessed tensors.
  The two are measured in alternating phases so load from other processes hits both alike.
- 32 clients: p50 / p95 / p99 latency (informational) and errors / requests (goal: 0).
- The server's peak RSS (VmHWM) over the run, beside its RSS idle with the model loaded.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.suite import Row


async def closed_loop_load(url: str, key: str, upload: bytes, clients: int, seconds: float) -> dict:
    """`clients` closed-loop clients for `seconds`: images done, wall seconds, latencies (ms), errors."""
    import httpx

    lat: list[float] = []
    errors: Counter = Counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers={"X-API-Key": key}) as c:
        stop = time.monotonic() + seconds

        async def client():
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/predict", files={"file": ("x.png", upload, "image/png")})
                    if r.status_code == 200:
                        lat.append((time.perf_counter() - t0) * 1000)
                    else:
                        errors[f"http {r.status_code}"] += 1
                except httpx.HTTPError as e:
                    errors[type(e).__name__] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return {"done": len(lat), "seconds": time.perf_counter() - t0, "lat": lat, "errors": errors}


class BatchedModel:
    """The server's forward at batch `batch` on preprocessed tensors: images/s accumulated over short phases."""

    def __init__(self, bundle_dir: Path, forward: str, batch: int = 8):
        import torch

        from common.bundle import load_bundle
        from inference_api.forward import build

        b = load_bundle(bundle_dir)
        s = b.preprocess.image_size
        self.forward = build(b.model, forward, image_size=s, channels=b.preprocess.channels,
                             multilabel=b.multilabel)
        self.x = torch.randn(batch, b.preprocess.channels, s, s)
        self.images, self.seconds = 0, 0.0
        self.forward(self.x)  # warm-up

    def phase(self, seconds: float) -> None:
        t0 = time.perf_counter()
        while True:
            self.forward(self.x)
            self.images += len(self.x)
            if time.perf_counter() - t0 >= seconds:
                break
        self.seconds += time.perf_counter() - t0

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def rows(quick: bool) -> list[Row]:
    os.environ.setdefault("TQDM_DISABLE", "1")
    import httpx
    import psutil

    from benchmarks.inference import make_bundle, upload_png
    from common.process_memory import peak_rss
    from inference_api.local_server import serving

    arch, size, phases, phase_s, load32_s = ("smallcnn", 64, 2, 0.6, 1.0) if quick else ("resnet50", 224, 4, 3.0, 8.0)
    key = secrets.token_urlsafe(16)
    upload = upload_png(512)
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = make_bundle(Path(tmp), arch, size, 14)
        logs = Path(tmp) / "logs"
        logs.mkdir()
        env = {"FEDXRAY_API_KEY": key, "FEDXRAY_MIN_RESOLUTION": "1"}
        with serving(bundle_dir, logs, env, timeout=240) as (url, proc):
            forward = httpx.get(url + "/ready").json().get("forward") or "eager"
            idle_rss = psutil.Process(proc.pid).memory_info().rss   # now (VmHWM would include the export on load)
            asyncio.run(closed_loop_load(url, key, upload, 8, 1.0 if quick else 3.0))  # warm-up under load
            model = BatchedModel(bundle_dir, forward)
            done, secs, lat8, err8 = 0, 0.0, [], Counter()
            for _ in range(phases):
                r = asyncio.run(closed_loop_load(url, key, upload, 8, phase_s))
                done, secs, lat8, err8 = done + r["done"], secs + r["seconds"], lat8 + r["lat"], err8 + r["errors"]
                model.phase(phase_s)
            r32 = asyncio.run(closed_loop_load(url, key, upload, 32, load32_s))
            peak = peak_rss(proc.pid)
            log = next(logs.glob("serve-*.log")).read_text(errors="replace")
    rate8 = done / secs
    p = np.percentile(r32["lat"], [50, 95, 99]) if r32["lat"] else [None] * 3
    requests32 = r32["done"] + sum(r32["errors"].values())
    setting = f"{arch} {size} px, forward {forward}, 512 px PNG uploads, API key"
    announced = next((ln for ln in log.splitlines() if "forward:" in ln and "ready" in ln), "")
    out = [Row("API, 8 concurrent clients: images/s", rate8, "img/s", model.rate,
               f"the server's forward ({forward}) at batch 8", goal_min=0.85,
               detail={"requests": done, "errors": dict(err8), "p50_ms": float(np.percentile(lat8, 50)) if lat8
                       else None, "setting": setting, "server_announced": announced})]
    for q, v in zip(("p50", "p95", "p99"), p):
        out.append(Row(f"API, 32 concurrent clients: {q} latency", None if v is None else float(v), "ms",
                       detail={"requests": r32["done"], "setting": setting}))
    errors = sum(r32["errors"].values()) + sum(err8.values())
    out.append(Row("API, 8 and 32 clients: errors / requests", float(errors), "", float(requests32 + done + sum(
        err8.values())), "requests", goal_max=0.0, detail={"which": dict(r32["errors"] + err8)}))
    out.append(Row("API peak RSS under load (VmHWM)", peak / 2**20, "MiB", idle_rss / 2**20,
                   "idle with the model loaded", detail={"setting": setting}))
    return out
