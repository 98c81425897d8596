"""Inference speed on this CPU: predict, heatmaps (one-pass CAM vs pytorch-grad-cam) and the server under load.

    .venv/bin/python benchmarks/inference.py [--arch resnet50] [--size 224] [--findings 14] [--iters 20]
        [--clients 8] [--seconds 20] [--upload-side 512]

Random-init weights (timing does not depend on them). Rows: p50/p95 over --iters rounds after warm-up; every
round runs every path once (interleaved, so load from other processes hits all rows alike):
- plain forward: model(x), batch 1, inference mode: the reference;
- predict: a preprocessed image through the Predictor (queue hop to the worker thread, forward, probabilities);
- predict from bytes: PNG bytes -> decode -> preprocess -> Predictor -> findings table (what the API does
  in-process, without HTTP);
- predict + all heatmaps (fast): the same single forward pass plus all findings' maps at S x S;
- predict + all heatmaps, overlays: plus a colour overlay PNG per finding (what explain=findings=all returns);
- pytorch-grad-cam, once per finding: GradCAM for each finding (forward + backward each).
Throughput: --clients concurrent HTTP clients against `fedxray serve` in a subprocess, vs model(x) at batch 8,
measured in alternating phases.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import table  # noqa: E402
from common.errors import FedxrayError  # noqa: E402
from inference_api.local_server import serving  # noqa: E402

CXR14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
         "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def interleaved(paths: dict, iters: int, warmup: int = 3) -> dict[str, tuple[float, float]]:
    """p50/p95 ms per path, running the paths round-robin so load from other processes hits all alike."""
    for _ in range(warmup):
        for fn in paths.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(iters):
        for k, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: (float(np.percentile(v, 50)), float(np.percentile(v, 95))) for k, v in times.items()}


def timeit(fn, iters: int, warmup: int = 3) -> tuple[float, float]:
    return interleaved({"x": fn}, iters, warmup)["x"]


def make_bundle(out: Path, arch: str, size: int, n: int) -> Path:
    import torch

    from common.bundle import save_bundle
    from common.settings import ModelConfig, PreprocessConfig
    from common.models import build_model

    torch.manual_seed(0)
    mc = ModelConfig(arch=arch, weights="none")
    model = build_model(mc, n).eval()
    findings = (CXR14 * 2)[:n] if n <= 14 else [f"finding_{i}" for i in range(n)]
    return save_bundle(out / "bundle", model, model_config=mc, preprocess=PreprocessConfig(image_size=size),
                       findings=findings, thresholds=[0.5] * n)


def upload_png(side: int) -> bytes:
    from PIL import Image

    from common.data.synthetic import Acquisition, render

    img, _ = render(side, {"Nodule", "Effusion"}, np.random.default_rng(0), Acquisition())
    buf = BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def latency_rows(bundle_dir: Path, iters: int, upload: bytes) -> tuple[list[list], dict]:
    import torch

    from common.bundle import load_bundle
    from common.explain import grad_cam_maps, normalise_cams, render_overlay
    from inference_api.predictor import Predictor
    from inference_api.service import Service

    bundle = load_bundle(bundle_dir)
    model = bundle.model
    svc = Service(bundle, max_pixels=60_000_000, min_resolution=1, overlay_max_side=512)
    prepared = svc.prepare(upload)
    x = prepared.x
    n, s = len(bundle.findings), bundle.preprocess.image_size

    def forward():
        with torch.inference_mode():
            model(x[None])

    with Predictor(bundle, max_batch=8, batch_window_s=0.005) as pred:
        def predict():
            pred.submit(x).result()

        def predict_bytes():
            p = svc.prepare(upload)
            svc.findings_table(pred.submit(p.x).result().probabilities)

        def fast_maps():
            o = pred.submit(x, want_cams=True).result()
            normalise_cams(o.cams, (s, s))

        def fast_overlays():
            p = svc.prepare(upload, keep_side=512)  # what the API keeps when overlays are asked for
            o = pred.submit(p.x, want_cams=True).result()
            for c in range(n):
                render_overlay(p.image.pixels, o.cams[c], max_side=512,
                               original_size=(p.image.width, p.image.height))

        out = interleaved({"forward": forward, "predict": predict, "predict_bytes": predict_bytes,
                           "fast": fast_maps, "fast_overlays": fast_overlays,
                           "gradcam": lambda: grad_cam_maps(model, x[None], list(range(n)), "gradcam")}, iters)

    fwd = out["forward"][0]
    labels = [
        ("plain model(x) forward, batch 1 (reference)", "forward"),
        ("predict: preprocessed image -> probabilities (Predictor)", "predict"),
        (f"predict from PNG bytes ({prepared.image.width}x{prepared.image.height}): decode+preprocess+predict",
         "predict_bytes"),
        (f"predict + all {n} heatmaps, fast one-pass CAM (maps at {s}x{s})", "fast"),
        (f"predict from PNG bytes + all {n} heatmaps as overlay PNGs (fast)", "fast_overlays"),
        (f"pytorch-grad-cam GradCAM, once per finding ({n} calls)", "gradcam"),
    ]
    rows = [[name, out[k][0], out[k][1], out[k][0] / fwd] for name, k in labels]
    return rows, {k: v[0] for k, v in out.items()}


class ModelRate:
    """model(x) images/s per batch size, accumulated over short phases (interleaved with the server's)."""

    def __init__(self, bundle_dir: Path, batches: tuple[int, ...] = (1, 8)):
        import torch

        from common.bundle import load_bundle

        bundle = load_bundle(bundle_dir)
        self.model, s = bundle.model, bundle.preprocess.image_size
        self.xs = {b: torch.randn(b, 3, s, s) for b in batches}
        self.done = {b: [0, 0.0] for b in batches}
        self.phase(0.0)  # warm-up: one pass per batch size

    def phase(self, seconds: float) -> None:
        import torch

        with torch.inference_mode():
            for b, x in self.xs.items():
                t0 = time.perf_counter()
                self.model(x)
                n = b
                while time.perf_counter() - t0 < seconds:
                    self.model(x)
                    n += b
                if seconds:
                    self.done[b][0] += n
                    self.done[b][1] += time.perf_counter() - t0

    def rate(self, b: int) -> float:
        n, t = self.done[b]
        return n / t


async def _load(url: str, upload: bytes, clients: int, seconds: float) -> tuple[int, float, list[float]]:
    """`clients` closed-loop clients for `seconds`: (requests done, elapsed seconds, latencies ms)."""
    import httpx

    done, lat = 0, []
    stop = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient):
        nonlocal done
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await c.post(url + "/v1/predict", files={"file": ("x.png", upload, "image/png")})
            r.raise_for_status()
            lat.append((time.perf_counter() - t0) * 1000)
            done += 1

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        return done, time.perf_counter() - t0, lat


def throughput(bundle_dir: Path, upload: bytes, clients: int, seconds: float, env_extra: dict,
               phases: int = 5) -> dict:
    """Server under `clients` concurrent clients vs model(x), in alternating phases so load hits both alike."""
    import httpx

    env = {"FEDXRAY_MIN_RESOLUTION": "1", **env_extra}
    logs = Path(tempfile.mkdtemp(prefix="fedxray-bench-serve-"))  # kept: the error names the server's log
    with serving(bundle_dir, logs, env, timeout=120) as (url, _):
        post = lambda: httpx.post(url + "/v1/predict", files={"file": ("x.png", upload, "image/png")})  # noqa: E731
        single = timeit(post, 15)
        asyncio.run(_load(url, upload, clients, 2.0))  # warm-up under load
        model = ModelRate(bundle_dir)
        done, secs, lat = 0, 0.0, []
        for _ in range(phases):
            d, t, l_ = asyncio.run(_load(url, upload, clients, seconds / phases))
            done, secs, lat = done + d, secs + t, lat + l_
            model.phase(seconds / phases)
        return {"rps": done / secs, "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                "single_p50": single[0], "single_p95": single[1], "b1": model.rate(1), "b8": model.rate(8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--findings", type=int, default=14)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--upload-side", type=int, default=512, help="side of the PNG the clients upload")
    ap.add_argument("--batch-window-ms", type=float, default=None, help="server setting (default: its own)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads here and in the server (FEDXRAY_THREADS); 1 is far steadier on a busy host")
    ap.add_argument("--skip-server", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = make_bundle(Path(tmp), a.arch, a.size, a.findings)
        upload = upload_png(a.upload_side)
        rows, med = latency_rows(bundle_dir, a.iters, upload)
        print(table(["path", "p50 ms", "p95 ms", "x forward p50"], rows,
                    title=f"{a.arch} at {a.size} px, {a.findings} findings, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average at start "
                          f"{os.getloadavg()[0]:.1f}"))
        print(f"\nheatmaps for all findings: fast path {med['gradcam'] / med['fast']:.1f}x faster than "
              f"pytorch-grad-cam once per finding; fast path / plain forward = {med['fast'] / med['forward']:.2f}; "
              f"predict / plain forward = {med['predict'] / med['forward']:.2f}")
        if a.skip_server:
            return
        env = {"FEDXRAY_BATCH_WINDOW_MS": str(a.batch_window_ms)} if a.batch_window_ms is not None else {}
        if a.threads:
            env["FEDXRAY_THREADS"] = str(a.threads)
        try:
            srv = throughput(bundle_dir, upload, a.clients, a.seconds, env)
        except FedxrayError as e:  # the server never answered /ready: no throughput to report
            raise SystemExit(f"benchmarks/inference.py: the server did not come up: {e}") from None
        b1, b8 = srv["b1"], srv["b8"]
        print()
        print(table(["throughput (interleaved phases)", "images/s", "vs batched model"], [
            ["model(x) batch 1", b1, b1 / b8],
            ["model(x) batch 8 = the model's batched throughput", b8, 1.0],
            [f"server, {a.clients} concurrent clients, {a.upload_side}px PNG uploads, p50 "
             f"{srv['p50']:.0f} ms / p95 {srv['p95']:.0f} ms", srv["rps"], srv["rps"] / b8],
        ], title="Throughput"))
        print(f"\nsingle HTTP client, end to end (upload, decode, predict, JSON): p50 {srv['single_p50']:.1f} ms, "
              f"p95 {srv['single_p95']:.1f} ms; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
