"""The prepared-image cache of a deployment node: a second process reads the images back without decoding,
gets exactly what decoding gave (pixels, facts, exclusions), notices changed files and settings, survives a
damaged cache, and keeps it private."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from common.data import prepared_cache
from common.data.manifest import Manifest
from common.data.prepare import build_datasets
from common.data.sources import load_manifest
from common.data.splits import patient_split
from common.data.synthetic import synthesize
from tests.run_support import tiny_settings


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-data")
    synthesize(root, hospitals=1, patients=12, size=64, seed=5, holdout_patients=0, bad_images=2, progress=False)
    return root / "hospital_1"


def _datasets(path, cache_dir, **dotted):
    cfg = tiny_settings({"data.path": str(path), **dotted})
    manifest = load_manifest(cfg.data, site="h1")
    splits = patient_split(manifest, cfg.data)
    return manifest, build_datasets(manifest, splits, cfg, progress=False, cache_dir=cache_dir)


def _no_decoding(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an image was decoded although the cache holds it")
    monkeypatch.setattr(Manifest, "load", refuse)


def test_second_process_reads_the_cache_and_gets_what_decoding_gave(hospital, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    m1, first = _datasets(hospital, cache)
    assert len(list(cache.iterdir())) == 1
    assert len(m1.excluded) == 2                      # the bad images, found by decoding
    _no_decoding(monkeypatch)
    m2, again = _datasets(hospital, cache)
    assert sorted((e.key, e.reason) for e in m2.excluded) == sorted((e.key, e.reason) for e in m1.excluded)
    for name in first:
        a, b = first[name], again[name]
        assert a.indices == b.indices and (a.labels == b.labels).all()
        for pos in range(len(a)):
            assert torch.equal(a.prepared(pos), b.prepared(pos))
            assert a.decode_facts(pos) == b.decode_facts(pos)
        xa, ya, _ = a[0]
        xb, yb, _ = b[0]
        if a.aug is None:
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_changed_file_or_settings_decode_again(hospital, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _datasets(hospital, cache)
    img = sorted((hospital / "images").glob("*.png"))[0]
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    _datasets(hospital, cache)                        # the changed file: a new entry
    _datasets(hospital, cache, **{"preprocess.image_size": 24})   # other preprocessing: another one
    assert len(list(cache.iterdir())) == 3
    _no_decoding(monkeypatch)
    _datasets(hospital, cache)                        # now cached


def test_damaged_cache_is_rebuilt_not_trusted(hospital, tmp_path):
    cache = tmp_path / "cache"
    _, first = _datasets(hospital, cache)
    entry = next(cache.iterdir())
    (entry / "index.json").write_text("{not json")
    _, again = _datasets(hospital, cache)            # decodes again, no error, and writes a good entry
    assert torch.equal(first["train"].prepared(0), again["train"].prepared(0))
    assert prepared_cache.load(cache, entry.name) is not None
    (entry / "images.npy").write_bytes(b"\x93NUMPY garbage")
    assert prepared_cache.load(cache, entry.name) is None


def test_cache_is_private(hospital, tmp_path):
    cache = tmp_path / "cache"
    _datasets(hospital, cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    entry = next(cache.iterdir())
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700
    for f in entry.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_without_a_cache_dir_nothing_is_written(hospital, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared_cache, "save", lambda *a, **k: pytest.fail("cache written without cache_dir"))
    _datasets(hospital, None)
