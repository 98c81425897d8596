"""From settings to prepared datasets: the single path from a data source to cached torch datasets.

Centralised training, the Flower client, the server's evaluation and the simulations all use it, so every
arm sees identically prepared images.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from common.settings import Settings
from common.data import prepared_cache
from common.data.dataset import XrayDataset
from common.data.manifest import Manifest
from common.data.report import data_report
from common.data.sources import load_manifest
from common.data.splits import patient_split
from common.errors import DataError
from common.transforms import Augmenter, Preprocessor


@dataclass
class PreparedData:
    manifest: Manifest
    splits: dict[str, list[int]]
    datasets: dict[str, XrayDataset]

    @property
    def findings(self) -> list[str]:
        return self.manifest.findings

    def report(self) -> dict:
        return data_report(self.manifest, {k: ds.indices for k, ds in self.datasets.items()})

    def fingerprint(self) -> str:
        """Which images each split holds (a hash of the sample keys per split, after exclusions): two runs with
        equal fingerprints trained and were scored on the same images."""
        members = {k: sorted(self.manifest.samples[i].key for i in ds.indices) for k, ds in self.datasets.items()}
        return hashlib.sha256(json.dumps(members, sort_keys=True).encode()).hexdigest()[:16]


def build_datasets(manifest: Manifest, splits: dict[str, list[int]], cfg: Settings, *,
                   progress: bool = True, cache_dir: str | Path | None = None) -> dict[str, XrayDataset]:
    """Datasets for each split (augmentation on train only), preloaded so bad images are excluded up front.

    `cache_dir`: keep the prepared images there and reuse them in the next process (a deployment node:
    common/data/prepared_cache.py); image files only, and only when cfg.data.cache_images."""
    pre = Preprocessor(cfg.preprocess)
    aug = Augmenter(cfg.augment)
    min_res = cfg.data.min_resolution if manifest.arrays is None else 1
    use_disk = cache_dir is not None and manifest.arrays is None and cfg.data.cache_images
    fp = prepared = None
    if use_disk:
        fp = prepared_cache.fingerprint(manifest, [i for idx in splits.values() for i in idx],
                                        cfg.preprocess.model_dump(mode="json"), min_res)
        prepared = prepared_cache.load(cache_dir, fp)
    excluded_before = len(manifest.excluded)
    out = {}
    for name, idx in splits.items():
        ds = XrayDataset(manifest, idx, pre, aug if name == "train" else None, cache=cfg.data.cache_images,
                         min_resolution=min_res, name=name, progress=progress)
        ds.preload(prepared)
        if idx and len(ds) == 0:
            raise DataError(f"every image of the {name} split was excluded (see the data report)",
                            path=str(manifest.root), failure="data-too-small")
        out[name] = ds
    if use_disk and prepared is None:
        items = {k: v for ds in out.values() for k, v in ds.prepared_items().items()}
        prepared_cache.save(cache_dir, fp, items, manifest.excluded[excluded_before:])
    return out


def prepare_data(cfg: Settings, *, site: str = "", progress: bool = True) -> PreparedData:
    manifest = load_manifest(cfg.data, site)
    splits = patient_split(manifest, cfg.data)
    return PreparedData(manifest, splits, build_datasets(manifest, splits, cfg, progress=progress))
