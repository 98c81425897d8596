"""Helpers for the inference tests: one tiny trained bundle per session, built by the real training run."""
from __future__ import annotations

import contextlib
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

FINDINGS = ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]
_CACHE: dict[str, Path] = {}


def trained_bundle(tmp_path_factory) -> Path:
    """A smallcnn bundle from `run_centralised` on one 64 px synthetic hospital (2 epochs, a few seconds)."""
    if "bundle" not in _CACHE:
        from common.settings import Settings
        from common.data.synthetic import synthesize
        from common.centralised import run_centralised

        root = tmp_path_factory.mktemp("inference_synth")
        synthesize(root, hospitals=1, patients=60, size=64, seed=5, holdout_patients=0, progress=False)
        cfg = Settings.model_validate({
            "data": {"path": str(root / "hospital_1"), "findings": FINDINGS},
            "preprocess": {"image_size": 64}, "model": {"arch": "smallcnn", "weights": "none"},
            "train": {"epochs": 2, "batch_size": 16, "num_threads": 2}, "output_dir": str(root / "run")})
        _CACHE["bundle"] = Path(run_centralised(cfg, progress=False)["bundle"])
        _CACHE["data"] = root / "hospital_1"
    return _CACHE["bundle"]


def synthetic_data() -> Path:
    return _CACHE["data"]


def xray(size: int = 96, seed: int = 0, findings=("Nodule",)) -> np.ndarray:
    """A synthetic chest image (H, W) float [0, 1]."""
    from common.data.synthetic import Acquisition, render

    img, _ = render(size, set(findings), np.random.default_rng(seed), Acquisition())
    return img


def narrow(arr: np.ndarray, width: int) -> np.ndarray:
    """The image resized to `width` columns (bilinear): a non-square picture with the whole chest in it (a crop
    that cuts the chest off-centre is, rightly, out of distribution for the test model)."""
    img = Image.fromarray(arr.astype(np.float32), mode="F").resize((width, arr.shape[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float64), 0, 1)


def with_markers(arr: np.ndarray) -> np.ndarray:
    """A black and a white corner pixel, as films carry (collimator edge, burned-in label): the image's own
    min..max window (16-bit PNG, DICOM without VOI) then equals the bit range, so every encoding of it decodes
    like its 8-bit PNG."""
    out = arr.copy()
    out[0, 0], out[0, 1] = 0.0, 1.0
    return out


def png(arr: np.ndarray, bits: int = 8, mode: str | None = None) -> bytes:
    """PNG bytes of a [0, 1] image: 8-bit L, 16-bit I;16, or converted to `mode` (RGBA, P...)."""
    if bits == 16:
        img = Image.fromarray((arr * 65535).round().astype(np.uint16))
    else:
        img = Image.fromarray((arr * 255).round().astype(np.uint8), mode="L")
    if mode:
        img = img.convert(mode)
    buf = BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg(arr: np.ndarray) -> bytes:
    buf = BytesIO()
    Image.fromarray((arr * 255).round().astype(np.uint8), mode="L").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(bundle: Path, log_dir: Path, env: dict | None = None, timeout: float = 90):
    """`fedxray serve` in a subprocess on a free loopback port; yields (base URL, Popen) and always stops it."""
    import os
    import subprocess
    import sys
    import time

    import httpx
    import pytest

    port = free_port()
    env = {**os.environ, "FEDXRAY_MIN_RESOLUTION": "32", **(env or {})}
    log = open(log_dir / f"server-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "fedxray", "serve", "--bundle", str(bundle), "--port",
                             str(port), "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}: {log.read()}")
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready within {timeout} s")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
