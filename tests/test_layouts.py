"""Folder and CSV layouts as public chest X-ray sets ship them: split/class folders, ChestX-ray14 file names
(patient ids), overlapping shipped splits, DICOM in class folders, and the refusal of ambiguous layouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.settings import DataConfig
from common.data import assert_no_patient_overlap, detect_source, load_manifest, patient_split
from common.data.report import data_report, format_report
from common.data.sources import class_label
from common.errors import DataError
from tests.test_imageio import dicom_bytes


def _img(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)


def _tree(root: Path, files: dict[str, int]) -> Path:
    """`files`: relative path -> how many images (named <stem>_<k><suffix> when more than one)."""
    for rel, n in files.items():
        p = Path(rel)
        for k in range(n):
            _img(root / (p if n == 1 else p.with_name(f"{p.stem}_{k}{p.suffix}")))
    return root


def _split_counts(m, splits) -> dict[str, tuple[int, dict[str, int]]]:
    return {k: (len(v), m.finding_counts(v)) for k, v in splits.items()}


# ------------------------------------------------------------------------------------------- class names

@pytest.mark.parametrize("name", ["normal", "NORMAL", "Normal", "0_normal", "0-Normal", "00 normal", "no finding",
                                  "No Finding", "no_finding", "NO-FINDING", "negative", "1_negative", "healthy"])
def test_negative_class_names(name):
    assert class_label(name) is None


@pytest.mark.parametrize("name,finding", [("1_abnormal", "abnormal"), ("PNEUMONIA", "Pneumonia"),
                                          ("2-Pleural_Effusion", "Effusion"), ("abnormal", "abnormal"),
                                          ("COVID19", "COVID19")])
def test_positive_class_names_drop_the_numeric_prefix(name, finding):
    assert class_label(name) == finding


# ------------------------------------------------------------------------------------------- split/class layouts

def test_kaggle_pneumonia_split_and_class_folders(tmp_path):
    root = _tree(tmp_path / "chest_xray", {
        "train/NORMAL/IM-0115-0001.jpeg": 4, "train/PNEUMONIA/person1_bacteria_1.jpeg": 6,
        "val/NORMAL/NORMAL2-IM-1427-0001.jpeg": 1, "val/PNEUMONIA/person1946_bacteria_4874.jpeg": 2,
        "test/NORMAL/IM-0001-0001.jpeg": 2, "test/PNEUMONIA/person100_bacteria_475.jpeg": 3})
    (root / "train" / ".DS_Store").write_text("x")            # debris a zip leaves is not a folder or an image
    (root / "__MACOSX" / "train").mkdir(parents=True)
    assert detect_source(root) == "folder"
    m = load_manifest(DataConfig(path=str(root)))               # data.source=auto, the default
    assert m.source == "folder" and m.findings == ["Pneumonia"]
    assert {s.split for s in m.samples} == {"train", "val", "test"}
    splits = patient_split(m, DataConfig())
    assert _split_counts(m, splits) == {"train": (10, {"Pneumonia": 6}), "val": (3, {"Pneumonia": 2}),
                                        "test": (5, {"Pneumonia": 3})}
    assert all(m.samples[i].split == name for name, idx in splits.items() for i in idx)   # kept as shipped
    assert m.patient_ids == "one patient per file" and m.patients() == 18
    report = data_report(m, splits)
    assert report["patient_ids"] == "one patient per file"
    assert report["splits"]["val"] == {"images": 3, "patients": 3, "positives": {"Pneumonia": 2}}
    assert report["patients_in_two_splits"] == {"train/val": 0, "train/test": 0, "val/test": 0}
    assert any("NORMAL/ = no finding" in n and "PNEUMONIA/ = 'Pneumonia'" in n for n in report["notes"])


def test_numbered_classes_below_train_valid_test(tmp_path):
    root = _tree(tmp_path / "cxr", {
        "train/0_normal/a.png": 5, "train/1_abnormal/b.png": 3, "valid/0_normal/c.png": 2,
        "valid/1_abnormal/d.png": 1, "test/0_normal/e.png": 2, "test/1_abnormal/f.png": 2})
    m = load_manifest(DataConfig(path=str(root)))
    assert m.findings == ["abnormal"]                           # not train/valid/test, not 0_normal
    splits = patient_split(m, DataConfig())
    assert _split_counts(m, splits) == {"train": (8, {"abnormal": 3}), "val": (3, {"abnormal": 1}),
                                        "test": (4, {"abnormal": 2})}
    notes = " ".join(m.notes)
    assert "0_normal/ = no finding" in notes and "1_abnormal/ = 'abnormal' (numeric prefix dropped)" in notes
    assert "split folders train/, valid/, test/ are the official split (valid/ as val)" in notes
    # pointed at one split folder, the same classes (the issue: 0_normal became a finding)
    m = load_manifest(DataConfig(path=str(root / "train")))
    assert m.findings == ["abnormal"] and m.finding_counts() == {"abnormal": 3} and len(m.samples) == 8


def test_split_folder_names_in_any_case(tmp_path):
    root = _tree(tmp_path / "d", {"TRAIN/normal/a.png": 3, "TRAIN/Pneumonia/b.png": 3, "Validation/normal/c.png": 1,
                                  "Validation/Pneumonia/d.png": 1, "Test/normal/e.png": 1, "Test/Pneumonia/f.png": 2})
    m = load_manifest(DataConfig(path=str(root)))
    assert m.findings == ["Pneumonia"]
    assert {k: len(v) for k, v in patient_split(m, DataConfig()).items()} == {"train": 6, "val": 2, "test": 3}


def test_dicom_in_class_folders(tmp_path):
    for cls, value in (("NORMAL", 300), ("PNEUMONIA", 1000)):
        for k in range(2):
            p = tmp_path / "dcm" / cls / f"img{k}.dcm"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(dicom_bytes(np.full((20, 24), value, np.uint16), bits_stored=12))
    m = load_manifest(DataConfig(path=str(tmp_path / "dcm")))
    assert m.source == "folder" and m.findings == ["Pneumonia"] and len(m.samples) == 4
    for s in m.samples:
        img = m.load(s)
        assert (img.format, img.width, img.height) == ("dicom", 24, 20)
        assert s.labels.tolist() == [1.0 if s.key.startswith("PNEUMONIA/") else 0.0]
        assert img.pixels.max() == pytest.approx((1000 if s.labels[0] else 300) / 4095, abs=1e-6)


# ------------------------------------------------------------------------------------------- patient ids

def _nih_name(patient: int, k: int) -> str:
    return f"{patient:08d}_{k:03d}.png"


def test_chestxray14_names_give_patient_ids_and_patient_level_splits(tmp_path):
    root = tmp_path / "cxr14"
    for p in range(1, 31):
        for k in range(3):                                      # three images per patient
            _img(root / ("1_abnormal" if p % 3 == 0 else "0_normal") / _nih_name(p, k))
    m = load_manifest(DataConfig(path=str(root)))
    assert m.patient_ids == "from file names (NNNNNNNN_NNN)"
    assert {s.patient_id for s in m.samples} == {f"{p:08d}" for p in range(1, 31)} and m.patients() == 30
    s = next(x for x in m.samples if x.key.endswith("00000012_002.png"))
    assert s.patient_id == "00000012"
    splits = patient_split(m, DataConfig())
    assert_no_patient_overlap(m, splits)                        # every image of a patient in one split
    report = data_report(m, splits)
    assert report["patient_ids"] == "from file names (NNNNNNNN_NNN)"
    assert sum(v["patients"] for v in report["splits"].values()) == 30
    assert "patient ids: from file names (NNNNNNNN_NNN)" in format_report(report)
    # one name off the scheme: every file is its own patient again, and the report says so
    _img(root / "0_normal" / "scan.png")
    m = load_manifest(DataConfig(path=str(root)))
    assert m.patient_ids == "one patient per file" and m.patients() == 91


def test_csv_patient_ids_split_names_and_missing_image_message(tmp_path):
    for p, k in ((1, 0), (1, 1), (2, 0), (3, 0)):
        _img(tmp_path / "img" / _nih_name(p, k))
    rows = [("img/00000001_000.png", 1, "train"), ("img/00000001_001.png", 0, "Train"),
            ("img/00000002_000.png", 1, "Valid"), ("img/00000003_000.png", 0, "VALIDATION")]
    csv = tmp_path / "labels.csv"
    csv.write_text("path,Pneumonia,split\n" + "".join(f"{p},{y},{s}\n" for p, y, s in rows))
    m = load_manifest(DataConfig(path=str(csv)))                # auto -> csv
    assert m.source == "csv" and m.patient_ids == "from file names (NNNNNNNN_NNN)"
    assert [s.patient_id for s in m.samples] == ["00000001", "00000001", "00000002", "00000003"]
    assert [s.split for s in m.samples] == ["train", "train", "val", "val"]
    csv.write_text("path,patient_id,Pneumonia\n" + "".join(f"{p},P{i % 2},{y}\n" for i, (p, y, _) in enumerate(rows)))
    m = load_manifest(DataConfig(path=str(csv)))
    assert m.patient_ids == "from the patient_id column" and {s.patient_id for s in m.samples} == {"P0", "P1"}
    _img(tmp_path / "img" / "other.png")
    csv.write_text("path,Pneumonia\nimg/00000001_000.png,1\nimg/other.png,0\n")
    m = load_manifest(DataConfig(path=str(csv)))
    assert m.patient_ids == "one patient per file" and m.patients() == 2
    csv.write_text("path,Pneumonia,split\nimg/00000001_000.png,1,dev\n")
    with pytest.raises(DataError, match=r"labels.csv:2: split must be train, val \(or valid, validation\)"):
        load_manifest(DataConfig(path=str(csv)))
    csv.write_text("path,Pneumonia\nimages/00000001_000.png,1\n")
    with pytest.raises(DataError, match=r"resolved relative to the CSV's folder \(" + str(tmp_path)):
        load_manifest(DataConfig(path=str(csv)))


# ------------------------------------------------------------------------------------------- shipped overlap

def _overlapping_shipped_split(root: Path) -> Path:
    """Patients 1-10 in train, 11-14 in valid, 15-18 in test; 1-3 also in valid, 4, 5 and 1 also in test, 11 also
    in test: train/val 3 (1, 2, 3), train/test 3 (1, 4, 5), val/test 2 (1, 11); 6 patients in all."""
    where = {"train": list(range(1, 11)), "valid": [1, 2, 3, *range(11, 15)], "test": [1, 4, 5, 11, *range(15, 19)]}
    for split, patients in where.items():
        for p in patients:
            for k in range(2):
                _img(root / split / ("1_abnormal" if (p + k) % 2 else "0_normal") / _nih_name(p, 10 * len(split) + k))
    return root


def test_shipped_split_overlap_is_counted_per_pair_and_resplit_removes_it(tmp_path):
    root = _overlapping_shipped_split(tmp_path / "cxr14")
    m = load_manifest(DataConfig(path=str(root)))
    splits = patient_split(m, DataConfig())
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "val": 14, "test": 16}
    report = data_report(m, splits)
    assert report["patients_in_two_splits"] == {"train/val": 3, "train/test": 3, "val/test": 2}
    count = next(n for n in report["notes"] if "more than one split" in n)
    assert "6 patients" in count and "train/val: 3, train/test: 3, val/test: 2" in count
    assert "data.official_split=resplit" in count and "0000" not in count      # no ids in the count line
    examples = next(n for n in report["notes"] if "for example" in n)
    assert "00000001, 00000002, 00000003 (and 3 more)" in examples and "/0000" not in examples
    assert "patients in two splits: train/val 3, train/test 3, val/test 2" in format_report(report)

    resplit = DataConfig(official_split="resplit")
    m = load_manifest(DataConfig(path=str(root)))
    splits = patient_split(m, resplit)
    assert_no_patient_overlap(m, splits)
    assert sum(len(v) for v in splits.values()) == 50
    report = data_report(m, splits)
    assert report["patients_in_two_splits"] == {"train/val": 0, "train/test": 0, "val/test": 0}
    assert any("official_split=resplit" in n and "ignored" in n for n in report["notes"])
    assert sum(v["patients"] for v in report["splits"].values()) == 18


# ------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("files,fragments", [
    # split folders beside class folders at one level
    ({"train/NORMAL/a.png": 1, "train/PNEUMONIA/b.png": 1, "NORMAL/c.png": 1, "PNEUMONIA/d.png": 1},
     ["split folders (train) lie beside other folders (NORMAL, PNEUMONIA)",
      "train/ holding NORMAL/, PNEUMONIA/", "NORMAL/;", "PNEUMONIA/"]),
    # split folders with different classes
    ({"train/NORMAL/a.png": 1, "train/PNEUMONIA/b.png": 1, "val/NORMAL/c.png": 1, "test/0_normal/d.png": 1,
      "test/1_abnormal/e.png": 1},
     ["different class folders (test/ holds 0_normal, 1_abnormal; train/ holds NORMAL, PNEUMONIA; val/ holds NORMAL)",
      "test/ holding 0_normal/, 1_abnormal/"]),
    # class folders at two depths
    ({"NORMAL/a.png": 1, "sick/PNEUMONIA/b.png": 1},
     ["sick/PNEUMONIA/ is named like a split or class folder but lies inside class folder sick/",
      "NORMAL/; sick/ holding PNEUMONIA/"]),
    # pointed one level too high
    ({"chest_xray/train/NORMAL/a.png": 1, "chest_xray/test/PNEUMONIA/b.png": 1},
     ["chest_xray/test/ is named like a split", "chest_xray/ holding test/, train/"]),
])
def test_ambiguous_layouts_are_refused_naming_the_folders(tmp_path, files, fragments):
    root = _tree(tmp_path / "data", files)
    assert detect_source(root) == "folder"
    with pytest.raises(DataError) as e:
        load_manifest(DataConfig(path=str(root)))
    msg = str(e.value)
    assert e.value.failure == "data-layout" and "ambiguous folder layout" in msg and "Accepted layouts" in msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_one_class_or_no_class_folders_are_refused(tmp_path):
    _tree(tmp_path / "one", {"PNEUMONIA/a.png": 2})
    with pytest.raises(DataError, match=r"only one class \(PNEUMONIA\)"):
        load_manifest(DataConfig(path=str(tmp_path / "one")))
    _tree(tmp_path / "flat", {"train/a.png": 1, "test/b.png": 1})
    with pytest.raises(DataError, match="split folder test/ holds no class folders"):
        load_manifest(DataConfig(path=str(tmp_path / "flat"), source="folder"))


def test_detection_prefers_a_csv_with_a_path_column_and_ignores_other_csvs(tmp_path):
    root = _tree(tmp_path / "d", {"train/NORMAL/a.png": 1, "train/PNEUMONIA/b.png": 1,
                                  "test/NORMAL/c.png": 1, "test/PNEUMONIA/d.png": 1})
    (root / "metadata.csv").write_text("Image Index,Finding Labels\na.png,No Finding\n")
    assert detect_source(root) == "folder"
    assert load_manifest(DataConfig(path=str(root))).source == "folder"
    (root / "labels.csv").write_text("path,Pneumonia\ntrain/NORMAL/a.png,0\ntrain/PNEUMONIA/b.png,1\n")
    assert detect_source(root) == "csv"


def test_every_command_detects_the_layout_the_same_way(tmp_path, capsys):
    """`fedxray data check` and `fedxray train` read a split/class folder with no --source: one detection."""
    import json

    from fedxray.cli import main

    root = _tree(tmp_path / "kaggle", {f"{s}/{c}/{s}{c}.png": 6 for s in ("train", "val", "test")
                                       for c in ("NORMAL", "PNEUMONIA")})
    report = tmp_path / "report.json"
    assert main(["data", "check", str(root), "--set", "data.min_resolution=8", "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["source"] == "folder" and r["findings"] == ["Pneumonia"]
    assert {k: v["images"] for k, v in r["splits"].items()} == {"train": 12, "val": 12, "test": 12}
    assert main(["train", "--profile", "demo", "--data", str(root), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", "data.findings=", "--set", "data.min_resolution=8", "--set", "preprocess.image_size=16",
                 "--set", "train.epochs=1"]) == 0
    card = json.loads((tmp_path / "run" / "bundle" / "model.json").read_text())
    assert card["findings"] == ["Pneumonia"] and card["provenance"]["data"]["source"] == "folder"
    capsys.readouterr()
