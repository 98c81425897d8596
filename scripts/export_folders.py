"""Write a MedMNIST .npz (e.g. ../shared/data/pneumoniamnist.npz, real paediatric chest X-rays) as the folder
layouts public chest X-ray sets ship, to try `fedxray data check|train|federate` on them:

* kaggle:   train/ val/ test/, each with NORMAL/ PNEUMONIA/      (the Kaggle pneumonia set's layout)
* numbered: train/ valid/ test/, each with 0_normal/ 1_abnormal/

    .venv/bin/python scripts/export_folders.py ../shared/data/pneumoniamnist.npz /tmp/kaggle --layout kaggle
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

LAYOUTS = {"kaggle": ({"train": "train", "val": "val", "test": "test"}, ("NORMAL", "PNEUMONIA")),
           "numbered": ({"train": "train", "val": "valid", "test": "test"}, ("0_normal", "1_abnormal"))}


def export(npz: Path, out: Path, layout: str, per_split: int | None = None) -> dict[str, int]:
    splits, classes = LAYOUTS[layout]
    counts = {}
    with np.load(npz, allow_pickle=False) as z:
        for split, folder in splits.items():
            images, labels = z[f"{split}_images"], z[f"{split}_labels"][:, 0]
            keep = np.arange(len(images))[: per_split or None]
            for i in keep:
                d = out / folder / classes[int(labels[i] > 0)]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(d / f"{split}_{i:05d}.png")
            counts[folder] = len(keep)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("npz", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="kaggle")
    p.add_argument("--per-split", type=int, default=None, help="at most this many images per split")
    a = p.parse_args(argv)
    if not a.npz.is_file():
        print(f"error: {a.npz}: no such file (the real data lives in ../shared/data/ beside the project)",
              file=sys.stderr)
        return 2
    for folder, n in export(a.npz, a.out, a.layout, a.per_split).items():
        print(f"{a.out / folder}: {n} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
