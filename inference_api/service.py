"""Image bytes -> checked pixels -> model input, and model output -> response: shared by the API and the CLI.

Nothing here touches the disk or logs image content; DICOM headers are read only by common.imageio, which
looks at pixel-module attributes and ViewPosition alone.
"""
from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from common.bundle import Bundle
from common.errors import ImageError
from common.explain import CAM_METHODS, FAST, fit_within, grad_cam_maps, render_overlays, resize_gray
from common.imageio import DEFAULT_MAX_SIDE, DecodedImage, ImageHeader, decode_image, probe_image
from common.quality import Gate, Issue, picture_stats, public_section
from common.settings import FederationConfig, nest
from common.transforms import Preprocessor
from inference_api import schemas
from inference_api.errors import InputError

log = logging.getLogger(__name__)


def bundle_frontal_only(card: dict) -> bool:
    """Whether the model was trained on frontal views only (the training config says so; default: yes)."""
    for where in (card.get("extra") or {}, ((card.get("provenance") or {}).get("config") or {}).get("data") or {}):
        if isinstance(where.get("frontal_only"), bool):
            return where["frontal_only"]
    return True


def _privacy(card: dict) -> dict | None:
    prov, extra = card.get("provenance") or {}, card.get("extra") or {}
    fed = prov.get("federation") or {}
    for src in (prov, extra, fed):
        for key in ("privacy", "dp", "differential_privacy"):
            if isinstance(src.get(key), dict) and src[key] and src[key].get("enabled", True):
                return src[key]
    return None


# ------------------------------------------------------------------------------------ public model card

# What of the training settings (common/settings.py sections) the public card shows: what a reader needs to judge
# the model, never where anything lives (data.path, federation.server_data_path, output_dir) nor who ran it.
_PUBLIC_CONFIG = {"model": None, "preprocess": None, "augment": None, "privacy": None, "central_dp": None,
                  "secagg": None, "guards": None,
                  "train": ("epochs", "batch_size", "lr", "weight_decay", "loss", "pos_weight", "threshold_method",
                            "seed", "early_stopping_patience", "scheduler", "optimizer", "bootstrap", "select_on",
                            "calibration"),
                  "data": ("source", "findings", "split_fractions", "frontal_only", "uncertainty",
                           "min_resolution", "max_samples", "seed"),
                  "federation": tuple(k for k in FederationConfig.model_fields if k != "server_data_path")}
_FEDERATION_KEYS = ("runtime", "strategy", "strategy_params", "rounds_planned", "rounds_completed", "best_round",
                    "selection", "examples_per_node", "local_epochs", "fp16_transfer",
                    "bytes_per_client_per_round", "dp", "epsilon", "secure_aggregation", "history")


def _no_paths(x):
    """Belt and braces: drop any string that looks like a filesystem path, wherever it sits."""
    if isinstance(x, dict):
        return {k: _no_paths(v) for k, v in x.items() if not (isinstance(v, str) and _is_path(v))}
    if isinstance(x, list):
        return [_no_paths(v) for v in x if not (isinstance(v, str) and _is_path(v))]
    return x


def _is_path(v: str) -> bool:
    return v.startswith(("/", "~", "./", "../")) or "\\" in v or (len(v) > 2 and v[1] == ":" and v[2] in "/\\")


def _weights_source(v):
    return v if v in ("none", "imagenet", None) else "state-dict file"


def public_provenance(prov: dict) -> dict:
    """The card's provenance without paths (see _PUBLIC_CONFIG)."""
    out: dict = {k: prov[k] for k in ("run_id", "training", "epochs_run", "best_epoch", "train_seconds", "seconds",
                                      "package_versions") if k in prov}
    if isinstance(prov.get("data"), dict):
        out["data"] = {k: v for k, v in prov["data"].items() if k in ("source", "images", "patients", "excluded")}
    if isinstance(prov.get("server_data"), dict):
        out["server_data"] = {"splits": prov["server_data"].get("splits")}
    if isinstance(prov.get("public_data"), str):   # this model is a warm start (`fedxray pretrain`)
        out["public_data"] = prov["public_data"]
    ws = prov.get("warm_start")
    if isinstance(ws, dict):   # what the model started from, and what that start was trained on
        out["warm_start"] = {k: ws[k] for k in ("kind", "model_id", "weights_sha256", "public_data", "source")
                             if k in ws}
        if isinstance(ws.get("data"), dict):
            out["warm_start"]["data"] = {k: v for k, v in ws["data"].items()
                                         if k in ("source", "images", "patients", "fingerprint")}
    cal = prov.get("calibration")
    if isinstance(cal, dict):   # how the served probabilities were calibrated (common/calibration.py)
        out["calibration"] = {k: cal[k] for k in ("method", "fitted_on", "scope", "scale", "shift", "val_nll") if k in cal}
    fed = prov.get("federation")
    if isinstance(fed, dict):
        out["federation"] = {k: fed[k] for k in _FEDERATION_KEYS if k in fed}
        out["federation"]["hospitals"] = len(fed.get("nodes") or fed.get("examples_per_node") or {})
    cfg = prov.get("config")
    if not isinstance(cfg, dict) and isinstance(prov.get("run_config"), dict):   # a flat Flower run config
        cfg = nest(prov["run_config"])
    if isinstance(cfg, dict):
        settings = {}
        for section, keys in _PUBLIC_CONFIG.items():
            if isinstance(cfg.get(section), dict):
                kept = {k: v for k, v in cfg[section].items() if keys is None or k in keys}
                if kept:
                    settings[section] = kept
        if "model" in settings and "weights" in settings["model"]:
            settings["model"]["weights"] = _weights_source(settings["model"]["weights"])
        out["settings"] = settings
    return _no_paths(out)


@dataclass
class Prepared:
    image: DecodedImage      # pixels: reduced to what the answer needs (overlays, preview), or None-sized
    x: torch.Tensor          # (C, S, S) model input
    warnings: list[Issue]    # picture checks that only warn
    decode_ms: float
    preprocess_ms: float

    @property
    def retained_bytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.image.pixels.nbytes


class Service:
    def __init__(self, bundle: Bundle, *, max_pixels: int, min_resolution: int, overlay_max_side: int | None,
                 frontal_only: bool | None = None, max_side: int = DEFAULT_MAX_SIDE):
        self.bundle = bundle
        self.findings = list(bundle.findings)
        self.preprocessor = Preprocessor(bundle.preprocess)
        self.max_pixels, self.min_resolution, self.max_side = max_pixels, min_resolution, max_side
        self.overlay_max_side = overlay_max_side
        self.frontal_only = bundle_frontal_only(bundle.card) if frontal_only is None else frontal_only
        self.gate = Gate.from_card(bundle.card, frontal_only=self.frontal_only)
        card = bundle.card
        self.model_ref = schemas.ModelRef(model_id=bundle.model_id,
                                          version=str(card.get("version") or card.get("created") or "unknown"),
                                          architecture=str(bundle.model_config.arch))

    # ----------------------------------------------------------------------------------------- inputs

    def probe(self, data: bytes, filename: str | None = None) -> ImageHeader:
        """The header's facts (size, layout) before decoding: 413/422 for what the header already shows."""
        try:
            return probe_image(data, name=filename, max_pixels=self.max_pixels, min_resolution=self.min_resolution)
        except ImageError as e:
            raise InputError(413 if e.too_large else 422, f"cannot use this image: {e.reason}", e.code) from None

    def prepare(self, data: bytes, filename: str | None = None, keep_side: int | None = 0) -> Prepared:
        """Decode, preprocess and run the picture checks; every unusable image becomes an InputError.

        `keep_side`: the decoded pixels are kept at most this long side for overlays/preview (None: as decoded,
        0: not kept), so a request holds little memory while it waits for the model.
        """
        t0 = time.perf_counter()
        try:
            img = decode_image(data, name=filename, max_pixels=self.max_pixels, min_resolution=self.min_resolution,
                               max_side=self.max_side)
        except ImageError as e:
            if e.code == "dicom_unsupported" or e.code == "corrupt":
                log.info("upload refused (%s): %s", e.code, e.reason)  # one line; never pixels or headers
            raise InputError(413 if e.too_large else 422, f"cannot use this image: {e.reason}", e.code) from None
        except Exception as e:  # a decoder bug must still not become a 500 (nor log pixels or headers)
            log.warning("unexpected decoder failure: %s", type(e).__name__)
            raise InputError(422, f"cannot decode this image ({type(e).__name__}): send a PNG, JPEG or "
                                  f"uncompressed DICOM", "unusable_image") from None
        t1 = time.perf_counter()
        u8 = self.preprocessor.prepare(img.pixels)
        issues = self.gate.check_picture(picture_stats(u8, width=img.width, height=img.height,
                                                       colourfulness=img.colourfulness, view=img.view))
        refused = next((i for i in issues if i.action == "reject"), None)
        if refused is not None:
            raise InputError(422, f"refused: {refused.detail}", refused.code)
        x = self.preprocessor.finalize(u8)
        if keep_side is not None:
            img = replace(img, pixels=_shrink(img.pixels, keep_side))
        return Prepared(img, x, issues, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000)

    def check_features(self, features: np.ndarray | None) -> tuple[float | None, list[Issue]]:
        """The out-of-distribution check on the model's own features; raises InputError when it refuses."""
        if features is None:
            return None, []
        score, issues = self.gate.check_features(features)
        refused = next((i for i in issues if i.action == "reject"), None)
        if refused is not None:
            raise InputError(422, f"refused: {refused.detail}", refused.code)
        return score, issues

    def input_check(self, issues: list[Issue], score: float | None) -> schemas.InputCheck:
        return schemas.InputCheck(issues=[schemas.GateIssue(code=i.code, action=i.action, detail=i.detail)
                                          for i in issues],
                                  ood_score=score, ood_threshold=self.gate.ood_threshold)

    def parse_targets(self, findings: str | None) -> list[int] | None:
        """'all', comma-separated names exactly as the model card spells them, or None/'' (= the positive
        findings). Exact, as the OpenAPI pattern says (targets_pattern)."""
        if not findings:
            return None
        if findings == "all":
            return list(range(len(self.findings)))
        lookup = {f: i for i, f in enumerate(self.findings)}
        names = findings.split(",")
        unknown = [n for n in names if n not in lookup]
        if unknown:
            raise InputError(422, f"unknown finding(s) {unknown[:5]}: this model knows {self.findings} (or use "
                                  f"'all')", "unknown_finding")
        return list(dict.fromkeys(lookup[n] for n in names))

    @staticmethod
    def parse_method(method: str) -> str:
        name = (method or FAST).strip().lower()
        if name not in CAM_METHODS:
            raise InputError(422, f"unknown CAM method {method!r}: use one of {', '.join(CAM_METHODS)}",
                             "invalid_parameter")
        return name

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
        overlays = render_overlays(img.pixels, maps[:len(targets)], max_side=max_side or self.overlay_max_side,
                                   original_size=(img.width, img.height)) if targets else []
        for c, ov in zip(targets, overlays):
            out.append(schemas.Explanation(
                finding=self.findings[c], method=method, overlay_png_base64=base64.b64encode(ov.png).decode(),
                overlay_width=ov.width, overlay_height=ov.height, peak=schemas.Point(x=ov.peak_x, y=ov.peak_y)))
        return out

    def grad_cam(self, x: torch.Tensor, targets: list[int], method: str):
        """A closure for Predictor.call: pytorch-grad-cam maps (T, S, S) of one image."""
        return lambda model: torch.from_numpy(grad_cam_maps(model, x[None], targets, method)[0])

    def preview(self, img: DecodedImage) -> str:
        from common.explain import png_bytes

        w, h = fit_within(img.pixels.shape[1], img.pixels.shape[0], self.overlay_max_side)
        return base64.b64encode(png_bytes((resize_gray(img.pixels, w, h) * 255).round().astype(np.uint8))).decode()

    def image_info(self, img: DecodedImage) -> schemas.ImageInfo:
        return schemas.ImageInfo(width=img.width, height=img.height, format=img.format, bit_depth=img.bit_depth,
                                 view=img.view)

    def model_card(self, limits: dict) -> schemas.ModelCard:
        """The public card: what a clinician or auditor needs, without paths or the raw run config."""
        c = self.bundle.card
        arch = dict(c.get("architecture") or {})
        if "weights" in arch:
            arch["weights"] = _weights_source(arch["weights"])
        gate = public_section(c) or {"version": None, "policy": self.gate.policy, "thresholds": self.gate.thresholds,
                                     "ood": {"method": None, "note": "this bundle was exported without a "
                                                                     "calibration: no out-of-distribution check"}}
        gate = {**gate, "policy": self.gate.policy}
        return schemas.ModelCard(
            model_id=self.bundle.model_id, version=self.model_ref.version, created=c.get("created"),
            fedxray_version=c.get("fedxray_version"), architecture=arch,
            num_parameters=c.get("num_parameters"), findings=self.findings, multilabel=self.bundle.multilabel,
            thresholds={f: float(t) for f, t in zip(self.findings, self.bundle.thresholds)},
            preprocess=c.get("preprocess") or {}, frontal_only=self.frontal_only, metrics=c.get("metrics") or {},
            provenance=public_provenance(c.get("provenance") or {}), privacy=_privacy(c),
            explanation_eval=(c.get("extra") or {}).get("explanation_eval"),
            weights={k: v for k, v in (c.get("weights") or {}).items() if k in ("sha256", "bytes")},
            cam_methods=list(CAM_METHODS), input_gate=gate, limits=limits)


def _shrink(pixels: np.ndarray, side: int | None) -> np.ndarray:
    """Pixels scaled down to at most `side` on the longer side (0: nothing kept, a 1x1 placeholder)."""
    if side == 0:
        return np.zeros((1, 1), np.float32)
    h, w = pixels.shape
    nw, nh = fit_within(w, h, side)
    return pixels if (nw, nh) == (w, h) else resize_gray(pixels, nw, nh)
