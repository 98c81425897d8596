"""Synthetic hospitals in the ChestX-ray14 layout: the embedded default for demos and tests (no download).

Chest-like images (body, lung fields, heart, spine, ribs, diaphragm, noise) with findings planted where a
radiologist would look: a focal opacity in a lung for Nodule / Pneumonia, an enlarged heart for
Cardiomegaly, a blunted costophrenic angle for Effusion; each planted region's box goes into
BBox_List_2017.csv so explanations can be scored. Hospitals differ in exposure, contrast (gamma), noise and
label prevalence, so they are genuinely non-IID. Patients have several images and never cross hospitals.
"""
from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

SYNTH_FINDINGS = ("Cardiomegaly", "Effusion", "Nodule", "Pneumonia")
FOCAL_FINDINGS = ("Nodule", "Pneumonia")
NIH_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
BBOX_HEADER = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]


@dataclass
class Acquisition:
    """How one hospital's scanner and population differ from the others."""

    exposure: float = 0.0     # additive brightness
    gamma: float = 1.0        # contrast curve
    noise: float = 0.03       # Gaussian noise sigma
    prevalence: dict[str, float] = field(default_factory=lambda: {f: 0.25 for f in SYNTH_FINDINGS})


def hospital_profiles(n: int, seed: int, base_prevalence: float = 0.25) -> list[Acquisition]:
    rng = np.random.default_rng(seed + 7919)
    return [Acquisition(exposure=float(rng.uniform(-0.08, 0.08)), gamma=float(rng.uniform(0.8, 1.25)),
                        noise=float(rng.uniform(0.015, 0.05)),
                        prevalence={f: float(np.clip(base_prevalence * rng.uniform(0.5, 1.6), 0.05, 0.6))
                                    for f in SYNTH_FINDINGS})
            for _ in range(n)]


def _ellipse(xx, yy, cx, cy, rx, ry, soft=0.015):
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip((1 - d) / soft * min(rx, ry) + 0.5, 0, 1)


def render(size: int, findings: set[str], rng: np.random.Generator, acq: Acquisition
           ) -> tuple[np.ndarray, dict[str, tuple[float, float, float, float]]]:
    """One image (H, W) float [0,1] and the box (x, y, w, h, in pixels) of each planted finding."""
    ax = np.linspace(0, 1, size, dtype=np.float32)
    xx, yy = np.meshgrid(ax, ax)
    dx, dy, sc = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03), rng.uniform(0.95, 1.05)
    X, Y = (xx - 0.5 - dx) / sc + 0.5, (yy - 0.5 - dy) / sc + 0.5   # anatomy coordinates

    img = np.full_like(xx, 0.05)
    img += 0.40 * _ellipse(X, Y, 0.5, 0.56, 0.46, 0.52)                       # soft tissue
    lungs = [(0.31, 0.45, 0.15, 0.30), (0.69, 0.45, 0.15, 0.30)]
    lung_mask = np.maximum(*[_ellipse(X, Y, *l) for l in lungs])
    img -= 0.28 * lung_mask
    for k in range(9):                                                         # ribs over the lungs
        y0 = 0.2 + 0.065 * k
        rib = np.exp(-(((Y - (y0 + 0.5 * (X - 0.5) ** 2)) / 0.008) ** 2))
        img += 0.07 * rib * lung_mask
    img += 0.22 * np.exp(-((X - 0.5) / 0.03) ** 2) * (Y > 0.12)                # spine / mediastinum
    boxes: dict[str, tuple[float, float, float, float]] = {}
    heart_rx = 0.13 * (1.45 if "Cardiomegaly" in findings else 1.0) * rng.uniform(0.93, 1.07)
    heart = _ellipse(X, Y, 0.55, 0.63, heart_rx, 0.12)
    img = np.maximum(img, 0.5 * heart + img * (1 - heart))
    boxes["Cardiomegaly"] = (0.55 - heart_rx, 0.63 - 0.12, 2 * heart_rx, 0.24)
    img = np.maximum(img, 0.45 * (Y > 0.76 + 0.04 * np.cos((X - 0.5) * 6)))    # diaphragm

    if "Effusion" in findings:                                                 # blunted costophrenic angle
        cx, cy, rx, ry = lungs[rng.integers(2)]
        level = cy + ry * rng.uniform(0.35, 0.6)
        fluid = _ellipse(X, Y, cx, cy, rx, ry) * np.clip((Y - level - 0.05 * np.abs(X - cx) / rx) / 0.02, 0, 1)
        img = img + 0.3 * fluid
        boxes["Effusion"] = (cx - rx, level - 0.03, 2 * rx, cy + ry - level + 0.03)
    for name, (r_lo, r_hi, amp) in {"Nodule": (0.03, 0.045, 0.45), "Pneumonia": (0.07, 0.1, 0.3)}.items():
        if name not in findings:
            continue
        cx, cy, rx, ry = lungs[rng.integers(2)]
        r = rng.uniform(r_lo, r_hi)
        ox = cx + rng.uniform(-1, 1) * (rx - r) * 0.6
        oy = cy + rng.uniform(-1, 1) * (ry - r) * 0.6
        blob = np.exp(-(((X - ox) ** 2 + (Y - oy) ** 2) / (2 * (r / 1.6) ** 2)))
        if name == "Pneumonia":
            blob *= 0.75 + 0.5 * rng.random(blob.shape).astype(np.float32)  # patchy texture
        img += amp * blob
        boxes[name] = (ox - r, oy - r, 2 * r, 2 * r)

    img = np.clip(img + acq.exposure, 0, 1) ** acq.gamma
    img = np.clip(img + rng.normal(0, acq.noise, img.shape), 0, 1)
    # boxes from anatomy coordinates to pixels of this image
    px = {f: ((x - 0.5) * sc + 0.5 + dx, (y - 0.5) * sc + 0.5 + dy, w * sc, h * sc) for f, (x, y, w, h) in boxes.items()}
    return img.astype(np.float32), {f: tuple(v * size for v in b) for f, b in px.items() if f in findings}


def write_hospital(out: Path, *, patients: int, size: int, acq: Acquisition, seed: int, patient_offset: int,
                   test_fraction: float = 0.2, bad_images: int = 0, progress: bool = True) -> int:
    """Write one hospital in the ChestX-ray14 layout; returns the number of images written."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, box_rows, test_list, trainval_list = [], [], [], []
    for p in tqdm(range(patients), desc=f"synth {out.name}", unit="patient", leave=False, disable=None if progress else True):
        pid = patient_offset + p + 1
        # lists, not sets: iterating a set of strings follows PYTHONHASHSEED, so the rng draws (and the
        # whole data set) would differ between processes with the same seed
        base = [f for f in SYNTH_FINDINGS if rng.random() < acq.prevalence[f]]
        age, sex = int(rng.integers(18, 90)), "MF"[rng.integers(2)]
        in_test = rng.random() < test_fraction
        for fu in range(int(rng.integers(1, 4))):
            findings = {f for f in base if rng.random() < 0.85}   # draws in the list's order
            img, boxes = render(size, findings, rng, acq)
            name = f"{pid:08d}_{fu:03d}.png"
            Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(out / "images" / name)
            labels = "|".join(sorted(findings)) or "No Finding"
            rows.append([name, labels, fu, pid, age, sex, "PA", size, size, 0.143, 0.143])
            for f, (x, y, w, h) in sorted(boxes.items()):
                box_rows.append([name, f, f"{x:.1f}", f"{y:.1f}", f"{w:.1f}", f"{h:.1f}"])
            (test_list if in_test else trainval_list).append(name)
    for k in range(bad_images):  # listed in the CSV but unusable: exercised by `fedxray data check`
        name = f"{patient_offset + patients + k + 1:08d}_000.png"
        path = out / "images" / name
        if k % 3 == 0:
            path.write_bytes(b"")
        elif k % 3 == 1:
            buf = (out / "images" / rows[0][0]).read_bytes()
            path.write_bytes(buf[: len(buf) // 2])
        else:
            Image.new("L", (16, 16)).save(path)
        rows.append([name, "No Finding", 0, patient_offset + patients + k + 1, 50, "F", "PA", size, size, 0.143, 0.143])
        trainval_list.append(name)
    with open(out / "Data_Entry_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(NIH_COLUMNS)
        w.writerows(rows)
    with open(out / "BBox_List_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(BBOX_HEADER)
        w.writerows(box_rows)
    (out / "test_list.txt").write_text("".join(n + "\n" for n in test_list))
    (out / "train_val_list.txt").write_text("".join(n + "\n" for n in trainval_list))
    return len(rows)


def synthesize(out: str | Path, *, hospitals: int = 3, patients: int = 60, size: int = 128, seed: int = 0,
               holdout_patients: int | None = None, prevalence: float = 0.25, bad_images: int = 0,
               progress: bool = True) -> dict[str, int]:
    """Write `out/hospital_<k>/` for each hospital plus `out/holdout/` (the server's held-out test set).

    Returns {folder name: images written}. Patient ids are unique across all folders.
    """
    out = Path(out)
    profiles = hospital_profiles(hospitals, seed, prevalence)
    written: dict[str, int] = {}
    for h, acq in enumerate(profiles):
        written[f"hospital_{h + 1}"] = write_hospital(
            out / f"hospital_{h + 1}", patients=patients, size=size, acq=acq, seed=seed * 1000 + h,
            patient_offset=(h + 1) * 100_000, bad_images=bad_images, progress=progress)
    n_hold = patients if holdout_patients is None else holdout_patients
    if n_hold > 0:
        neutral = Acquisition(prevalence={f: prevalence for f in SYNTH_FINDINGS})
        written["holdout"] = write_hospital(out / "holdout", patients=n_hold, size=size, acq=neutral,
                                            seed=seed * 1000 + 999, patient_offset=0, test_fraction=0.5,
                                            progress=progress)
    return written


# How real hospital folders break: a missing image, a renamed column, a label nobody knows, no folder at all,
# images that do not decode. Each is one DataError code at the hospital boundary (client/boundary.py).
BREAKS = ("missing-images", "bad-header", "unknown-label", "missing-folder", "corrupt-images")


def break_hospital(src: str | Path, dst: str | Path, how: str) -> Path:
    """A copy of a hospital folder in the ChestX-ray14 layout broken in one of the ways real data breaks
    (BREAKS), for tests and the reliability benchmark; returns the data-path to give its node."""
    src, dst = Path(src), Path(dst)
    if how == "missing-folder":
        return dst / "gone_00123456"
    shutil.copytree(src, dst)
    table = dst / "Data_Entry_2017.csv"
    lines = table.read_text().splitlines()
    if how == "missing-images":
        for line in lines[5:7]:
            (dst / "images" / line.split(",")[0]).unlink()
    elif how == "bad-header":
        table.write_text("\n".join(["Image,Labels" + lines[0][len("Image Index,Finding Labels"):], *lines[1:]]) + "\n")
    elif how == "unknown-label":
        cells = lines[9].split(",")
        cells[1] = "Pneumonia|Spleen Tumour"
        table.write_text("\n".join([*lines[:9], ",".join(cells), *lines[10:]]) + "\n")
    elif how == "corrupt-images":
        for png in (dst / "images").iterdir():
            png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    else:
        raise ValueError(how)
    return dst
