"""From settings to prepared datasets: the single path from a data source to cached torch datasets.

Centralised training, the Flower client, the server's evaluation and the simulations all use it, so every
arm sees identically prepared images.
"""
from __future__ import annotations

from dataclasses import dataclass


from common.settings import Settings
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


def build_datasets(manifest: Manifest, splits: dict[str, list[int]], cfg: Settings, *,
                   progress: bool = True) -> dict[str, XrayDataset]:
    """Datasets for each split (augmentation on train only), preloaded so bad images are excluded up front."""
    pre = Preprocessor(cfg.preprocess)
    aug = Augmenter(cfg.augment)
    out = {}
    for name, idx in splits.items():
        ds = XrayDataset(manifest, idx, pre, aug if name == "train" else None, cache=cfg.data.cache_images,
                         min_resolution=cfg.data.min_resolution if manifest.arrays is None else 1,
                         name=name, progress=progress)
        ds.preload()
        if idx and len(ds) == 0:
            raise DataError(f"every image of the {name} split was excluded (see the data report)",
                            path=str(manifest.root), failure="data-too-small")
        out[name] = ds
    return out


def prepare_data(cfg: Settings, *, site: str = "", progress: bool = True) -> PreparedData:
    manifest = load_manifest(cfg.data, site)
    splits = patient_split(manifest, cfg.data)
    return PreparedData(manifest, splits, build_datasets(manifest, splits, cfg, progress=progress))
