"""Hand the protocol's exact split to the Flower apps, through a data layout they already read.

The ClientApp finds its data as `<data-path>/<site folder k>` for partition k and splits it by the source's
official train/val/test; the ServerApp evaluates on `<data-path>/holdout` split by its official val/test.
Writing each hospital as a MedMNIST-layout .npz (train/val/test = that hospital's own splits) and the
global val/test as holdout/ makes the federated arm train and evaluate on exactly the images the
centralised and local-only arms use. WORKAROUND until the apps accept a partition file (see README):
it copies pixels (uint8), so it suits the small images simulations use.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.data.manifest import Manifest
from common.errors import FedxrayError, ImageError
from common.labels import CHESTXRAY14_FINDINGS
from simulations.protocol import Protocol


def npz_layout(findings: list[str]) -> tuple[str, list[str]]:
    """(file stem, label columns) so that load_medmnist names the findings exactly as the manifest does."""
    if findings == ["Pneumonia"]:
        return "pneumoniamnist", ["Pneumonia"]
    if all(f in CHESTXRAY14_FINDINGS for f in findings):
        return "chestmnist", list(CHESTXRAY14_FINDINGS)
    raise FedxrayError(f"findings {findings} cannot be passed to the Flower apps in this version (only "
                       "ChestX-ray14 findings or PneumoniaMNIST); the apps need a partition-file option for others")


def _pixels(manifest: Manifest, idx: list[int], size: int) -> tuple[np.ndarray, list[int]]:
    """uint8 (N, S, S) images of `idx` (original pixels when all share one size) and the indices kept."""
    imgs, kept = [], []
    for i in idx:
        try:
            px = manifest.load(manifest.samples[i], 1).pixels
        except ImageError:
            continue   # the datasets exclude it too
        imgs.append(px)
        kept.append(i)
    if not imgs:
        return np.zeros((0, size, size), np.uint8), kept
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        import torch
        import torch.nn.functional as F
        imgs = [F.interpolate(torch.from_numpy(np.ascontiguousarray(im, np.float32))[None, None], size=(size, size),
                              mode="bilinear", antialias=True)[0, 0].numpy() for im in imgs]
    return (np.clip(np.stack(imgs), 0, 1) * 255).round().astype(np.uint8), kept


def _labels(manifest: Manifest, idx: list[int], columns: list[str]) -> np.ndarray:
    y = manifest.label_matrix(idx)
    out = np.zeros((len(idx), len(columns)), np.float32)
    for j, f in enumerate(manifest.findings):
        out[:, columns.index(f)] = y[:, j]
    return out.astype(np.uint8) if len(columns) == 1 else out


def _write_npz(folder: Path, stem: str, manifest: Manifest, splits: dict[str, list[int]], columns: list[str],
               size: int) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays, counts = {}, {}
    for split in ("train", "val", "test"):
        px, kept = _pixels(manifest, splits.get(split, []), size)
        arrays[f"{split}_images"] = px
        arrays[f"{split}_labels"] = _labels(manifest, kept, columns)
        counts[split] = len(kept)
    np.savez_compressed(folder / f"{stem}.npz", **arrays)
    return counts


def write_split_folder(manifest: Manifest, splits: dict[str, list[int]], folder: Path, image_size: int) -> dict:
    """One folder whose MedMNIST-layout .npz holds `splits` (train/val/test) as the data layer reads it back
    with data.official_split=keep; returns the image count per split."""
    stem, columns = npz_layout(list(manifest.findings))
    return _write_npz(Path(folder), stem, manifest, splits, columns, image_size)


def materialise(proto: Protocol, out: Path, image_size: int) -> Path:
    """Write `out/<hospital>/` for every hospital and `out/holdout/` (global val/test); returns `out`.

    Skipped when `out/done` exists (resume: the same partition is written once)."""
    out = Path(out)
    if (out / "done").is_file():
        return out
    stem, columns = npz_layout(list(proto.manifest.findings))
    for h in proto.hospitals:
        _write_npz(out / h.name, stem, proto.manifest, h.splits, columns, image_size)   # a site folder: one .npz
    _write_npz(out / "holdout", stem, proto.manifest, {k: v for k, v in proto.global_splits.items() if k != "train"},
               columns, image_size)
    (out / "done").write_text("ok\n")
    return out
