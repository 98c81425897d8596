"""Torch datasets over a Manifest: decode once, cache the prepared uint8 images, augment per item.

Decoding is where unusable images are found: `preload()` excludes corrupt, truncated or low-resolution
files, records why in `manifest.excluded`, and never stops the run for one bad file.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from common.data.manifest import Exclusion, Manifest
from common.errors import ImageError
from common.transforms import Augmenter, Preprocessor


class XrayDataset(Dataset):
    """Items are (image (C,S,S) float, labels (F,) float with NaN->0, mask (F,) bool: label known)."""

    def __init__(self, manifest: Manifest, indices: list[int], preprocessor: Preprocessor,
                 augmenter: Augmenter | None = None, *, cache: bool = True, min_resolution: int = 1,
                 name: str = "data", progress: bool = True):
        self.manifest, self.indices = manifest, list(indices)
        self.pre, self.aug = preprocessor, augmenter
        self.cache_enabled, self.min_resolution = cache, min_resolution
        self.name, self.progress = name, progress
        self._cache: dict[int, torch.Tensor] = {}
        self._facts: dict[int, dict] = {}  # per image: original size, colourfulness, view (input-quality gate)
        y = manifest.label_matrix(self.indices)
        self._mask = ~np.isnan(y)
        self._labels = np.nan_to_num(y)

    def preload(self, prepared: dict | None = None) -> list[Exclusion]:
        """Decode and prepare every image now (progress bar); drop and record the ones that fail.

        `prepared`: {sample key: (uint8 image, facts) or its Exclusion} from an earlier process
        (common/data/prepared_cache.py); those samples are not decoded again."""
        keep, excluded = [], []
        for pos, i in enumerate(tqdm(self.indices, desc=f"loading {self.name}", unit="img", leave=False,
                                     disable=True if not self.progress or len(self.indices) < 200 else None)):
            key = self.manifest.samples[i].key
            known = prepared.get(key) if prepared is not None else None
            if isinstance(known, Exclusion):
                excluded.append(known)
                continue
            try:
                if known is not None:
                    img, self._facts[i] = known
                else:
                    img = self._prepare(i)
            except ImageError as e:
                excluded.append(Exclusion(key, e.reason, e.code))
                continue
            keep.append(pos)
            if self.cache_enabled:
                self._cache[i] = img
        if excluded:
            self.indices = [self.indices[p] for p in keep]
            self._labels, self._mask = self._labels[keep], self._mask[keep]
            self.manifest.excluded.extend(excluded)
        return excluded

    def _prepare(self, i: int) -> torch.Tensor:
        sample = self.manifest.samples[i]
        decoded = self.manifest.load(sample, self.min_resolution)
        self._facts[i] = {"width": decoded.width, "height": decoded.height,
                          "colourfulness": decoded.colourfulness, "view": decoded.view or sample.view}
        return self.pre.prepare(decoded.pixels)

    def prepared(self, pos: int) -> torch.Tensor:
        """Item `pos` as the model-size uint8 image (1, S, S), without augmentation."""
        i = self.indices[pos]
        img = self._cache.get(i)
        return img if img is not None else self._prepare(i)

    def prepared_items(self) -> dict[str, tuple[torch.Tensor, dict]]:
        """{sample key: (uint8 image, facts)} of every preloaded image (what the prepared-image cache keeps)."""
        return {self.manifest.samples[i].key: (img, self._facts[i]) for i, img in self._cache.items()}

    def decode_facts(self, pos: int) -> dict:
        """Original width/height, colourfulness and view of item `pos` (what the input-quality gate reads)."""
        i = self.indices[pos]
        if i not in self._facts:
            self._prepare(i)
        return self._facts[i]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int):
        i = self.indices[pos]
        img = self._cache.get(i)
        if img is None:
            img = self._prepare(i)
            if self.cache_enabled:
                self._cache[i] = img
        if self.aug is not None:
            img = self.aug(img)
        return (self.pre.finalize(img), torch.from_numpy(self._labels[pos]),
                torch.from_numpy(self._mask[pos]))

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def mask(self) -> np.ndarray:
        return self._mask
