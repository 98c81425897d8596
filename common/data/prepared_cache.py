"""Prepared images on the hospital's own disk: a folder is decoded once, not once per Flower message.

In deployment every message runs in a new ClientApp process, which would decode and resize the whole folder
again. `build_datasets(..., cache_dir=...)` keeps what decoding produced - the (1, S, S) uint8 images, the
facts the input-quality gate reads and each excluded image's reason - under
`<cache_dir>/<fingerprint>/` and memory-maps it back in the next process.

The fingerprint covers everything the prepared pixels depend on: each image's path, size and modification
time, the preprocessing settings, the minimum resolution, and the source code of the decoding and
preprocessing modules (a new release that changes them never reads an old cache). Anything unreadable or
inconsistent is ignored and rebuilt. The cache holds patient images and file names, so it is written with
private modes (0700 folder, 0600 files) and never leaves the hospital; only the newest `KEEP` entries stay.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.data.manifest import Exclusion
from common.fileio import write_atomic, write_json

log = logging.getLogger(__name__)
FORMAT = 1
KEEP = 4   # fingerprints kept per cache folder (settings a hospital alternates between), least recent dropped
_CODE = ("common/imageio.py", "common/transforms.py", "common/data/dataset.py", "common/data/prepared_cache.py")


def _code_hash() -> str:
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for rel in _CODE:
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def fingerprint(manifest, indices: list[int], preprocess: dict, min_resolution: int) -> str:
    """What the prepared images of these samples depend on (see the module docstring)."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "code": _code_hash(), "preprocess": preprocess,
                                   "min_resolution": min_resolution}, sort_keys=True).encode())
    for i in sorted(set(indices)):
        key = manifest.samples[i].key
        try:
            st = (Path(manifest.root) / key).stat()
            h.update(f"{key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{key}\0missing\n".encode())
    return h.hexdigest()[:32]


def load(cache_dir: str | Path, fp: str) -> dict[str, tuple[torch.Tensor, dict] | Exclusion] | None:
    """{sample key: (uint8 image, facts) or why it was excluded}, or None when there is no usable entry."""
    entry = Path(cache_dir) / fp
    try:
        index = json.loads((entry / "index.json").read_text())
        if index.get("format") != FORMAT:
            return None
        images = np.load(entry / "images.npy", mmap_mode="c")   # copy-on-write: nothing goes back to disk
        if images.dtype != np.uint8 or len(images) != len(index["keys"]):
            return None
        os.utime(entry)   # most recently used
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    codes = index.get("excluded_codes", {})
    out: dict[str, tuple[torch.Tensor, dict] | Exclusion] = {
        k: Exclusion(k, reason, codes.get(k, "unusable_image")) for k, reason in index["excluded"].items()}
    for row, (key, facts) in enumerate(zip(index["keys"], index["facts"])):
        out[key] = (torch.from_numpy(images[row]), facts)
    return out


def save(cache_dir: str | Path, fp: str, prepared: dict[str, tuple[torch.Tensor, dict]],
         excluded: list[Exclusion]) -> Path | None:
    """Write one entry atomically (a temporary folder renamed into place); a full disk only costs speed."""
    root = Path(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        tmp = Path(tempfile.mkdtemp(prefix=f".{fp}-", dir=root))   # mkdtemp: mode 0700
        keys = list(prepared)
        images = (np.stack([prepared[k][0].numpy() for k in keys]) if keys else np.zeros((0, 1, 1, 1), np.uint8))
        def write_images(path: str) -> None:
            with open(path, "wb") as f:   # a file object: np.save would append .npy to a bare path
                np.save(f, images.astype(np.uint8, copy=False))

        write_atomic(tmp / "images.npy", write_images)
        write_json(tmp / "index.json", {"format": FORMAT, "keys": keys, "facts": [prepared[k][1] for k in keys],
                                        "excluded": {e.key: e.reason for e in excluded},
                                        "excluded_codes": {e.key: e.code for e in excluded}})
        if (root / fp).exists():   # an entry `load` could not use (damaged): replaced
            shutil.rmtree(root / fp, ignore_errors=True)
        try:
            tmp.rename(root / fp)
        except OSError:   # another process wrote the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(root)
        return root / fp
    except OSError as e:
        log.warning("prepared-image cache not written (%s); the next message decodes the images again",
                    type(e).__name__)
        return None


def _prune(root: Path) -> None:
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
