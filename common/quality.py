"""The input-quality gate: is this upload a chest X-ray the model can speak about? Checked before findings.

Why: a classifier answers for any input; noise, a colour photo, an all-white or an inverted image got four
confident findings. Every upload is checked in two steps, each check giving a reason code:

- from the picture (before the model): `not_grayscale` (colourfulness of the RGB data, Hasler & Suesstrunk
  2003, on 0-255), `near_constant` (standard deviation of the model-size image), `extreme_aspect_ratio`
  (longer / shorter side), `inverted` (polarity: the mediastinum column minus the lung fields of the
  model-size image; positive on a normal frontal film, where spine and heart are brighter than the lungs),
  `lateral_view` (DICOM ViewPosition; models trained on frontal views only);
- from the model (its own forward pass): `out_of_distribution`, the standardised distance of the penultimate
  features (the global-average-pool output the classifier reads) from the validation images' features:
  sqrt(mean_d ((f_d - mean_d) / scale_d)^2), with scale_d the validation standard deviation floored at a
  tenth of its median so dead features do not divide by ~0.

`calibrate` runs where bundles are made (common.bundle.save_bundle, for centralised and federated training):
it fits the feature statistics on the validation images, sets the distance threshold at the
(1 - target) quantile of out-of-fold distances (k-fold: each image scored by statistics it was not part of),
and records each check's false-rejection rate on the validation (out-of-fold) and test images in model.json.
The bundle's `policy` says which codes refuse the image (422) and which only warn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import nn

from common.models import classifier_head

GATE_VERSION = 1
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "XTABLE LATERAL"})
CODES = ("not_grayscale", "near_constant", "extreme_aspect_ratio", "inverted", "lateral_view",
         "out_of_distribution")
DEFAULT_POLICY = {"not_grayscale": "reject", "near_constant": "reject", "extreme_aspect_ratio": "reject",
                  "inverted": "reject", "lateral_view": "warn", "out_of_distribution": "reject"}
# Picture checks: fixed limits (a chest film is 1:1 to 14:17, gray, and far from flat); the polarity limit is
# lowered to the validation images' `target` quantile when some of them fall below 0.
DEFAULT_THRESHOLDS = {"colourfulness_max": 20.0, "contrast_min": 0.02, "aspect_ratio_max": 3.0,
                      "polarity_min": -0.02}
TARGET_FALSE_REJECTION = 0.01
MIN_CALIBRATION_IMAGES = 8


@dataclass(frozen=True)
class Issue:
    code: str
    action: str         # "reject" | "warn"
    detail: str         # words for the clinician: what was seen and what to do
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class PictureStats:
    colourfulness: float
    aspect_ratio: float
    contrast: float
    polarity: float
    view: str | None = None


def picture_stats(prepared: torch.Tensor | np.ndarray, *, width: int, height: int, colourfulness: float = 0.0,
                  view: str | None = None) -> PictureStats:
    """Stats of the model-size image (1, S, S) uint8 from Preprocessor.prepare, plus the decoded image's facts."""
    u = torch.as_tensor(prepared).float().reshape(prepared.shape[-2], prepared.shape[-1]).numpy() / 255.0
    return PictureStats(float(colourfulness), max(width, height) / max(1, min(width, height)), float(u.std()),
                        polarity(u), view)


def polarity(u: np.ndarray) -> float:
    """Mean of the central column (mediastinum, spine) minus the mean of both lung fields, on (S, S) [0, 1].

    Assumes a roughly centred frontal film (rows 25-70 %, centre 44-56 %, lungs 15-35 % and 65-85 % of the
    width); the calibration records how often the bundle's own validation images fall below the limit.
    """
    s_h, s_w = u.shape
    rows = slice(int(0.25 * s_h), max(int(0.70 * s_h), int(0.25 * s_h) + 1))
    centre = u[rows, int(0.44 * s_w):max(int(0.56 * s_w), int(0.44 * s_w) + 1)]
    lungs = np.concatenate([u[rows, int(0.15 * s_w):max(int(0.35 * s_w), 1)],
                            u[rows, int(0.65 * s_w):max(int(0.85 * s_w), 1)]], axis=1)
    return float(centre.mean() - lungs.mean()) if centre.size and lungs.size else 0.0


def forward_with_features(model: nn.Module, x: torch.Tensor, forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of `forward(model, x)` (default model(x)), penultimate features (B, D) the classifier head reads)."""
    captured: list[torch.Tensor] = []
    handle = classifier_head(model).register_forward_pre_hook(lambda _m, inp: captured.append(inp[0].detach()))
    try:
        out = forward(model, x) if forward is not None else model(x)
    finally:
        handle.remove()
    return out, captured[-1].reshape(x.shape[0], -1).float()


@dataclass
class FeatureDistance:
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> "FeatureDistance":
        f = np.asarray(features, dtype=np.float64)
        std = f.std(axis=0, ddof=1) if len(f) > 1 else np.ones(f.shape[1])
        floor = max(0.1 * float(np.median(std)), 1e-6)
        return cls(f.mean(axis=0), np.maximum(std, floor))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64).reshape(-1, self.mean.size) - self.mean) / self.scale
        return np.sqrt((z ** 2).mean(axis=1))


def out_of_fold_distances(features: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Each image's distance under statistics fitted on the other folds (an honest false-rejection estimate)."""
    n = len(features)
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n)
    for k in range(min(folds, n)):
        held = order[k::min(folds, n)]
        rest = np.setdiff1d(order, held)
        out[held] = FeatureDistance.fit(features[rest])(features[held])
    return out


@dataclass
class Gate:
    """The bundle's gate: thresholds, policy and (when calibrated) the feature statistics."""
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    policy: dict = field(default_factory=lambda: dict(DEFAULT_POLICY))
    distance: FeatureDistance | None = None
    ood_threshold: float | None = None
    frontal_only: bool = True

    @classmethod
    def from_card(cls, card: dict, *, frontal_only: bool = True) -> "Gate":
        section = card.get("quality_gate") if isinstance(card.get("quality_gate"), dict) else {}
        ood = section.get("ood") if isinstance(section.get("ood"), dict) else {}
        distance = None
        if ood.get("feature_mean") and ood.get("feature_scale") and ood.get("threshold") is not None:
            distance = FeatureDistance(np.asarray(ood["feature_mean"], float), np.asarray(ood["feature_scale"], float))
        policy = {**DEFAULT_POLICY, **{k: v for k, v in (section.get("policy") or {}).items()
                                       if k in DEFAULT_POLICY and v in ("reject", "warn", "off")}}
        return cls({**DEFAULT_THRESHOLDS, **(section.get("thresholds") or {})}, policy, distance,
                   float(ood["threshold"]) if distance is not None else None, frontal_only)

    def _issue(self, code: str, detail: str, value: float | None = None, threshold: float | None = None
               ) -> list[Issue]:
        action = self.policy.get(code, "reject")
        return [] if action == "off" else [Issue(code, action, detail, value, threshold)]

    def check_picture(self, s: PictureStats) -> list[Issue]:
        t, out = self.thresholds, []
        if s.colourfulness > t["colourfulness_max"]:
            out += self._issue("not_grayscale", f"the image is in colour (colourfulness {s.colourfulness:.0f}, an "
                               f"X-ray is gray: at most {t['colourfulness_max']:.0f}): send the radiograph itself, "
                               f"not a photo or a screenshot", s.colourfulness, t["colourfulness_max"])
        if s.contrast < t["contrast_min"]:
            out += self._issue("near_constant", f"the image is almost uniform (contrast {s.contrast:.3f}, at least "
                               f"{t['contrast_min']} expected): it holds no X-ray to read", s.contrast, t["contrast_min"])
        if s.aspect_ratio > t["aspect_ratio_max"]:
            out += self._issue("extreme_aspect_ratio", f"the image is {s.aspect_ratio:.1f} times longer than wide "
                               f"(a chest film is at most {t['aspect_ratio_max']:.0f}:1): send the whole, uncropped "
                               f"radiograph", s.aspect_ratio, t["aspect_ratio_max"])
        elif s.contrast >= t["contrast_min"] and s.polarity < t["polarity_min"]:
            out += self._issue("inverted", "the image looks inverted (the lungs are brighter than the mediastinum): "
                               "send it with bone white and air black, or check the DICOM photometric "
                               "interpretation", s.polarity, t["polarity_min"])
        if self.frontal_only and s.view and s.view.upper() in LATERAL_VIEWS:
            out += self._issue("lateral_view", f"lateral view (DICOM ViewPosition {s.view}): this model was trained "
                               f"on frontal (PA/AP) views only, so its output on this image is unreliable")
        return out

    def ood_score(self, features: np.ndarray) -> float | None:
        return None if self.distance is None else float(self.distance(features)[0])

    def check_features(self, features: np.ndarray) -> tuple[float | None, list[Issue]]:
        score = self.ood_score(features)
        if score is None or score <= self.ood_threshold:
            return score, []
        return score, self._issue("out_of_distribution", f"the image does not look like the chest X-rays this model "
                                  f"was validated on (feature distance {score:.2f}, limit {self.ood_threshold:.2f}): "
                                  f"its findings would not be reliable", score, self.ood_threshold)


def _rate(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else None


def _false_rejections(gate: Gate, stats: list[PictureStats], distances: np.ndarray | None) -> dict:
    """Share of images each check flags, and of images the gate as a whole refuses (policy 'reject')."""
    per_image = [gate.check_picture(s) for s in stats]
    if distances is not None:
        for issues, d in zip(per_image, distances):
            if d > gate.ood_threshold:
                issues += gate._issue("out_of_distribution", "", float(d), gate.ood_threshold)
    by_check = {c: _rate(any(i.code == c for i in issues) for issues in per_image) for c in CODES}
    if distances is None:
        by_check["out_of_distribution"] = None
    return {"images": len(stats), "by_check": by_check,
            "refused": _rate(any(i.action == "reject" for i in issues) for issues in per_image)}


@torch.no_grad()
def dataset_features(model: nn.Module, dataset, batch_size: int = 64) -> tuple[np.ndarray, list[PictureStats]]:
    """Penultimate features and picture stats of every image of an XrayDataset (as prepared for the model)."""
    model.eval()
    device = next(model.parameters()).device
    feats, stats = [], []
    for start in range(0, len(dataset), batch_size):
        prepared = [dataset.prepared(p) for p in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([dataset.pre.finalize(u) for u in prepared])
        feats.append(forward_with_features(model, x.to(device))[1].cpu().numpy())
        for p, u in zip(range(start, start + len(prepared)), prepared):
            stats.append(picture_stats(u, **dataset.decode_facts(p)))
    return (np.concatenate(feats) if feats else np.zeros((0, 0))), stats


def calibrate(model: nn.Module, validation, test=None, *, target: float = TARGET_FALSE_REJECTION,
              policy: dict | None = None, folds: int = 5) -> dict:
    """The gate section of model.json, fitted on the validation images (see the module docstring)."""
    policy = {**DEFAULT_POLICY, **(policy or {})}
    thresholds = dict(DEFAULT_THRESHOLDS)
    feats, stats = dataset_features(model, validation)
    n = len(stats)
    if n:
        low = float(np.quantile([s.polarity for s in stats], target))
        thresholds["polarity_min"] = round(min(thresholds["polarity_min"], low), 4)
    gate = Gate(thresholds, policy)
    section: dict = {"version": GATE_VERSION, "policy": policy, "thresholds": thresholds,
                     "target_false_rejection": target}
    oof = None
    if n >= MIN_CALIBRATION_IMAGES:
        oof = out_of_fold_distances(feats, folds)
        # the smallest threshold above which at most `target` of the out-of-fold distances lie
        k = max(0, min(n - 1, math.ceil((1 - target) * n) - 1))
        gate.distance, gate.ood_threshold = FeatureDistance.fit(feats), float(np.sort(oof)[k])
        section["ood"] = {"method": "standardised penultimate-feature distance (validation mean/std)",
                          "features": int(feats.shape[1]), "threshold": round(gate.ood_threshold, 6),
                          "fitted_on": n, "folds": min(folds, n),
                          "feature_mean": gate.distance.mean.round(6).tolist(),
                          "feature_scale": gate.distance.scale.round(6).tolist()}
    else:
        section["ood"] = {"method": None, "threshold": None, "fitted_on": n,
                          "note": f"not calibrated: {n} validation images, at least {MIN_CALIBRATION_IMAGES} needed"}
    rates = {"validation": _false_rejections(gate, stats, oof)}
    if test is not None and len(test):
        t_feats, t_stats = dataset_features(model, test)
        rates["test"] = _false_rejections(gate, t_stats, gate.distance(t_feats) if gate.distance else None)
    section["false_rejection"] = rates
    return section


def public_section(card: dict) -> dict | None:
    """The gate section for the public model card: everything but the per-feature statistics."""
    section = card.get("quality_gate")
    if not isinstance(section, dict):
        return None
    ood = {k: v for k, v in (section.get("ood") or {}).items() if k not in ("feature_mean", "feature_scale")}
    return {**section, "ood": ood}
