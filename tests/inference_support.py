"""Helpers for the inference tests: one tiny trained bundle per session, built by the real training run, and
synthetic chest images (encoded by benchmarks.image_files; run as a server by inference_api.local_server)."""
from __future__ import annotations

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
