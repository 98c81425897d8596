"""What every data source produces: a Manifest of Samples (path, patient, labels, official split, boxes).

A source only reads metadata and checks structure (headers, labels, files present). Pixels are decoded
later, once, by `common.data.dataset` — which is also where corrupt or low-resolution images are excluded.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import ImageError
from common.imageio import DecodedImage, read_image


@dataclass(frozen=True)
class Box:
    """A ground-truth region (original image pixels), kept to score explanations."""

    finding: str
    x: float
    y: float
    w: float
    h: float


@dataclass
class Sample:
    key: str                      # path relative to the manifest root, or "npz:<split>:<index>"
    patient_id: str
    labels: np.ndarray            # float32 (F,); NaN = unknown (CheXpert U-Ignore), masked out of the loss
    split: str | None = None      # official split shipped by the source: "train", "val", "test", "trainval"
    site: str = ""
    view: str | None = None
    boxes: tuple[Box, ...] = ()

    @property
    def group(self) -> str:
        """Patient identity across sites: the unit that splits and partitions never cut."""
        return f"{self.site}/{self.patient_id}"


@dataclass
class Exclusion:
    key: str
    reason: str                    # for the hospital's own report: may name sizes, formats, library messages
    code: str = "unusable_image"   # ImageError.code (corrupt, too_small, ...): the category statistics count



@dataclass
class Manifest:
    source: str
    root: Path
    findings: list[str]
    samples: list[Sample]
    excluded: list[Exclusion] = field(default_factory=list)
    multilabel: bool = True
    arrays: dict[str, np.ndarray] | None = None   # in-memory pixels for array sources (MedMNIST)
    notes: list[str] = field(default_factory=list)
    patient_ids: str = ""                          # where patient ids came from (the data report says so)

    def load(self, sample: Sample, min_resolution: int = 1) -> DecodedImage:
        """Decode one sample's image; raises ImageError (with the path) when it is unusable."""
        if sample.key.startswith("npz:"):
            _, split, idx = sample.key.split(":")
            arr = self.arrays[f"{split}_images"][int(idx)]
            if arr.ndim == 3:
                arr = arr.mean(axis=-1)
            px = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else max(float(arr.max()), 1.0))
            h, w = px.shape
            if min(h, w) < min_resolution:
                raise ImageError(f"resolution {w}x{h} px is below the minimum of {min_resolution} px", path=sample.key,
                                 code="too_small")
            return DecodedImage(px, w, h, "npz", 8, None)
        return read_image(self.root / sample.key, min_resolution=min_resolution)

    def label_matrix(self, indices: list[int] | None = None) -> np.ndarray:
        idx = range(len(self.samples)) if indices is None else indices
        if not len(idx):
            return np.zeros((0, len(self.findings)), np.float32)
        return np.stack([self.samples[i].labels for i in idx]).astype(np.float32)

    def subset(self, indices: list[int]) -> "Manifest":
        """A manifest over some samples (e.g. one hospital's partition); shares the pixel arrays."""
        return Manifest(self.source, self.root, list(self.findings), [self.samples[i] for i in indices],
                        [], self.multilabel, self.arrays, list(self.notes), self.patient_ids)

    def finding_counts(self, indices: list[int] | None = None) -> dict[str, int]:
        y = self.label_matrix(indices)
        return {f: int(np.nansum(y[:, j])) for j, f in enumerate(self.findings)}

    def patients(self, indices: list[int] | None = None) -> int:
        idx = range(len(self.samples)) if indices is None else indices
        return len({self.samples[i].group for i in idx})

    def exclusion_reasons(self) -> Counter:
        return Counter(e.reason.split(":")[0] for e in self.excluded)
