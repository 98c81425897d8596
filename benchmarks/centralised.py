"""Centralised training on real chest X-rays (PneumoniaMNIST, official test split) vs MedMNIST v2's figures.

    .venv/bin/python benchmarks/centralised.py [--epochs 10] [--image-size 64] [--archs resnet18,resnet50]

Trains from scratch (ImageNet weights can't be fetched here), each architecture in its own process so
peak memory is per model, and prints test AUC / accuracy / F1, training images/s and peak memory next to
the published MedMNIST v2 numbers (ResNet trained on the full official train split at 28 and 224 px).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import SHARED_DATA, peak_rss_mb, run_worker, table  # noqa: E402

PUBLISHED = {"ResNet-18 (28)": (0.944, 0.854), "ResNet-50 (28)": (0.948, 0.854),
             "ResNet-18 (224)": (0.956, 0.864), "ResNet-50 (224)": (0.962, 0.884)}


def worker(arch: str, epochs: int, image_size: int, batch_size: int, lr: float) -> dict:
    os.environ["TQDM_DISABLE"] = "1"
    from common.settings import Settings
    from common.centralised import run_centralised

    with tempfile.TemporaryDirectory() as out:
        cfg = Settings.model_validate({
            "data": {"source": "medmnist", "path": str(SHARED_DATA / "pneumoniamnist.npz")},
            "preprocess": {"image_size": image_size},
            "model": {"arch": arch, "weights": "none"},
            "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "early_stopping_patience": 0,
                      "bootstrap": 200},
            "output_dir": out})
        t0 = time.perf_counter()
        s = run_centralised(cfg, progress=False)
    h = s["test"]["headline"]
    ips = sum(e["images_per_s"] for e in s["history"]) / len(s["history"])
    return {"arch": arch, "auc": h["auc"], "accuracy": h["accuracy"], "f1": h["f1"],
            "auc_ci": s["test"]["headline_ci"]["auc"], "best_epoch": s["best_epoch"], "images_per_s": ips,
            "wall_s": time.perf_counter() - t0, "peak_mb": peak_rss_mb()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.archs, a.epochs, a.image_size, a.batch_size, a.lr)))
        return 0
    if not (SHARED_DATA / "pneumoniamnist.npz").is_file():
        print(f"error: {SHARED_DATA / 'pneumoniamnist.npz'} not found: this benchmark needs the workplace's "
              "shared data (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    rows = []
    for arch in a.archs.split(","):
        print(f"training {arch} ({a.epochs} epochs, {a.image_size} px) ...", file=sys.stderr, flush=True)
        r = run_worker(__file__, ["--archs", arch, "--epochs", str(a.epochs), "--image-size", str(a.image_size),
                                  "--batch-size", str(a.batch_size), "--lr", str(a.lr)])
        ci = r["auc_ci"]
        rows.append([f"fedxray {arch} ({a.image_size}px, {a.epochs} ep, scratch)", r["auc"],
                     f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else None, r["accuracy"], r["f1"], r["best_epoch"],
                     r["images_per_s"], r["wall_s"], r["peak_mb"]])
    for name, (auc, acc) in PUBLISHED.items():
        rows.append([f"MedMNIST v2 {name} (published)", auc, None, acc, None, None, None, None, None])
    print(table(["model", "test AUC", "AUC 95% CI", "accuracy", "F1", "best ep", "train img/s", "wall s",
                 "peak MiB"], rows, title="PneumoniaMNIST official test split (624 images)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
