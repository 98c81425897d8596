"""`fedxray explain-eval`: score heatmaps against ground-truth boxes, so explanations are measured, not drawn.

Two scores per finding, over every image that has a box of that finding (whatever the model predicted):
- pointing game: is the heatmap's hottest pixel inside a box of that finding? Reported strict (± `tolerance`
  pixels, default 0) and with the standard tolerance of Zhang et al. 2016 ("Top-down neural attention by
  excitation backprop"): 15 px at 224 px, i.e. 15/224 of the image's shorter side. The chance level (the
  fraction of the image the boxes cover) is reported beside the strict score.
- IoU of the heatmap thresholded at `iou_threshold` (maps are min-max normalised to [0, 1]) with the boxes.
Heatmaps are computed at the original image size, exactly as the API draws them. A CAM of h x w cells upsampled
bilinearly peaks on a cell centre, so the strict score is bounded by the map's resolution for boxes smaller
than a cell (a 16-px cell vs an 8-px nodule box): the standard tolerance is what the literature reports.
Pixel convention: pixel (col, row) has its centre at (col + 0.5, row + 0.5); a box (x, y, w, h) covers
centres in [x, x + w) x [y, y + h).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.bundle import Bundle
from common.settings import DataConfig
from common.data.manifest import Box, Sample
from common.data.sources import detect_source, load_manifest
from common.errors import DataError, ImageError
from common.explain import FAST, check_method, explain_batch, forward_with_cams, normalise_cams
from common.training import probabilities
from common.transforms import Preprocessor


STANDARD_TOLERANCE = 15 / 224  # of the shorter image side (Zhang et al. 2016: 15 px on ~224 px images)


def box_mask(boxes: list[Box], height: int, width: int) -> np.ndarray:
    """Union of boxes as a boolean (H, W) mask (pixel centres inside)."""
    m = np.zeros((height, width), dtype=bool)
    cols, rows = np.arange(width) + 0.5, np.arange(height) + 0.5
    for b in boxes:
        m |= ((rows >= b.y) & (rows < b.y + b.h))[:, None] & ((cols >= b.x) & (cols < b.x + b.w))[None, :]
    return m


def pointing_hit(heat: np.ndarray, boxes: list[Box], tolerance: float = 0.0) -> bool:
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    x, y = c + 0.5, r + 0.5
    return any(b.x - tolerance <= x < b.x + b.w + tolerance and b.y - tolerance <= y < b.y + b.h + tolerance
               for b in boxes)


def heat_iou(heat: np.ndarray, mask: np.ndarray, threshold: float) -> float:
    hot = heat >= threshold
    union = np.logical_or(hot, mask).sum()
    return float(np.logical_and(hot, mask).sum() / union) if union else 0.0


@dataclass
class _Tally:
    n: int = 0
    hits: int = 0
    hits_std: int = 0
    ious: list[float] = field(default_factory=list)
    chance: list[float] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    pos_n: int = 0
    pos_hits: int = 0

    def summary(self) -> dict:
        rate = lambda k, n: round(k / n, 4) if n else None  # noqa: E731
        return {"images": self.n, "pointing_hits": self.hits, "pointing_game": rate(self.hits, self.n),
                "pointing_game_standard": rate(self.hits_std, self.n),
                "pointing_game_chance": round(float(np.mean(self.chance)), 4) if self.chance else None,
                "mean_iou": round(float(np.mean(self.ious)), 4) if self.ious else None,
                "mean_probability": round(float(np.mean(self.probs)), 4) if self.probs else None,
                "predicted_positive": self.pos_n, "pointing_game_predicted_positive": rate(self.pos_hits, self.pos_n)}


def evaluate_explanations(bundle: Bundle, data: str | Path, *, source: str | None = None, split: str = "all",
                          method: str = FAST, iou_threshold: float = 0.5, tolerance: float = 0.0,
                          batch_size: int = 32, max_images: int | None = None, progress: bool = True) -> dict:
    """The explain-eval report (a JSON-able dict) for every boxed image of `data` (optionally one split)."""
    method = check_method(method)
    data = Path(data)
    src = source or detect_source(data)
    manifest = load_manifest(DataConfig(source=src, path=str(data), min_resolution=1))  # boxes filtered below
    index = {f: i for i, f in enumerate(bundle.findings)}
    samples = [s for s in manifest.samples if any(b.finding in index for b in s.boxes)
               and (split == "all" or s.split == split)]
    if max_images:
        samples = samples[:max_images]
    if not samples:
        raise DataError(f"no image with a bounding box of {bundle.findings} in this source"
                        + (f" (split {split})" if split != "all" else "") +
                        ": explain-eval needs boxes, e.g. BBox_List_2017.csv of ChestX-ray14 or synthetic hospitals",
                        path=str(data))
    pre = Preprocessor(bundle.preprocess)
    tallies = {f: _Tally() for f in bundle.findings}
    skipped: list[str] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(samples), desc="explain-eval", unit="img", disable=not progress)
    for start in range(0, len(samples), batch_size):
        chunk: list[tuple[Sample, np.ndarray]] = []
        for s in samples[start:start + batch_size]:
            try:
                chunk.append((s, manifest.load(s).pixels))
            except ImageError as e:
                skipped.append(f"{s.key}: {e.reason}")
        bar.update(len(samples[start:start + batch_size]))
        if chunk:
            _score_chunk(bundle, pre, chunk, index, tallies, method, iou_threshold, tolerance)
    bar.close()
    per = {f: t.summary() for f, t in tallies.items() if t.n}
    overall = _Tally()
    for t in tallies.values():
        overall.n += t.n
        overall.hits += t.hits
        overall.hits_std += t.hits_std
        overall.ious += t.ious
        overall.chance += t.chance
        overall.probs += t.probs
        overall.pos_n += t.pos_n
        overall.pos_hits += t.pos_hits
    return {"model_id": bundle.model_id, "method": method, "data": str(data), "source": src, "split": split,
            "images": len(samples) - len(skipped), "skipped": skipped[:20], "iou_threshold": iou_threshold,
            "tolerance_px": tolerance, "standard_tolerance": "15/224 of the shorter image side",
            "per_finding": per, "overall": overall.summary(), "seconds": round(time.perf_counter() - t0, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def card_section(report: dict) -> dict:
    """The report as the model card may carry it (the card is public through /v1/model): the figures, without
    the data folder's path or the names of the images that could not be read."""
    out = {k: v for k, v in report.items() if k not in ("data", "skipped")}
    out["skipped_images"] = len(report.get("skipped") or [])
    return out


def _score_chunk(bundle, pre, chunk, index, tallies, method, iou_threshold, tolerance) -> None:
    x = torch.stack([pre(pixels) for _, pixels in chunk])
    model = bundle.model.eval()
    if method == FAST:
        with torch.inference_mode():
            logits, maps = forward_with_cams(model, x)
        targets = list(range(len(index)))
    else:
        targets = sorted({index[b.finding] for s, _ in chunk for b in s.boxes if b.finding in index})
        ex = explain_batch(model, x, method=method, targets=targets)
        logits, maps = ex.logits, ex.maps
    probs = probabilities(logits, bundle.multilabel).float().numpy()
    thr = bundle.thresholds
    for b, (s, pixels) in enumerate(chunk):
        h, w = pixels.shape
        by_finding: dict[str, list[Box]] = {}
        for box in s.boxes:
            if box.finding in index:
                by_finding.setdefault(box.finding, []).append(box)
        for f, boxes in by_finding.items():
            c = index[f]
            heat = normalise_cams(maps[b, targets.index(c)][None], (h, w))[0].numpy()
            mask = box_mask(boxes, h, w)
            hit = pointing_hit(heat, boxes, tolerance)
            t = tallies[f]
            t.n += 1
            t.hits += hit
            t.hits_std += pointing_hit(heat, boxes, STANDARD_TOLERANCE * min(h, w))
            t.ious.append(heat_iou(heat, mask, iou_threshold))
            t.chance.append(float(mask.mean()))
            t.probs.append(float(probs[b, c]))
            if probs[b, c] >= thr[c]:
                t.pos_n += 1
                t.pos_hits += hit


def format_report(report: dict) -> str:
    head = (f"{'finding':<14} {'images':>6} {'pointing':>9} {'chance':>7} {'std tol':>8} {'mean IoU':>9} "
            f"{'pos':>5} {'pointing|pos':>13}")
    lines = [f"explain-eval · {report['method']} · {report['data']} (split {report['split']}, "
             f"{report['images']} images, IoU at heat >= {report['iou_threshold']}; pointing: strict, "
             f"tolerance {report['tolerance_px']} px; std tol: 15/224 of the shorter side)", head, "-" * len(head)]

    def fmt(v, p=3):
        return "-" if v is None else f"{v:.{p}f}"

    for name, r in [*report["per_finding"].items(), ("all", report["overall"])]:
        lines.append(f"{name:<14} {r['images']:>6} {fmt(r['pointing_game']):>9} {fmt(r['pointing_game_chance']):>7} "
                     f"{fmt(r['pointing_game_standard']):>8} {fmt(r['mean_iou']):>9} {r['predicted_positive']:>5} "
                     f"{fmt(r['pointing_game_predicted_positive']):>13}")
    return "\n".join(lines)
