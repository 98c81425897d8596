"""Readers for each public dataset layout, as its publishers ship it, onto one Manifest.

Structural problems (missing CSV, wrong header, unknown label, missing image) are DataErrors naming the
file and line: a run must not silently train on something other than what the hospital meant.
"""
from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.settings import DataConfig
from common.data.manifest import Box, Manifest, Sample
from common.data.splits import SPLITS
from common.errors import DataError
from common.labels import (
    CHESTXRAY14_FINDINGS, CHESTXRAY14_NO_FINDING, CHEXPERT_COLUMNS, MEDMNIST_FINDINGS, canonical,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
NIH_CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NIH_HEADER = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age")
NIH_BBOX = "BBox_List_2017.csv"
CHEXPERT_REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
#: Class-folder names of the negative class, once a numeric prefix is dropped and separators read as spaces.
NORMAL_CLASS_NAMES = {"normal", "no finding", "healthy", "negative"}
#: Split folders as public sets ship them (any case) -> the official split they are.
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_NUMERIC_PREFIX = re.compile(r"^\d+[\s._-]*(?=[^\W\d_])")     # "0_normal", "1-abnormal", "2 effusion"
_NIH_NAME = re.compile(r"^(\d{8})_\d{3}$")                     # ChestX-ray14: 00012345_003.png, patient 00012345


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, row) pairs; line numbers are 1-based file lines as an editor shows them."""
    if not path.is_file():
        raise DataError("file not found", path=str(path), failure="data-not-found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"not a readable CSV file: {e}", path=str(path), failure="data-csv") from e
    if not rows:
        raise DataError("CSV file is empty", path=str(path), failure="data-csv")
    return [h.strip() for h in rows[0]], [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]


def _check_header(path: Path, header: list[str], expected: tuple[str, ...], *, prefix: bool = True) -> None:
    got = tuple(header[: len(expected)]) if prefix else tuple(h for h in expected if h in header)
    if got != expected:
        raise DataError(f"unexpected CSV header: expected columns {list(expected)}, found {header[:len(expected) + 2]}",
                        path=str(path), line=1, failure="data-csv")


def _select_findings(available: list[str], wanted: list[str] | None, where: str) -> list[str]:
    if wanted is None:
        return list(available)
    chosen = [canonical(f) for f in wanted]
    unknown = [f for f in chosen if f not in available]
    if unknown:
        raise DataError(f"findings {unknown} are not labelled by this source (it has {available}); choose "
                        "the findings with data.findings (e.g. --set data.findings=" + ",".join(available[:2]) + ")",
                        path=where, failure="data-labels")
    return chosen


def _index_images(root: Path, subdirs: list[Path]) -> dict[str, str]:
    """Map file name -> path relative to root, scanning the folders a source ships its images in."""
    index: dict[str, str] = {}
    for d in subdirs:
        if d.is_dir():
            for dirpath, _, files in os.walk(d):
                for f in files:
                    if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                        index.setdefault(f, os.path.relpath(os.path.join(dirpath, f), root))
    return index


def _missing_error(missing: list[tuple[int, str]], csv_path: Path, total: int, hint: str = "") -> DataError:
    first = ", ".join(f"line {ln}: {name}" for ln, name in missing[:5])
    return DataError(f"{len(missing)} of {total} images listed are missing on disk (first: {first}); "
                     f"{hint + '; ' if hint else ''}restore them or remove their rows",
                     path=str(csv_path), line=missing[0][0], failure="data-missing-images")


# --------------------------------------------------------------------------------------------- ChestX-ray14

def load_chestxray14(root: Path, cfg: DataConfig, site: str = "") -> Manifest:
    """NIH ChestX-ray14: Data_Entry_2017[_v2020].csv, images/ or images_NNN/images/, official split lists, boxes."""
    csv_path = next((root / n for n in NIH_CSV_NAMES if (root / n).is_file()), None)
    if csv_path is None:
        raise DataError(f"no {' or '.join(NIH_CSV_NAMES)} found: is this a ChestX-ray14 folder?",
                        path=str(root), failure="data-layout")
    header, rows = _read_csv(csv_path)
    _check_header(csv_path, header, NIH_HEADER)
    view_col = header.index("View Position") if "View Position" in header else None
    findings = _select_findings(list(CHESTXRAY14_FINDINGS), cfg.findings, str(csv_path))
    col = {f: j for j, f in enumerate(findings)}
    known = set(CHESTXRAY14_FINDINGS)

    image_dirs = [root / "images"] + sorted(root.glob("images_*"))
    index = _index_images(root, image_dirs)
    test_names = _read_list(root / "test_list.txt")
    trainval_names = _read_list(root / "train_val_list.txt")
    boxes = _read_nih_boxes(root / NIH_BBOX, known)

    samples, missing = [], []
    for line, row in rows:
        if len(row) < len(NIH_HEADER):
            raise DataError(f"row has {len(row)} columns, expected at least {len(NIH_HEADER)}",
                            path=str(csv_path), line=line, failure="data-csv")
        name, labels_text, pid = row[0].strip(), row[1].strip(), row[3].strip()
        y = np.zeros(len(findings), np.float32)
        for lab in filter(None, (s.strip() for s in labels_text.split("|"))):
            if lab == CHESTXRAY14_NO_FINDING:
                continue
            lab_c = canonical(lab)
            if lab_c not in known:
                raise DataError(f"unknown finding label {lab!r} (known: {sorted(known)} and {CHESTXRAY14_NO_FINDING!r})",
                                path=str(csv_path), line=line, failure="data-labels")
            if lab_c in col:
                y[col[lab_c]] = 1.0
        if not pid:
            raise DataError("empty Patient ID", path=str(csv_path), line=line, failure="data-csv")
        rel = index.get(name)
        if rel is None:
            missing.append((line, name))
            continue
        split = "test" if name in test_names else ("trainval" if name in trainval_names else None)
        view = row[view_col].strip().upper() if view_col is not None and view_col < len(row) else None
        samples.append(Sample(rel, pid.lstrip("0") or "0", y, split, site, view,
                              tuple(b for b in boxes.get(name, ()) if b.finding in col)))
    if missing:
        raise _missing_error(missing, csv_path, len(rows))
    return Manifest("chestxray14", root, findings, samples, patient_ids="from the Patient ID column")


def _read_list(path: Path) -> set[str]:
    return {ln.strip() for ln in path.read_text().splitlines() if ln.strip()} if path.is_file() else set()


def _read_nih_boxes(path: Path, known: set[str]) -> dict[str, list[Box]]:
    """BBox_List_2017.csv: `Image Index,Finding Label,Bbox [x,y,w,h],,,` (x, y, w, h in columns 3-6)."""
    out: dict[str, list[Box]] = {}
    if not path.is_file():
        return out
    header, rows = _read_csv(path)
    _check_header(path, header, ("Image Index", "Finding Label"))
    for line, row in rows:
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except (ValueError, IndexError):
            raise DataError("box needs four numbers x,y,w,h in columns 3-6",
                            path=str(path), line=line, failure="data-csv") from None
        finding = canonical(row[1])
        if finding not in known:
            raise DataError(f"unknown finding label {row[1]!r}", path=str(path), line=line, failure="data-labels")
        out.setdefault(row[0].strip(), []).append(Box(finding, x, y, w, h))
    return out


# --------------------------------------------------------------------------------------------- CheXpert

_PATIENT_RE = re.compile(r"(patient\d+)")


def load_chexpert(root: Path, cfg: DataConfig, site: str = "") -> Manifest:
    """CheXpert train.csv / valid.csv; valid.csv (radiologist-labelled) is the official held-out test split."""
    files = [(root / "train.csv", None), (root / "valid.csv", "test")]
    if not any(p.is_file() for p, _ in files):
        raise DataError("no train.csv or valid.csv found: is this a CheXpert folder?",
                        path=str(root), failure="data-layout")
    findings_src = [c for c in CHEXPERT_COLUMNS if c != "No Finding"]
    available = [canonical(c) for c in findings_src]
    findings = _select_findings(available, cfg.findings, str(root))
    policy = {"u-ones": 1.0, "u-zeros": 0.0, "u-ignore": np.nan}[cfg.uncertainty]
    samples, missing, total = [], [], 0
    for csv_path, split in files:
        if not csv_path.is_file():
            continue
        header, rows = _read_csv(csv_path)
        _check_header(csv_path, header, CHEXPERT_REQUIRED)
        absent = [c for c in findings_src if c not in header]
        if absent:
            raise DataError(f"CheXpert columns missing: {absent}", path=str(csv_path), line=1, failure="data-csv")
        pos = {f: header.index(src) for src, f in zip(findings_src, available) if f in findings}
        i_path, i_fl, i_ap = header.index("Path"), header.index("Frontal/Lateral"), header.index("AP/PA")
        for line, row in rows:
            total += 1
            if cfg.frontal_only and row[i_fl].strip() != "Frontal":
                continue
            y = np.zeros(len(findings), np.float32)
            for j, f in enumerate(findings):
                v = row[pos[f]].strip() if pos[f] < len(row) else ""
                if v in ("", "0", "0.0"):
                    continue
                if v in ("1", "1.0"):
                    y[j] = 1.0
                elif v in ("-1", "-1.0"):
                    y[j] = policy
                else:
                    raise DataError(f"column {header[pos[f]]!r} has value {v!r}; expected 1.0, 0.0, -1.0 or blank",
                                    path=str(csv_path), line=line, failure="data-labels")
            rel = _resolve_chexpert_path(root, row[i_path].strip())
            if rel is None:
                missing.append((line, row[i_path].strip()))
                continue
            m = _PATIENT_RE.search(row[i_path])
            if not m:
                raise DataError(f"cannot find the patient id (patientNNNNN) in path {row[i_path]!r}",
                                path=str(csv_path), line=line, failure="data-csv")
            view = "LATERAL" if row[i_fl].strip() == "Lateral" else (row[i_ap].strip().upper() or None)
            samples.append(Sample(rel, m.group(1), y, split, site, view))
        if missing:
            raise _missing_error(missing, csv_path, total)
    return Manifest("chexpert", root, findings, samples, patient_ids="from the image path (patientNNNNN)")


def _resolve_chexpert_path(root: Path, path: str) -> str | None:
    """Accept `CheXpert-v1.0[-small]/train/...` relative to the folder that holds it, or to itself."""
    parts = Path(path).parts
    for cand in (Path(path), Path(*parts[1:]) if len(parts) > 1 else None):
        if cand is not None and (root / cand).is_file():
            return str(cand)
    return None


# --------------------------------------------------------------------------------------------- MedMNIST

def load_medmnist(path: Path, cfg: DataConfig, site: str = "") -> Manifest:
    """MedMNIST .npz (train/val/test images and labels). It ships no patient ids: each image is its own patient."""
    if path.is_dir():
        npz = sorted(path.glob("*.npz"))
        if len(npz) != 1:
            raise DataError(f"expected exactly one .npz file in the folder, found {len(npz)}",
                            path=str(path), failure="data-layout")
        path = npz[0]
    if not path.is_file():
        raise DataError("file not found", path=str(path), failure="data-not-found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any decode failure is a bad file
        raise DataError(f"not a readable .npz file: {e}", path=str(path), failure="data-layout") from e
    need = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
    absent = [k for k in need if k not in arrays]
    if absent:
        raise DataError(f"missing arrays {absent} (MedMNIST layout has {need})", path=str(path), failure="data-layout")
    labels0 = arrays["train_labels"]
    stem = path.stem.split("_")[0].lower()
    multilabel = labels0.shape[1] > 1
    if stem in MEDMNIST_FINDINGS:
        available = list(MEDMNIST_FINDINGS[stem])
    elif multilabel:
        available = [f"label_{i}" for i in range(labels0.shape[1])]
    else:
        k = int(max(arrays[f"{s}_labels"].max() for s in ("train", "val", "test"))) + 1
        available = ["positive"] if k <= 2 else [f"class_{i}" for i in range(1, k)]
    findings = _select_findings(available, cfg.findings, str(path))
    samples = []
    for split in ("train", "val", "test"):
        imgs, labs = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(imgs) != len(labs):
            raise DataError(f"{split}_images has {len(imgs)} entries but {split}_labels has {len(labs)}",
                            path=str(path), failure="data-labels")
        if multilabel:
            y_all = labs.astype(np.float32)
        else:  # class index -> one-hot over the positive classes (class 0 = normal)
            y_all = np.zeros((len(labs), len(available)), np.float32)
            nz = labs[:, 0] > 0
            y_all[np.nonzero(nz)[0], labs[nz, 0].astype(int) - 1] = 1.0
        cols = [available.index(f) for f in findings]
        for i in range(len(imgs)):
            samples.append(Sample(f"npz:{split}:{i}", f"{split}{i}", y_all[i, cols], split, site))
    m = Manifest("medmnist", path.parent, findings, samples, multilabel=True, arrays=arrays,
                 patient_ids="one patient per image (MedMNIST ships none)")
    m.notes.append("MedMNIST ships no patient ids: each image is treated as its own patient; official splits used.")
    return m


# --------------------------------------------------------------------------------------------- folder / CSV

LAYOUTS_ACCEPTED = ("Accepted layouts: root/<class>/<images> (e.g. NORMAL/ PNEUMONIA/ or 0_normal/ 1_abnormal/), "
                    "or root/<split>/<class>/<images> with split folders train, val (or valid, validation) and "
                    "test that all hold the same class folders")


def class_label(folder: str) -> str | None:
    """The finding a class folder stands for; None for the negative class.

    A numeric prefix is dropped (`1_abnormal` -> `abnormal`, `0_normal` -> negative) and case, `_`, `-`, `.`
    do not matter for the negative names (`NORMAL`, `no_finding`, `No Finding`, `negative`, `healthy`).
    """
    bare = _NUMERIC_PREFIX.sub("", folder.strip())
    return None if re.sub(r"[\s._-]+", " ", bare).lower() in NORMAL_CLASS_NAMES else canonical(bare)


def _visible_dirs(d: Path) -> list[Path]:
    """Sub-folders, leaving out hidden ones and archive debris (.ipynb_checkpoints, __MACOSX)."""
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _loose_images(d: Path) -> list[Path]:
    return [f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]


def _walk(d: Path) -> tuple[list[Path], list[Path]]:
    """Image files anywhere below `d`, and the (visible) folders below it."""
    images, dirs = [], []
    for dirpath, dirnames, files in os.walk(d):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith((".", "__")))
        dirs += [Path(dirpath) / n for n in dirnames]
        images += [Path(dirpath) / f for f in sorted(files)
                   if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")]
    return images, dirs


def _folders_seen(top: list[Path], limit: int = 8) -> str:
    """The top-level folders and the folders each holds, as the layout error lists them."""
    def names(ds: list[Path]) -> str:
        return ", ".join(f"{d.name}/" for d in ds[:limit]) + (f", ... ({len(ds)} in all)" if len(ds) > limit else "")
    return "; ".join(f"{d.name}/" + (f" holding {names(sub)}" if (sub := _visible_dirs(d)) else "")
                     for d in top[:limit * 2])


def _layout_error(root: Path, problem: str, top: list[Path]) -> DataError:
    return DataError(f"ambiguous folder layout: {problem}. Folders seen: {_folders_seen(top)}. {LAYOUTS_ACCEPTED}",
                     path=str(root), failure="data-layout")


_KNOWN_FINDINGS = {canonical(f) for f in CHESTXRAY14_FINDINGS + CHEXPERT_COLUMNS}


def folder_layout(root: Path) -> list[tuple[str | None, Path]]:
    """(official split or None, class folder) for each class folder of a folder source, in a fixed order.

    Split folders (train, val/valid/validation, test; any case) above class folders are the official split.
    Refused (DataError, data-layout), because any reading of it could be wrong: split folders beside other
    folders, split folders holding different classes, and a split or class name inside a class folder.
    """
    top = _visible_dirs(root) if root.is_dir() else []
    if not top:
        raise DataError(f"no class sub-folders found. {LAYOUTS_ACCEPTED}", path=str(root), failure="data-layout")
    split_dirs = [d for d in top if d.name.lower() in SPLIT_NAMES]
    if split_dirs and len(split_dirs) < len(top):
        others = [d.name for d in top if d not in split_dirs]
        raise _layout_error(root, f"split folders ({', '.join(d.name for d in split_dirs)}) lie beside other "
                                  f"folders ({', '.join(others)}) at the same level", top)
    if split_dirs:
        pairs, classes_of = [], {}
        for d in split_dirs:
            classes = _visible_dirs(d)
            if not classes:
                raise _layout_error(root, f"split folder {d.name}/ holds no class folders", top)
            classes_of[d.name] = classes
            pairs += [(SPLIT_NAMES[d.name.lower()], c) for c in classes]
        if len({frozenset(class_label(c.name) for c in cs) for cs in classes_of.values()}) > 1:
            listed = "; ".join(f"{s}/ holds {', '.join(c.name for c in cs)}" for s, cs in classes_of.items())
            raise _layout_error(root, f"the split folders hold different class folders ({listed})", top)
    else:
        pairs = [(None, d) for d in top]
    if all(re.fullmatch(r"images(_\d+)?", d.name) for d in top):
        raise _layout_error(root, f"image folders without labels: no {' or '.join(NIH_CSV_NAMES)} beside them: "
                                  "is this a ChestX-ray14 folder?", top)
    labels = {class_label(c.name) for _, c in pairs}
    for _, c in pairs:
        for sub in _walk(c)[1]:
            lab = class_label(sub.name)
            if sub.name.lower() in SPLIT_NAMES or lab is None or lab in labels or lab in _KNOWN_FINDINGS:
                raise _layout_error(root, f"{sub.relative_to(root).as_posix()}/ is named like a split or class "
                                          f"folder but lies inside class folder {c.relative_to(root).as_posix()}/ "
                                          "(class folders at different depths)", top)
    if len(labels) < 2:
        raise _layout_error(root, f"only one class ({', '.join(sorted({c.name for _, c in pairs}))}): nothing to "
                                  "tell apart", top)
    return pairs


def _patient_ids(keys: list[str]) -> tuple[Callable[[str], str], str]:
    """Patient id of each image path, and the rule: ChestX-ray14 names (00012345_003.png -> 00012345) when
    every name follows that scheme, else one patient per file."""
    if keys and all(_NIH_NAME.match(Path(k).stem) for k in keys):
        return (lambda k: _NIH_NAME.match(Path(k).stem).group(1)), "from file names (NNNNNNNN_NNN)"
    return (lambda k: k), "one patient per file"


def load_folder(root: Path, cfg: DataConfig, site: str = "") -> Manifest:
    """Class folders, optionally below split folders (see `folder_layout`); images may be PNG, JPEG or DICOM.

    A class folder named like normal / no finding / negative / healthy (see `class_label`) is the negative class;
    every other class folder is one finding.
    """
    pairs = folder_layout(root)
    label = {c.name: class_label(c.name) for _, c in pairs}
    available = list(dict.fromkeys(lab for name in sorted(label) if (lab := label[name]) is not None))
    findings = _select_findings(available, cfg.findings, str(root))
    images = [(split, label[c.name], f) for split, c in pairs for f in _walk(c)[0]]
    keys = [f.relative_to(root).as_posix() for _, _, f in images]
    pid, rule = _patient_ids(keys)
    samples = []
    for (split, lab, _), key in zip(images, keys):
        y = np.zeros(len(findings), np.float32)
        if lab in findings:
            y[findings.index(lab)] = 1.0
        samples.append(Sample(key, pid(key), y, split, site))
    m = Manifest("folder", root, findings, samples, patient_ids=rule)
    shipped = sorted({c.parent.name for split, c in pairs if split},
                     key=lambda s: (SPLITS.index(SPLIT_NAMES[s.lower()]), s))
    if shipped:
        renamed = [f"{s}/ as {SPLIT_NAMES[s.lower()]}" for s in shipped if s != SPLIT_NAMES[s.lower()]]
        m.notes.append(f"split folders {', '.join(f'{s}/' for s in shipped)} are the official split"
                       + (f" ({', '.join(renamed)})" if renamed else "")
                       + "; data.official_split=resplit ignores it")
    m.notes.append("class folders read as: " + ", ".join(
        f"{name}/ = {'no finding (negative)' if lab is None else repr(lab)}"
        + (" (numeric prefix dropped)" if lab is not None and _NUMERIC_PREFIX.match(name) else "")
        for name, lab in sorted(label.items())))
    loose = _loose_images(root) + [f for d in {c.parent for s, c in pairs if s} for f in _loose_images(d)]
    if loose:
        m.notes.append(f"{len(loose)} image files lie outside any class folder and were left out")
    if rule == "one patient per file":
        m.notes.append("The file names carry no patient ids: each file is treated as its own patient. Name the "
                       "files NNNNNNNN_NNN (patient_image, as ChestX-ray14 does) or use the CSV source with a "
                       "patient_id column when patients have several images.")
    else:
        m.notes.append(f"patient ids {rule}: images of one patient stay in one split and one hospital")
    return m


def load_csv(path: Path, cfg: DataConfig, site: str = "") -> Manifest:
    """Generic CSV: `path` (relative to the CSV's folder) + one column per finding (1/0/-1/blank), optional
    patient_id, split (train, val/valid/validation, test), view."""
    if path.is_dir():
        cands = sorted(path.glob("*.csv"))
        if len(cands) != 1:
            raise DataError(f"expected exactly one .csv file in the folder, found {len(cands)}",
                            path=str(path), failure="data-layout")
        path = cands[0]
    header, rows = _read_csv(path)
    if "path" not in header:
        raise DataError(f"generic CSV needs a 'path' column; found {header}",
                        path=str(path), line=1, failure="data-csv")
    meta = {"path", "patient_id", "split", "view", "site"}
    available = [canonical(h) for h in header if h not in meta]
    if not available:
        raise DataError("no label columns besides path/patient_id/split/view",
                        path=str(path), line=1, failure="data-csv")
    findings = _select_findings(available, cfg.findings, str(path))
    col = {canonical(h): k for k, h in enumerate(header)}
    policy = {"u-ones": 1.0, "u-zeros": 0.0, "u-ignore": np.nan}[cfg.uncertainty]
    root = path.parent

    def get(row: list[str], name: str) -> str:
        return row[header.index(name)].strip() if name in header and header.index(name) < len(row) else ""

    if "patient_id" in header:
        pid, rule = (lambda rel: rel), "from the patient_id column"
        blank = sum(1 for _, row in rows if not get(row, "patient_id"))
        if blank:
            rule += f" ({blank} rows without one: one patient per file)"
    else:
        pid, rule = _patient_ids([get(row, "path") for _, row in rows])
    samples, missing = [], []
    for line, row in rows:
        y = np.zeros(len(findings), np.float32)
        for j, f in enumerate(findings):
            v = row[col[f]].strip() if col[f] < len(row) else ""
            try:
                num = float(v) if v else 0.0
            except ValueError:
                raise DataError(f"column {header[col[f]]!r} has value {v!r}; expected 1, 0, -1 or blank",
                                path=str(path), line=line, failure="data-labels") from None
            if num not in (0.0, 1.0, -1.0):
                raise DataError(f"column {header[col[f]]!r} has value {v!r}; expected 1, 0, -1 or blank",
                                path=str(path), line=line, failure="data-labels")
            y[j] = policy if num == -1.0 else num
        rel = get(row, "path")
        if not (root / rel).is_file():
            missing.append((line, rel))
            continue
        shipped = get(row, "split")
        split = SPLIT_NAMES.get(shipped.lower()) if shipped else None
        if shipped and split is None:
            raise DataError(f"split must be train, val (or valid, validation) or test, got {shipped!r}",
                            path=str(path), line=line, failure="data-csv")
        samples.append(Sample(rel, get(row, "patient_id") or pid(rel), y, split, site,
                              get(row, "view").upper() or None))
    if missing:
        raise _missing_error(missing, path, len(rows),
                             hint=f"paths in a CSV are resolved relative to the CSV's folder ({root})")
    return Manifest("csv", root, findings, samples, patient_ids=rule)


LOADERS = {"chestxray14": load_chestxray14, "chexpert": load_chexpert, "medmnist": load_medmnist,
           "folder": load_folder, "csv": load_csv}


def detect_source(path: Path) -> str:
    """The layout of a folder or file: what data.source=auto (the default) means, for every command.

    Sub-folders (class folders, or split folders holding class folders) are the folder source, unless a CSV
    beside them has a `path` column (then the CSV says which image is what). An ambiguous folder layout is
    still "folder": its loader then says what is ambiguous.
    """
    if path.is_file():
        return {".npz": "medmnist", ".csv": "csv"}.get(path.suffix.lower()) or _unknown(path)
    if not path.is_dir():
        raise DataError("no such file or folder", path=str(path), failure="data-not-found")
    if any((path / n).is_file() for n in NIH_CSV_NAMES):
        return "chestxray14"
    if (path / "train.csv").is_file() or (path / "valid.csv").is_file():
        return "chexpert"
    if list(path.glob("*.npz")):
        return "medmnist"
    sites = site_folders(path)
    if sites:
        return detect_source(sites[0])
    csvs = sorted(path.glob("*.csv"))
    if any(_has_path_column(p) for p in csvs):
        return "csv"
    if _visible_dirs(path):
        return "folder"
    if csvs:
        return "csv"
    return _unknown(path)


def _has_path_column(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return "path" in (h.strip() for h in next(csv.reader(fh), []))
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def _unknown(path: Path) -> str:
    raise DataError("cannot tell the data layout: expected a ChestX-ray14 or CheXpert folder, a MedMNIST .npz, "
                    f"a generic CSV or class sub-folders. {LAYOUTS_ACCEPTED}", path=str(path), failure="data-layout")


def site_folders(root: Path) -> list[Path]:
    """Sub-folders that are datasets of their own (one per hospital), e.g. the synthetic `hospital_k/`: each
    holds a ChestX-ray14 CSV, a CheXpert train.csv or one MedMNIST .npz.

    `holdout/` is left out: by convention it is the server's held-out evaluation set, never training data.
    """
    if not root.is_dir() or any((root / n).is_file() for n in NIH_CSV_NAMES + ("train.csv", "valid.csv")):
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "holdout"):
        if (any((d / n).is_file() for n in NIH_CSV_NAMES) or (d / "train.csv").is_file()
                or len(list(d.glob("*.npz"))) == 1):   # ChestX-ray14, CheXpert or MedMNIST layout
            out.append(d)
    return out


def server_holdout(data_path: str, server_data_path: str = "") -> Path | None:
    """Where a federation's server evaluates: `server_data_path`, else `<data_path>/holdout`; None when neither is
    set or exists, and then the server evaluates on the val/test splits `data_path` itself ships (e.g. Kaggle's
    train/ val/ test/ folders) while the simulated hospitals share out its train split only - so no image is both
    trained on and evaluated."""
    if server_data_path:
        return Path(server_data_path).expanduser().resolve()
    holdout = Path(data_path).expanduser() / "holdout"
    return holdout.resolve() if holdout.exists() else None


def load_multisite(root: Path, cfg: DataConfig) -> Manifest:
    """Pool several site folders of one layout into one manifest; each sample keeps its site."""
    parts = []
    for d in site_folders(root):
        m = LOADERS[cfg.source](d, cfg, d.name)
        for s in m.samples:
            s.key = f"{d.name}/{s.key}"
        parts.append(m)
    if not parts:
        raise DataError("no site folders found", path=str(root), failure="data-layout")
    findings = parts[0].findings
    for m in parts[1:]:
        if m.findings != findings:
            raise DataError(f"site {m.root.name} labels {m.findings}, site {parts[0].root.name} labels {findings}: "
                            "pass data.findings to choose the shared ones", path=str(root), failure="data-labels")
    merged = Manifest(cfg.source, root, findings, [s for m in parts for s in m.samples],
                      patient_ids=parts[0].patient_ids)
    merged.notes.append(f"pooled {len(parts)} sites: {', '.join(m.root.name for m in parts)}")
    return merged


def load_manifest(cfg: DataConfig, site: str = "") -> Manifest:
    """Read the source named in the config (data.source=auto: `detect_source`) and drop non-frontal views if asked."""
    if not cfg.path:
        raise DataError("no data path given (data.path / --data)", failure="data-not-found")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError("no such file or folder", path=str(path), failure="data-not-found")
    if cfg.source == "auto":   # one detection for every command
        cfg = cfg.model_copy(update={"source": detect_source(path)})
    manifest = (load_multisite(path, cfg) if cfg.source in ("chestxray14", "chexpert") and site_folders(path)
                else LOADERS[cfg.source](path, cfg, site))
    if cfg.frontal_only:
        frontal = [s for s in manifest.samples if s.view not in ("LATERAL", "LL", "RL")]
        if len(frontal) < len(manifest.samples):
            manifest.notes.append(f"{len(manifest.samples) - len(frontal)} lateral views left out (frontal_only).")
            manifest.samples = frontal
    if not manifest.samples:
        raise DataError("the data source lists no usable images", path=str(path), failure="data-too-small")
    return manifest
