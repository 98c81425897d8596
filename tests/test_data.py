"""Data layer: every loader on fixtures in the publishers' formats, bad input, splits, partitions, transforms."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from common.settings import AugmentConfig, DataConfig, Settings, PreprocessConfig
from common.data import assert_no_patient_overlap, detect_source, load_manifest, partition, patient_split
from common.data.synthetic import NIH_COLUMNS, SYNTH_FINDINGS
from common.errors import DataError
from common.labels import canonical, shared_findings
from common.data.prepare import prepare_data
from common.transforms import Augmenter, Preprocessor


def _png(path: Path, size=80, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def _nih(root: Path, rows: list[list], header=None, images=True, subdir="images"):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header or NIH_COLUMNS)
        w.writerows(rows)
    if images:
        for r in rows:
            _png(root / subdir / r[0])
    return root


def _row(name, labels, pid, view="PA"):
    return [name, labels, 0, pid, 40, "M", view, 80, 80, 0.14, 0.14]


# ------------------------------------------------------------------------------------------- ChestX-ray14

def test_chestxray14_labels_paths_official_split_and_boxes(tmp_path):
    root = _nih(tmp_path / "nih", [_row("00000001_000.png", "Cardiomegaly|Effusion", "1"),
                                   _row("00000001_001.png", "No Finding", "1"),
                                   _row("00000002_000.png", "Infiltration", "2")], subdir="images_001/images")
    (root / "test_list.txt").write_text("00000002_000.png\n")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n")
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                                             "00000002_000.png,Infiltrate,10,20,30,40,,,\n")
    m = load_manifest(DataConfig(source="chestxray14", path=str(root)))
    assert m.findings[:3] == ["Atelectasis", "Cardiomegaly", "Effusion"] and len(m.findings) == 14
    s = {x.key.split("/")[-1]: x for x in m.samples}
    y = s["00000001_000.png"].labels
    assert y[m.findings.index("Cardiomegaly")] == 1 and y[m.findings.index("Effusion")] == 1 and y.sum() == 2
    assert s["00000001_001.png"].labels.sum() == 0
    assert s["00000002_000.png"].split == "test" and s["00000001_000.png"].split == "trainval"
    assert s["00000001_000.png"].key == "images_001/images/00000001_000.png"
    box = s["00000002_000.png"].boxes[0]
    assert (box.finding, box.x, box.y, box.w, box.h) == ("Infiltration", 10, 20, 30, 40)


def test_chestxray14_findings_subset_and_unknown_subset(tmp_path):
    root = _nih(tmp_path / "nih", [_row("a.png", "Nodule", "1"), _row("b.png", "Mass|Nodule", "2")])
    m = load_manifest(DataConfig(path=str(root), findings=["Nodule", "Mass"]))
    assert m.findings == ["Nodule", "Mass"] and m.label_matrix().tolist() == [[1, 0], [1, 1]]
    with pytest.raises(DataError, match="not labelled by this source"):
        load_manifest(DataConfig(path=str(root), findings=["Fracture"]))


@pytest.mark.parametrize("case,match", [
    ("header", "unexpected CSV header"),
    ("label", r"Data_Entry_2017_v2020.csv:3: unknown finding label 'Pneumonitis'"),
    ("missing", r"Data_Entry_2017_v2020.csv:2: 1 of 2 images listed are missing.*line 2: a.png"),
    ("nocsv", "is this a ChestX-ray14 folder"),
])
def test_chestxray14_bad_input_names_file_and_line(tmp_path, case, match):
    rows = [_row("a.png", "Nodule", "1"), _row("b.png", "Pneumonitis" if case == "label" else "Mass", "2")]
    root = _nih(tmp_path / "nih", rows, header=["Image", "Labels"] + NIH_COLUMNS[2:] if case == "header" else None)
    if case == "missing":
        (root / "images" / "a.png").unlink()
    if case == "nocsv":
        (root / "Data_Entry_2017_v2020.csv").unlink()
    with pytest.raises(DataError, match=match):
        load_manifest(DataConfig(path=str(root)))


def test_corrupt_and_low_resolution_images_are_excluded_and_reported(tmp_path):
    rows = [_row(f"{i:08d}_000.png", "Nodule" if i % 2 else "No Finding", str(i)) for i in range(1, 31)]
    root = _nih(tmp_path / "nih", rows)
    (root / "images" / rows[0][0]).write_bytes(b"")
    buf = (root / "images" / rows[1][0]).read_bytes()
    (root / "images" / rows[1][0]).write_bytes(buf[: len(buf) // 2])
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "images" / rows[2][0])
    cfg = Settings(data=DataConfig(path=str(root), findings=["Nodule"]),
                           preprocess=PreprocessConfig(image_size=32))
    data = prepare_data(cfg, progress=False)
    rep = data.report()
    reasons = {e["file"].split("/")[-1]: e["reason"] for e in rep["excluded"]}
    assert set(reasons) == {rows[0][0], rows[1][0], rows[2][0]}
    assert "empty file" in reasons[rows[0][0]] and "truncated" in reasons[rows[1][0]]
    assert "below the minimum of 64 px" in reasons[rows[2][0]]
    assert rep["images"] == 27 and sum(len(d) for d in data.datasets.values()) == 27


# ------------------------------------------------------------------------------------------- CheXpert

CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
               "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
               "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def _chexpert(root: Path, rows: dict[str, list[list[str]]]):
    for fname, rs in rows.items():
        with open(root / fname, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CHEX_HEADER)
            for r in rs:
                w.writerow(r)
                _png(root / r[0])
    return root


def _chex_row(patient, view, fl, **vals):
    path = f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/view{view}_{fl.lower()}.jpg"
    labels = [vals.get(c.replace(" ", "_"), "") for c in CHEX_HEADER[5:]]
    return [path, "Female", "60", fl, "AP" if fl == "Frontal" else "", *labels]


@pytest.mark.parametrize("policy,expected", [("u-ones", 1.0), ("u-zeros", 0.0), ("u-ignore", None)])
def test_chexpert_uncertainty_policies_frontal_only_and_patient_ids(tmp_path, policy, expected):
    root = _chexpert(tmp_path, {
        "train.csv": [_chex_row(1, 1, "Frontal", Cardiomegaly="1.0", Pleural_Effusion="-1.0", Edema="0.0"),
                      _chex_row(1, 2, "Lateral", Cardiomegaly="1.0"),
                      _chex_row(2, 1, "Frontal", Pneumonia="-1.0")],
        "valid.csv": [_chex_row(3, 1, "Frontal", Edema="1.0")]})
    m = load_manifest(DataConfig(source="chexpert", path=str(root), uncertainty=policy))
    assert len(m.samples) == 3  # lateral left out
    s0 = m.samples[0]
    assert s0.patient_id == "patient00001"
    eff = s0.labels[m.findings.index("Effusion")]  # "Pleural Effusion" maps onto the canonical name
    assert (np.isnan(eff) if expected is None else eff == expected)
    assert s0.labels[m.findings.index("Cardiomegaly")] == 1 and s0.labels[m.findings.index("Edema")] == 0
    assert [s.split for s in m.samples] == [None, None, "test"]
    if policy == "u-ignore":  # unknown labels are masked out of the loss, not treated as negatives
        data = prepare_data(Settings(data=DataConfig(source="chexpert", path=str(root), uncertainty=policy,
                            min_resolution=8, split_fractions=(0.5, 0.5, 0.0)),
                            preprocess=PreprocessConfig(image_size=16)), progress=False)
        masks = np.concatenate([d.mask for d in data.datasets.values() if len(d)])
        assert (~masks).sum() == 2


def test_chexpert_bad_value_names_line(tmp_path):
    root = _chexpert(tmp_path, {"train.csv": [_chex_row(1, 1, "Frontal", Edema="maybe")]})
    with pytest.raises(DataError, match=r"train.csv:2: column 'Edema' has value 'maybe'"):
        load_manifest(DataConfig(source="chexpert", path=str(root)))


# ------------------------------------------------------------------------------------------- MedMNIST, folder, CSV

def _npz(path: Path, n=(20, 6, 8), multilabel=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 255, (k, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (k, 14 if multilabel else 1), dtype=np.uint8)
    np.savez(path, **arrays)
    return path


def test_medmnist_official_splits_and_vocabulary(tmp_path):
    m = load_manifest(DataConfig(source="medmnist", path=str(_npz(tmp_path / "pneumoniamnist.npz"))))
    assert m.findings == ["Pneumonia"]
    splits = patient_split(m, DataConfig(source="medmnist"))
    assert [len(splits[k]) for k in ("train", "val", "test")] == [20, 6, 8]
    m14 = load_manifest(DataConfig(source="medmnist", path=str(_npz(tmp_path / "chestmnist.npz", multilabel=True))))
    assert m14.findings[0] == "Atelectasis" and len(m14.findings) == 14
    img = m.load(m.samples[0])
    assert img.pixels.shape == (28, 28) and 0 <= img.pixels.min() <= img.pixels.max() <= 1


def test_medmnist_missing_array_is_clear(tmp_path):
    np.savez(tmp_path / "x.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="missing arrays"):
        load_manifest(DataConfig(source="medmnist", path=str(tmp_path / "x.npz")))


def _dicom(path: Path, value=1000):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows = ds.Columns = 72
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.full((72, 72), value, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_folder_source_with_dicom_and_normal_class(tmp_path):
    _png(tmp_path / "NORMAL" / "n1.png")
    _png(tmp_path / "PNEUMONIA" / "p1.png")
    _dicom(tmp_path / "PNEUMONIA" / "p2.dcm")
    assert detect_source(tmp_path) == "folder"
    m = load_manifest(DataConfig(source="folder", path=str(tmp_path)))
    assert m.findings == ["Pneumonia"] and sorted(m.label_matrix()[:, 0].tolist()) == [0, 1, 1]
    dcm = next(s for s in m.samples if s.key.endswith(".dcm"))
    assert m.load(dcm).pixels.max() == pytest.approx(1000 / 4095, abs=1e-6)


def test_generic_csv_source(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    (tmp_path / "labels.csv").write_text("path,patient_id,Pneumonia,Effusion\nimg/a.png,p1,1,\nimg/b.png,p1,0,-1\n")
    m = load_manifest(DataConfig(source="csv", path=str(tmp_path / "labels.csv"), uncertainty="u-zeros"))
    assert m.findings == ["Pneumonia", "Effusion"] and m.label_matrix().tolist() == [[1, 0], [0, 0]]
    assert {s.patient_id for s in m.samples} == {"p1"}
    (tmp_path / "labels.csv").write_text("path,Pneumonia\nimg/a.png,2\n")
    with pytest.raises(DataError, match=r"labels.csv:2: .*'2'"):
        load_manifest(DataConfig(source="csv", path=str(tmp_path / "labels.csv")))


def test_missing_path_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_manifest(DataConfig(path=str(tmp_path / "nope")))
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="cannot tell the data layout"):
        detect_source(tmp_path)


def test_vocabulary_mapping():
    assert canonical("Pleural Effusion") == "Effusion" and canonical("pleural_thickening") == "Pleural_Thickening"
    assert canonical("Infiltrate") == "Infiltration"
    assert shared_findings(["Atelectasis", "Effusion", "Nodule"], ["Pleural Effusion", "Atelectasis"]) == \
        ["Atelectasis", "Effusion"]


# ------------------------------------------------------------------------------------------- splits, partitions

def _synth_manifest(synth_root, name="hospital_1"):
    return load_manifest(DataConfig(path=str(synth_root / name), findings=list(SYNTH_FINDINGS)), site=name)


def test_patient_split_no_leak_deterministic_and_stratified(synth_root):
    m = _synth_manifest(synth_root)
    cfg = DataConfig(official_split="resplit")
    a, b = patient_split(m, cfg), patient_split(m, cfg)
    assert a == b
    assert_no_patient_overlap(m, a)
    n = len(m.samples)
    assert sum(len(v) for v in a.values()) == n
    assert abs(len(a["train"]) / n - 0.70) < 0.08
    c = patient_split(m, DataConfig(official_split="resplit", seed=7))
    assert c != a
    assert_no_patient_overlap(m, c)
    # every finding present in train is also represented in test (stratification)
    tr, te = m.finding_counts(a["train"]), m.finding_counts(a["test"])
    assert all(te[f] > 0 for f in tr if tr[f] >= 10)


def test_official_test_list_is_used(synth_root):
    m = _synth_manifest(synth_root)
    s = patient_split(m, DataConfig())
    assert {m.samples[i].split for i in s["test"]} == {"test"}
    assert_no_patient_overlap(m, s)


def test_empty_split_is_a_clear_error(tmp_path):
    root = _nih(tmp_path / "nih", [_row("a.png", "Nodule", "1")])
    with pytest.raises(DataError, match="split is empty"):
        patient_split(load_manifest(DataConfig(path=str(root))), DataConfig())


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_partitions_cover_everything_without_patient_overlap(synth_root, method):
    m = _synth_manifest(synth_root)
    idx = list(range(len(m.samples)))
    parts = partition(m, idx, 3, method, alpha=0.3, seed=0)
    assert sorted(i for p in parts for i in p) == idx
    assert_no_patient_overlap(m, parts)
    assert partition(m, idx, 3, method, alpha=0.3, seed=0) == parts


@pytest.mark.parametrize("method,alpha,hospitals", [("dirichlet", 0.1, 3), ("quantity", 0.3, 4)])
def test_skewed_partitions_redraw_until_every_hospital_has_enough_patients(synth_root, method, alpha, hospitals):
    m = _synth_manifest(synth_root)
    idx = list(range(len(m.samples)))
    fewest = {s: min(m.patients(p) for p in partition(m, idx, hospitals, method, alpha, seed=s)) for s in range(12)}
    assert min(fewest.values()) < 3            # without the demand some draws leave a hospital 1-2 patients
    for seed in fewest:
        parts = partition(m, idx, hospitals, method, alpha, seed=seed, min_patients=3)
        assert min(m.patients(p) for p in parts) >= 3, seed
        assert sorted(i for p in parts for i in p) == idx
    with pytest.raises(DataError, match="at least 2 images and 200 patients each"):
        partition(m, idx, hospitals, method, alpha, seed=0, min_patients=200)


def test_dirichlet_skews_labels_more_than_iid(synth_root):
    m = _synth_manifest(synth_root)
    idx = list(range(len(m.samples)))

    def spread(parts):
        prev = np.array([np.nanmean(m.label_matrix(p), axis=0) for p in parts])
        return prev.std(axis=0).mean()

    iid = np.mean([spread(partition(m, idx, 3, "iid", seed=s)) for s in range(3)])
    dirichlet = np.mean([spread(partition(m, idx, 3, "dirichlet", alpha=0.1, seed=s)) for s in range(3)])
    assert dirichlet > iid


def test_by_site_partition(synth_root):
    from common.data.manifest import Manifest

    ms = [_synth_manifest(synth_root, f"hospital_{k}") for k in (1, 2)]
    both = Manifest("chestxray14", synth_root, ms[0].findings, ms[0].samples + ms[1].samples)
    parts = partition(both, list(range(len(both.samples))), 2, "by-site")
    assert [len(p) for p in parts] == [len(ms[0].samples), len(ms[1].samples)]
    with pytest.raises(ValueError, match="by-site gives 2 hospitals"):
        partition(both, list(range(len(both.samples))), 3, "by-site")


def test_synthetic_data_is_the_same_in_every_process_for_one_seed(tmp_path):
    """A seeded generator must not depend on PYTHONHASHSEED (set iteration order): CI once drew other data."""
    code = ("import sys; from common.data.synthetic import synthesize; "
            "synthesize(sys.argv[1], hospitals=2, patients=12, size=16, seed=5, progress=False)")
    root = Path(__file__).resolve().parents[1]
    for hash_seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)], check=True, cwd=root,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed})
    for name in ("hospital_1/Data_Entry_2017.csv", "hospital_2/BBox_List_2017.csv", "holdout/test_list.txt"):
        assert (tmp_path / "1" / name).read_text() == (tmp_path / "2" / name).read_text(), name
    first = sorted((tmp_path / "1" / "hospital_1" / "images").iterdir())
    assert first and all(p.read_bytes() == (tmp_path / "2" / "hospital_1" / "images" / p.name).read_bytes()
                         for p in first)


def test_synthetic_hospitals_have_unique_patients_and_boxes(synth_root):
    groups = [{s.patient_id for s in _synth_manifest(synth_root, n).samples}
              for n in ("hospital_1", "hospital_2", "hospital_3", "holdout")]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1:])
    m = _synth_manifest(synth_root)
    with_focal = [s for s in m.samples if s.labels[m.findings.index("Nodule")] == 1]
    assert with_focal and all(any(b.finding == "Nodule" for b in s.boxes) for s in with_focal)
    assert Path(synth_root / "hospital_1" / "Data_Entry_2017.csv").read_text().startswith(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


# ------------------------------------------------------------------------------------------- transforms

def test_preprocessing_shapes_ranges_and_normalisation():
    pre = Preprocessor(PreprocessConfig(image_size=64, denoise_sigma=1.0))
    px = np.random.default_rng(0).random((100, 120)).astype(np.float32)
    prepared = pre.prepare(px)
    assert prepared.shape == (1, 64, 64) and prepared.dtype == torch.uint8
    x = pre.finalize(prepared)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    white = pre(np.ones((64, 64), np.float32))
    assert torch.allclose(white[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    noisy = Preprocessor(PreprocessConfig(image_size=64, denoise_sigma=0)).prepare(px).float().std()
    assert prepared.float().std() < noisy  # Gaussian denoising smooths noise
    one = Preprocessor(PreprocessConfig(image_size=32, channels=1, normalize="unit"))(np.zeros((40, 40), np.float32))
    assert one.shape == (1, 32, 32) and torch.all(one == -1)


def test_denoise_is_torchvisions_gaussian_blur_and_preparation_ignores_the_thread_count():
    """The scipy denoise (thread-count independent) keeps torchvision's kernel and reflect padding, and data
    preparation gives the same bytes with 1 and 2 torch threads."""
    from torchvision.transforms import v2

    from common.transforms import gaussian_denoise

    px = np.random.default_rng(0).random((48, 40)).astype(np.float32)
    for sigma in (0.5, 1.0, 2.0):
        k = 2 * int(np.ceil(3 * sigma)) + 1
        ref = v2.functional.gaussian_blur(torch.from_numpy(px)[None, None], [k, k], [sigma, sigma])[0, 0].numpy()
        assert np.abs(gaussian_denoise(px, sigma) - ref).max() < 1e-5, sigma
    pre = Preprocessor(PreprocessConfig(image_size=32, denoise_sigma=1.0))
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(pre.prepare(np.random.default_rng(1).random((100, 90))))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


def test_augmentation_through_pillow_keeps_orientation_and_seed_at_any_thread_count():
    img = Preprocessor(PreprocessConfig(image_size=48)).prepare(np.random.default_rng(2).random((60, 50)))
    flip = Augmenter(AugmentConfig(rotation_deg=0, zoom=0, hflip_p=1.0, contrast=0))
    assert torch.equal(flip(img), torch.flip(img, dims=[-1]))   # Pillow's image is the tensor's, not transposed
    threads, out = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            out.append(Augmenter(AugmentConfig())(img))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1]) and out[0].dtype == torch.uint8 and not torch.equal(out[0], img)


def test_augmentation_is_seeded_and_can_be_switched_off():
    img = Preprocessor(PreprocessConfig(image_size=64)).prepare(np.random.default_rng(1).random((64, 64)))
    aug = Augmenter(AugmentConfig())
    torch.manual_seed(3)
    a = aug(img)
    torch.manual_seed(3)
    b = aug(img)
    assert torch.equal(a, b) and a.shape == img.shape and a.dtype == torch.uint8
    assert not torch.equal(a, img)
    assert torch.equal(Augmenter(AugmentConfig(enabled=False))(img), img)


# ------------------------------------------------------------------------------------------- real data

def test_pneumoniamnist_real_file(pneumoniamnist):
    m = load_manifest(DataConfig(source="medmnist", path=str(pneumoniamnist)))
    s = patient_split(m, DataConfig(source="medmnist"))
    assert [len(s[k]) for k in ("train", "val", "test")] == [3882, 524, 624]
    assert m.finding_counts(s["test"]) == {"Pneumonia": 390}
    assert m.finding_counts(s["train"]) == {"Pneumonia": 3494}
