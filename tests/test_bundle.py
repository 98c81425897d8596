"""Model bundle: round trip, integrity (sha256), schema and architecture refusals, strict JSON, atomic writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import common.bundle as bundle_mod
from common.bundle import SCHEMA_VERSION, load_bundle, read_card, save_bundle, sha256_file
from common.settings import ModelConfig, PreprocessConfig
from common.errors import BundleError
from common.models import build_model

FINDINGS = ["Atelectasis", "Effusion", "Pneumonia"]


def _strict_json(path):
    def no_constants(name):
        raise ValueError(name)

    return json.loads(path.read_text(), parse_constant=no_constants)


def _make(tmp_path, arch="smallcnn", channels=3, **save_kw):
    mc = ModelConfig(arch=arch, weights="none", dropout=0.1)
    pp = PreprocessConfig(image_size=64, channels=channels, normalize="unit")
    torch.manual_seed(0)
    model = build_model(mc, len(FINDINGS), channels).train()
    with torch.no_grad():
        model(torch.randn(4, channels, 64, 64))  # non-default BatchNorm running stats
    model.eval()
    kw = dict(model_config=mc, preprocess=pp, findings=FINDINGS, thresholds=np.array([0.2, 0.5, 0.35]))
    out = save_bundle(tmp_path / "bundle", model, **{**kw, **save_kw})
    return out, model, mc, pp


def _edit_card(path, fn):
    card = json.loads((path / "model.json").read_text())
    fn(card)
    (path / "model.json").write_text(json.dumps(card))


@pytest.mark.parametrize("arch,channels", [("smallcnn", 3), ("resnet18", 1)])
def test_round_trip_gives_identical_outputs(tmp_path, arch, channels):
    path, model, mc, pp = _make(tmp_path, arch, channels, metrics={"val": {"auc": 0.8}}, provenance={"rounds": 3})
    b = load_bundle(path)
    x = torch.randn(2, channels, 64, 64)
    with torch.no_grad():
        assert torch.equal(b.model(x), model(x))
    assert not b.model.training
    assert b.findings == FINDINGS and b.multilabel is True
    assert np.array_equal(b.thresholds, [0.2, 0.5, 0.35])
    assert b.preprocess == pp and b.model_config == mc and b.path == path
    assert b.card["architecture"]["weights"] == "none"
    assert b.card["input"] == {"channels": channels, "image_size": 64}
    assert b.card["provenance"]["rounds"] == 3 and b.card["metrics"] == {"val": {"auc": 0.8}}
    assert b.model_id.startswith("fx-") and b.card["weights"]["sha256"] == sha256_file(path / "weights.safetensors")


def test_card_is_strict_json_with_package_versions(tmp_path):
    metrics = {"test": {"auc": np.float32(0.75), "per_finding": np.array([0.5, np.nan, 0.9])}}
    path, *_ = _make(tmp_path, metrics=metrics, extra={"note": "demo"})
    card = _strict_json(path / "model.json")  # no NaN / Infinity tokens
    assert card["metrics"]["test"]["per_finding"] == [0.5, None, 0.9]
    assert {"torch", "torchvision", "numpy", "python"} <= card["provenance"]["package_versions"].keys()
    assert card["extra"] == {"note": "demo"} and card["schema_version"] == SCHEMA_VERSION
    assert card["thresholds"] == {"Atelectasis": 0.2, "Effusion": 0.5, "Pneumonia": 0.35}
    assert read_card(path) == card == read_card(path / "model.json")


def test_tampered_weights_are_refused(tmp_path):
    path, *_ = _make(tmp_path)
    w = path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(path)


def test_unsupported_schema_is_refused(tmp_path):
    path, *_ = _make(tmp_path)
    _edit_card(path, lambda c: c.update(schema_version=7))
    with pytest.raises(BundleError, match="bundle schema 7 is not supported.*supports 1.*upgrade fedxray"):
        load_bundle(path)
    with pytest.raises(BundleError, match="schema 7"):
        read_card(path)


def test_weights_that_do_not_fit_the_architecture_name_the_keys(tmp_path):
    path, *_ = _make(tmp_path)
    _edit_card(path, lambda c: c["architecture"].update(arch="resnet50"))
    with pytest.raises(BundleError, match=r"resnet50.*missing \d+: conv1.weight.*unexpected.*features\.0\.0\.weight"):
        load_bundle(path)


def test_findings_and_thresholds_must_match(tmp_path):
    with pytest.raises(BundleError, match="thresholds"):
        _make(tmp_path, thresholds=[0.5, 0.5])
    path, *_ = _make(tmp_path)
    _edit_card(path, lambda c: c["thresholds"].pop("Effusion"))
    with pytest.raises(BundleError, match="findings .3. and thresholds .2."):
        load_bundle(path)


def test_save_refuses_a_model_that_does_not_fit_its_config(tmp_path):
    model = build_model(ModelConfig(arch="smallcnn", weights="none"), 2)
    with pytest.raises(BundleError, match="do not fit"):
        save_bundle(tmp_path / "b", model, model_config=ModelConfig(arch="smallcnn", weights="none"),
                    preprocess=PreprocessConfig(), findings=FINDINGS, thresholds=[0.5] * 3)
    assert not (tmp_path / "b").exists()


def test_missing_or_broken_bundles_are_refused(tmp_path):
    with pytest.raises(BundleError, match="no model bundle at .*expected weights.safetensors and model.json"):
        load_bundle(tmp_path / "nowhere")
    path, *_ = _make(tmp_path)
    (path / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(path)
    (path / "model.json").unlink()
    with pytest.raises(BundleError, match="no model bundle"):
        load_bundle(path)


def test_writes_are_atomic(tmp_path, monkeypatch):
    path, model, mc, pp = _make(tmp_path)
    _make(tmp_path)  # overwrite in place
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "weights.safetensors"]
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def killed(*a, **k):
        raise KeyboardInterrupt  # as if the process died while writing the card

    def half_written(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    import safetensors.torch

    for target, name, fn in ((safetensors.torch, "save_file", half_written), (bundle_mod.json, "dumps", killed)):
        monkeypatch.setattr(target, name, fn)
        with pytest.raises(KeyboardInterrupt):
            save_bundle(path, model, model_config=mc, preprocess=pp, findings=FINDINGS, thresholds=[0.1, 0.2, 0.3])
        monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "weights.safetensors"]  # no temp files left
    assert (path / "model.json").read_bytes() == before["model.json"]
    load_bundle(path)  # same weights re-written: the old card still matches
