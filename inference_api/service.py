"""Image bytes -> checked pixels -> model input, and model output -> response: shared by the API and the CLI.

Nothing here touches the disk or logs image content; DICOM headers are read only by common.imageio, which
looks at pixel-module attributes and ViewPosition alone.
"""
from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.bundle import Bundle
from common.errors import ImageError
from common.explain import CAM_METHODS, FAST, grad_cam_maps, render_overlay
from common.imageio import DecodedImage, decode_image
from common.transforms import Preprocessor
from inference_api import schemas

log = logging.getLogger(__name__)

LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "XTABLE LATERAL"}


class InputError(Exception):
    """A request that cannot be served as sent; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def bundle_frontal_only(card: dict) -> bool:
    """Whether the model was trained on frontal views only (the training config says so; default: yes)."""
    for where in (card.get("extra") or {}, ((card.get("provenance") or {}).get("config") or {}).get("data") or {}):
        if isinstance(where.get("frontal_only"), bool):
            return where["frontal_only"]
    return True


def _privacy(card: dict) -> dict | None:
    prov, extra = card.get("provenance") or {}, card.get("extra") or {}
    for src in (prov, extra):
        for key in ("privacy", "dp", "differential_privacy"):
            if isinstance(src.get(key), dict) and src[key]:
                return src[key]
    return None


@dataclass
class Prepared:
    image: DecodedImage
    x: torch.Tensor          # (C, S, S) model input
    decode_ms: float
    preprocess_ms: float


class Service:
    def __init__(self, bundle: Bundle, *, max_pixels: int, min_resolution: int, overlay_max_side: int | None,
                 frontal_only: bool | None = None):
        self.bundle = bundle
        self.findings = list(bundle.findings)
        self.preprocessor = Preprocessor(bundle.preprocess)
        self.max_pixels, self.min_resolution = max_pixels, min_resolution
        self.overlay_max_side = overlay_max_side
        self.frontal_only = bundle_frontal_only(bundle.card) if frontal_only is None else frontal_only
        card = bundle.card
        self.model_ref = schemas.ModelRef(model_id=bundle.model_id,
                                          version=str(card.get("version") or card.get("created") or "unknown"),
                                          architecture=str(bundle.model_config.arch))

    # ----------------------------------------------------------------------------------------- inputs

    def prepare(self, data: bytes, filename: str | None = None) -> Prepared:
        """Decode and preprocess; every unusable image becomes an InputError (413 too large, else 422)."""
        t0 = time.perf_counter()
        try:
            img = decode_image(data, name=filename, max_pixels=self.max_pixels, min_resolution=self.min_resolution)
        except ImageError as e:
            raise InputError(413 if e.too_large else 422, f"cannot use this image: {e.reason}") from None
        except Exception as e:  # a decoder bug must still not become a 500 (nor log pixels or headers)
            log.warning("unexpected decoder failure: %s", type(e).__name__)
            raise InputError(422, f"cannot decode this image ({type(e).__name__}): send a PNG, JPEG or "
                                  f"uncompressed DICOM") from None
        t1 = time.perf_counter()
        x = self.preprocessor(img.pixels)
        return Prepared(img, x, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000)

    def parse_targets(self, findings: str | None) -> list[int] | None:
        """'all', a comma-separated list of names (case-insensitive), or None (= the positive findings)."""
        if findings is None or not findings.strip():
            return None
        if findings.strip().lower() == "all":
            return list(range(len(self.findings)))
        lookup = {f.lower(): i for i, f in enumerate(self.findings)}
        names = [n.strip() for n in findings.split(",") if n.strip()]
        unknown = [n for n in names if n.lower() not in lookup]
        if unknown:
            raise InputError(422, f"unknown finding(s) {unknown}: this model knows {self.findings} (or use 'all')")
        return list(dict.fromkeys(lookup[n.lower()] for n in names))

    @staticmethod
    def parse_method(method: str) -> str:
        name = (method or FAST).strip().lower()
        if name not in CAM_METHODS:
            raise InputError(422, f"unknown CAM method {method!r}: use one of {', '.join(CAM_METHODS)}")
        return name

    def warnings(self, img: DecodedImage) -> list[str]:
        out = []
        if self.frontal_only and img.view and img.view.upper() in LATERAL_VIEWS:
            out.append(f"lateral view (DICOM ViewPosition {img.view}): this model was trained on frontal "
                       f"(PA/AP) views only, so its output on this image is unreliable")
        return out

    # ---------------------------------------------------------------------------------------- outputs

    def findings_table(self, probs: np.ndarray) -> list[schemas.FindingResult]:
        thr = self.bundle.thresholds
        rows = [schemas.FindingResult(finding=f, probability=float(p), threshold=float(t), positive=bool(p >= t))
                for f, p, t in zip(self.findings, probs, thr)]
        return sorted(rows, key=lambda r: -r.probability)

    def explain_targets(self, probs: np.ndarray, requested: list[int] | None) -> list[int]:
        if requested is not None:
            return requested
        return [int(i) for i in np.argsort(-probs) if probs[i] >= self.bundle.thresholds[i]]

    def explanations(self, img: DecodedImage, maps: torch.Tensor, targets: list[int], method: str, *,
                     max_side: int | None = None) -> list[schemas.Explanation]:
        """Overlays for maps (T, h, w) of `targets`, at most `max_side` pixels (default: overlay_max_side)."""
        out = []
        for j, c in enumerate(targets):
            ov = render_overlay(img.pixels, maps[j], max_side=max_side or self.overlay_max_side)
            out.append(schemas.Explanation(
                finding=self.findings[c], method=method, overlay_png_base64=base64.b64encode(ov.png).decode(),
                overlay_width=ov.width, overlay_height=ov.height, peak=schemas.Point(x=ov.peak_x, y=ov.peak_y)))
        return out

    def grad_cam(self, x: torch.Tensor, targets: list[int], method: str):
        """A closure for Predictor.call: pytorch-grad-cam maps (T, S, S) of one image."""
        return lambda model: torch.from_numpy(grad_cam_maps(model, x[None], targets, method)[0])

    def preview(self, img: DecodedImage) -> str:
        from common.explain import fit_within, png_bytes, resize_gray

        w, h = fit_within(img.width, img.height, self.overlay_max_side)
        return base64.b64encode(png_bytes((resize_gray(img.pixels, w, h) * 255).round().astype(np.uint8))).decode()

    def image_info(self, img: DecodedImage) -> schemas.ImageInfo:
        return schemas.ImageInfo(width=img.width, height=img.height, format=img.format, bit_depth=img.bit_depth,
                                 view=img.view)

    def model_card(self) -> schemas.ModelCard:
        c = self.bundle.card
        return schemas.ModelCard(
            model_id=self.bundle.model_id, version=self.model_ref.version, created=c.get("created"),
            fedxray_version=c.get("fedxray_version"), architecture=c.get("architecture") or {},
            num_parameters=c.get("num_parameters"), findings=self.findings, multilabel=self.bundle.multilabel,
            thresholds={f: float(t) for f, t in zip(self.findings, self.bundle.thresholds)},
            preprocess=c.get("preprocess") or {}, frontal_only=self.frontal_only, metrics=c.get("metrics") or {},
            provenance=c.get("provenance") or {}, privacy=_privacy(c),
            explanation_eval=(c.get("extra") or {}).get("explanation_eval"), weights=c.get("weights") or {},
            cam_methods=list(CAM_METHODS))
