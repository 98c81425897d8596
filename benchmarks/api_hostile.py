"""The inference API as a hostile outside tester meets it: a malformed-upload corpus, non-X-rays, every format,
the oversized batch (16 all-zero 6300x6300 PNGs), and load at 8 and 32 clients, against `fedxray serve` in a
subprocess with an API key (the product's own code path: uvicorn, the upload parser, the decoders, the gate).

    .venv/bin/python benchmarks/api_hostile.py [--bundle runs/demo/bundle] [--seconds 15] [--clients 8 32]

Prints: per group of cases, cases sent and 2xx/4xx/5xx/connection errors; the server's RSS (idle, after,
and its peak VmHWM) around the corpus and the oversized batches; then req/s, p50/p95/p99 and errors per
client count. Goal: zero 5xx and zero connection errors; the peak under idle + 1 GiB.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import REPO, table  # noqa: E402
from benchmarks.image_files import compressed_dicom, dicom_bytes, patch_png_size, pil_bytes, png  # noqa: E402
from common.errors import FedxrayError  # noqa: E402
from common.process_memory import peak_rss  # noqa: E402
from inference_api.local_server import serving  # noqa: E402


# ------------------------------------------------------------------------------------------- the corpus


def _pil(arr: np.ndarray, fmt: str, frames: int = 1, **kw) -> bytes:
    from PIL import Image

    return pil_bytes([Image.fromarray((np.clip(np.roll(arr, 7 * i, axis=1), 0, 1) * 255).astype(np.uint8), mode="L")
                      for i in range(frames)], fmt, **kw)


def corpus(size: int, seed: int = 0) -> dict[str, list[tuple[str, dict]]]:
    """group -> [(case name, httpx request kwargs)]; every request goes to POST /v1/predict unless it says."""
    from PIL import Image

    from common.data.synthetic import Acquisition, render

    rng = np.random.default_rng(seed)
    chest, _ = render(size, {"Nodule", "Effusion"}, rng, Acquisition())
    chest[0, 0], chest[0, 1] = 0.0, 1.0  # its own range = the bit range, as a film's labels/collimation give
    good = png(chest)
    v12 = (np.round(chest * 2047) * 2).astype(np.uint16)

    def f(data: bytes, name="x.png", ctype="image/png", **kw):
        return {"files": {"file": (name, data, ctype)}, **kw}

    g: dict[str, list] = {}
    g["valid X-rays"] = [("png8", f(good)), ("png16", f(png(chest, 16))),
                         ("jpeg", f(_pil(chest, "JPEG", quality=92), "x.jpg", "image/jpeg")),
                         ("dicom", f(dicom_bytes(v12, bits_stored=12), "x.dcm", "application/dicom")),
                         ("dicom slope 2, halved", f(dicom_bytes(v12 // 2, bits_stored=12, RescaleSlope=2,
                                                                 RescaleIntercept=0), "y.dcm", "application/dicom")),
                         ("dicom MONOCHROME1", f(dicom_bytes(4094 - v12, bits_stored=12, pi="MONOCHROME1"), "z.dcm",
                                                 "application/dicom")),
                         ("explain all", f(good, params={"findings": "all"})),
                         ("lateral (warns)", f(dicom_bytes(v12, bits_stored=12, ViewPosition="LL"), "l.dcm"))]
    gradient = np.zeros((size, size, 3), np.uint8)
    gradient[..., 0], gradient[..., 2] = np.linspace(0, 255, size)[None], np.linspace(255, 0, size)[:, None]
    buf = BytesIO()
    Image.fromarray(gradient).save(buf, "PNG")
    strip = np.tile(chest[:, : size // 2].mean(axis=1, keepdims=True), (1, 4000))[:64]
    g["non-X-rays (gate)"] = [("uniform noise", f(png(rng.random((size, size))))),
                              ("colour gradient", f(buf.getvalue())), ("all white", f(png(np.ones((size, size))))),
                              ("all black", f(png(np.zeros((size, size))))), ("inverted", f(png(1 - chest))),
                              ("strip 64x4000", f(png(strip))),
                              ("gray gradient", f(png(np.tile(np.linspace(0, 1, size), (size, 1)))))]
    g["formats"] = [(fmt, f(_pil(chest, fmt, **kw), f"x.{fmt.lower()}", f"image/{fmt.lower()}"))
                    for fmt, kw in (("TIFF", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("GIF", {}))]
    g["formats"] += [(f"{fmt} 3 frames", f(_pil(chest, fmt, 3, **kw), f"x.{fmt.lower()}", f"image/{fmt.lower()}"))
                     for fmt, kw in (("GIF", {}), ("PNG", {}), ("TIFF", {}), ("WEBP", {"lossless": True}))]
    multi = dicom_bytes(np.stack([v12, v12]), bits_stored=12, NumberOfFrames=2)
    g["malformed uploads"] = [
        ("zero bytes", f(b"")), ("text", f(b"not an image " * 20, "a.txt", "application/octet-stream")),
        ("truncated png", f(good[: len(good) // 2])), ("truncated jpeg", f(_pil(chest, "JPEG")[:400], "x.jpg")),
        ("png header 60000x60000", f(patch_png_size(good, 60000, 60000))),
        ("png header 9000x9000", f(patch_png_size(good, 9000, 9000))),
        ("jpeg 2000 dicom, garbage", f(compressed_dicom(size=64), "j.dcm", "application/dicom")),
        ("multi-frame dicom", f(multi, "m.dcm", "application/dicom")),
        ("10,000-char filename", f(good, "x" * 10_000 + ".png")),
        ("pdf content type", f(good, "x.pdf", "application/pdf")),
        ("text part, no filename", {"data": {"file": "hello"}, "files": {"other": ("o.png", good, "image/png")}}),
        ("no file field", {"files": {"other": ("x.png", good, "image/png")}}),
        ("json body", {"json": {"image": "x"}}),
        ("broken multipart", {"content": b"--xx\r\nbroken", "headers": {"content-type": "multipart/form-data; "
                                                                                          "boundary=xx"}}),
        ("300 parts", {"files": [("files", (f"{i}.png", b"x", "image/png")) for i in range(300)],
                       "path": "/v1/predict/batch"}),
        ("17 files", {"files": [("files", (f"{i}.png", good, "image/png")) for i in range(17)],
                      "path": "/v1/predict/batch"}),
        ("bad method", f(good, params={"method": "magic"})), ("bad finding", f(good, params={"findings": "Fracture"})),
        ("bad bool", f(good, params={"explain": "maybe"})),
        ("no key", f(good, headers={"X-API-Key": ""})), ("wrong key", f(good, headers={"X-API-Key": "nope"})),
        ("GET on POST route", {"method": "GET"}), ("unknown path", {"method": "GET", "path": "/v2/x"}),
        ("explain unknown finding", f(good, path="/v1/explain/Fracture")),
    ]
    seeds = [good, png(chest, 16), _pil(chest, "JPEG"), dicom_bytes(v12, bits_stored=12)]
    fuzzed = []
    pyrng = random.Random(seed)
    for k in range(200):
        data = bytearray(seeds[k % len(seeds)])
        for _ in range(pyrng.randint(1, 30)):
            data[pyrng.randrange(len(data))] = pyrng.randrange(256)
        if k % 3 == 0:
            data = data[: pyrng.randint(1, len(data))]
        fuzzed.append((f"mutation {k}", f(bytes(data), ctype="application/octet-stream")))
    g["random corruptions"] = fuzzed
    return g


async def send_all(url: str, key: str, groups: dict) -> tuple[list[list], list[str]]:
    rows, notes = [], []
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        for group, cases in groups.items():
            counts: Counter = Counter()
            for name, kw in cases:
                kw = dict(kw)
                method, path = kw.pop("method", "POST"), kw.pop("path", "/v1/predict")
                kw["headers"] = {"X-API-Key": key, **kw.get("headers", {})}
                try:
                    r = await c.request(method, path, **kw)
                    counts[f"{r.status_code // 100}xx"] += 1
                    if r.status_code >= 500:
                        notes.append(f"5xx: {group} / {name}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    counts["conn"] += 1
                    notes.append(f"connection error: {group} / {name}: {type(e).__name__}")
            rows.append([group, len(cases), counts["2xx"], counts["4xx"], counts["5xx"], counts["conn"]])
    return rows, notes


async def oversized(url: str, key: str, n_batches: int, files: int) -> list[tuple[int, str, float]]:
    zero = png(np.zeros((6300, 6300)))

    async def one():
        async with httpx.AsyncClient(base_url=url, timeout=300, headers={"X-API-Key": key}) as c:
            t0 = time.perf_counter()
            r = await c.post("/v1/predict/batch", files=[("files", (f"{i}.png", zero, "image/png"))
                                                         for i in range(files)])
            body = r.json()
            code = body.get("code") or ",".join(sorted({it["error"]["code"] for it in body.get("items", [])
                                                        if it.get("error")}))
            return r.status_code, code, time.perf_counter() - t0

    return await asyncio.gather(*(one() for _ in range(n_batches)))


async def load(url: str, key: str, upload: bytes, clients: int, seconds: float) -> list:
    """One table row: the suite's closed-loop load (benchmarks/sections/api.py) at `clients` clients."""
    from benchmarks.sections.api import closed_loop_load

    r = await closed_loop_load(url, key, upload, clients, seconds)
    lat, errors = r["lat"], r["errors"]
    p = np.percentile(lat, [50, 95, 99]) if lat else [float("nan")] * 3
    return [clients, len(lat), round(len(lat) / r["seconds"], 1), round(p[0]), round(p[1]), round(p[2]),
            sum(errors.values()), ", ".join(f"{k}: {v}" for k, v in errors.items()) or "-"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "runs" / "demo" / "bundle"))
    ap.add_argument("--seconds", type=float, default=15.0, help="per load phase")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--size", type=int, default=512, help="side of the valid uploads")
    a = ap.parse_args()
    bundle = Path(a.bundle)
    if not (bundle / "model.json").is_file():
        raise SystemExit(f"no bundle at {bundle}: run `.venv/bin/fedxray demo` first (or pass --bundle)")
    key = secrets.token_urlsafe(16)
    logs = Path(tempfile.mkdtemp(prefix="fedxray-hostile-"))
    with contextlib.ExitStack() as stack:
        try:
            url, proc = stack.enter_context(serving(bundle, logs, {"FEDXRAY_API_KEY": key}, timeout=180))
        except FedxrayError as e:
            raise SystemExit(f"the server did not come up: {e}") from None
        ps = psutil.Process(proc.pid)
        groups = corpus(a.size)
        idle = ps.memory_info().rss
        rows, notes = asyncio.run(send_all(url, key, groups))
        after_corpus, peak_corpus = ps.memory_info().rss, peak_rss(proc.pid)
        batch_rows = []
        for label, n, files in (("16 x 6300x6300 zeros (603 KB)", 1, 16), ("two such batches at once", 2, 16),
                                ("4 x 6300x6300 (within the request budget)", 1, 4),
                                ("two such at once", 2, 4)):
            t0 = time.perf_counter()
            res = asyncio.run(oversized(url, key, n, files))
            batch_rows.append([label, " ".join(str(s) for s, _, _ in res), " ".join(sorted({c for _, c, _ in res})),
                               round(time.perf_counter() - t0, 1), round(ps.memory_info().rss / 2**20),
                               round(peak_rss(proc.pid) / 2**20)])
        upload = groups["valid X-rays"][0][1]["files"]["file"][1]
        load_rows = [asyncio.run(load(url, key, upload, n, a.seconds)) for n in a.clients]
        final, peak = ps.memory_info().rss, peak_rss(proc.pid)
    total = [sum(r[i] for r in rows) for i in range(1, 6)]
    print(table(["cases", "sent", "2xx", "4xx", "5xx", "connection errors"], rows + [["all", *total]],
                title=f"fedxray serve {bundle} (pid {proc.pid}): hostile corpus"))
    for n in notes:
        print("  " + n)
    print()
    print(table(["batch", "status", "code", "seconds", "RSS after MiB", "peak RSS MiB"], batch_rows,
                title="oversized batches (POST /v1/predict/batch)"))
    print()
    print(table(["clients", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "which"], load_rows,
                title=f"load: POST /v1/predict, {a.size} px PNG, {a.seconds:.0f} s per row"))
    print()
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    print(f"server RSS: idle {mib(idle)} (model loaded), after the corpus {mib(after_corpus)} (peak "
          f"{mib(peak_corpus)}), at the end {mib(final)}; peak over the whole run {mib(peak)} = idle + "
          f"{mib(peak - idle)} (bound: idle + 1024 MiB)")


if __name__ == "__main__":
    main()
