"""The served forward passes (inference_api.forward): each exported one equals eager PyTorch, carries the CAM feature
map and the gate's features from the same pass, falls back when onnxruntime is missing or an export is wrong, and
the server says which one runs."""
from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from benchmarks.image_files import png
from common.bundle import load_bundle
from common.explain import forward_with_cams
from common.models import build_model
from common.quality import forward_with_features
from common.settings import ModelConfig
from common.training import probabilities
from inference_api import create_app, forward
from inference_api.predictor import Predictor
from inference_api.settings import Settings
from tests.inference_support import trained_bundle, xray

TOLERANCE = 1e-4
EXPORTED = ["torchscript", pytest.param("onnx", marks=pytest.mark.skipif(
    not forward.available("onnx"), reason="onnxruntime/onnx not installed (the `onnx` extra; `dev` includes it)"))]


def _model(arch: str, n: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch=arch, weights="none"), n)
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m(torch.randn(8, 3, 64, 64))
    return m.eval()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return trained_bundle(tmp_path_factory)


@pytest.mark.parametrize("name", EXPORTED)
@pytest.mark.parametrize("arch", ["smallcnn", "resnet18"])
def test_exported_forward_equals_eager_with_feature_map_and_features(arch, name):
    model = _model(arch)
    x0 = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = model(x0)
    fwd = forward.build(model, name, image_size=64)
    assert fwd.name == name, "the export fell back: see the warning in the log"
    assert not any(m.training for m in model.modules())   # exporting left the live (eager) model as it was
    with torch.inference_mode():
        assert torch.equal(model(x0), before)
    for batch in (1, 3):  # exported with batch 2: the batch axis is dynamic
        x = torch.randn(batch, 3, 64, 64)
        logits, acts, feats = fwd(x)
        with torch.inference_mode():
            (ref_logits, ref_cams), ref_feats = forward_with_features(model, x, forward_with_cams)
        p, ref_p = probabilities(logits), probabilities(ref_logits)
        assert (p - ref_p).abs().max() <= TOLERANCE
        eager_logits, eager_acts, _ = forward.eager(model)(x)
        assert torch.equal(eager_logits, ref_logits)
        scale = max(1.0, float(eager_acts.abs().max()))
        assert (acts - eager_acts).abs().max() / scale <= TOLERANCE
        assert (feats - ref_feats).abs().max() <= TOLERANCE * max(1.0, float(ref_feats.abs().max()))
        from common.explain import cams_from_activations
        from common.models import classifier_head
        cams = cams_from_activations(classifier_head(model).weight, acts)   # the one-pass CAM from the export
        assert (cams - ref_cams).abs().max() <= TOLERANCE * max(1.0, float(ref_cams.abs().max()))
        assert ref_cams.amax() > 0  # real maps, not all-zero ones that match trivially
    assert fwd.check["probabilities"] <= TOLERANCE and fwd.check["feature_map_rel"] <= TOLERANCE


@pytest.mark.parametrize("name", EXPORTED)
def test_predictor_on_an_export_answers_like_eager_and_grad_cam_still_runs_on_eager(bundle_dir, name):
    bundle = load_bundle(bundle_dir)
    x = torch.randn(2, 3, 64, 64)
    eager_out = Predictor(bundle, forward="eager").run_batch(x, want_cams=True)
    with Predictor(bundle, forward=name) as pred:
        assert pred.forward.name == name
        probs, cams, feats = pred.run_batch(x, want_cams=True)
        assert np.abs(probs - eager_out[0]).max() <= TOLERANCE
        assert (cams - eager_out[1]).abs().max() <= TOLERANCE * max(1.0, float(eager_out[1].abs().max()))
        assert np.abs(feats - eager_out[2]).max() <= TOLERANCE * max(1.0, float(np.abs(eager_out[2]).max()))
        from common.explain import grad_cam_maps
        maps = pred.call(lambda model: grad_cam_maps(model, x[:1], [0, 1], "gradcam")).result(timeout=60)
        assert maps.shape == (1, 2, 64, 64) and maps.max() > 0.99   # pytorch-grad-cam's hooks on the eager model


def test_without_onnxruntime_auto_falls_back_and_onnx_says_how_to_get_it(monkeypatch, bundle_dir, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    assert not forward.available("onnx")
    assert forward.resolve("auto") == "torchscript"
    with pytest.raises(forward.ForwardUnavailable, match=r"fedxray\[onnx\]"):
        forward.resolve("onnx")
    fwd = forward.build(_model("smallcnn"), "auto", image_size=64)
    assert fwd.name in ("torchscript", "eager") and set(fwd.check["measured_ms"]) == {"torchscript", "eager"}
    from fedxray.cli import main
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: pytest.fail("served without the forward it was told"))
    assert main(["serve", "--bundle", str(bundle_dir), "--forward", "onnx"]) == 2
    assert "onnxruntime" in capsys.readouterr().err


def test_an_export_that_differs_from_eager_is_dropped_for_the_next(monkeypatch, caplog):
    real = forward.torchscript

    def off_by_a_bit(model, example):
        f = real(model, example)
        run = f.run
        f.run = lambda x: tuple(t + 1e-3 if i == 1 else t for i, t in enumerate(run(x)))  # feature map off
        return f

    monkeypatch.setattr(forward, "torchscript", off_by_a_bit)
    with caplog.at_level(logging.WARNING, logger="inference_api.forward"):
        fwd = forward.build(_model("smallcnn"), "torchscript", image_size=64)
    assert fwd.name == "eager" and "differs from eager" in caplog.text


def test_serve_reports_its_forward(bundle_dir):
    lines: list[str] = []
    bundle = load_bundle(bundle_dir)
    settings = Settings(bundle=str(bundle_dir), forward="torchscript", min_resolution=32)
    with TestClient(create_app(settings, bundle=bundle, announce=lines.append)) as client:
        assert client.get("/ready").json()["forward"] == "torchscript"
        card = client.get("/v1/model").json()
        assert card["inference"]["forward"] == "torchscript" and card["inference"]["check"]["probabilities"] <= 1e-4
        r = client.post("/v1/predict", files={"file": ("x.png", png(xray(96)), "image/png")},
                        params={"findings": "all"})
        assert r.status_code == 200 and len(r.json()["explanations"]) == len(bundle.findings)
    assert len(lines) == 1 and "forward: torchscript" in lines[0]


def test_fedxray_serve_prints_the_forward_it_runs(bundle_dir, monkeypatch, capsys):
    import time

    from fedxray.cli import main

    def run_until_ready(app, **_kw):  # uvicorn's place: start the app, wait for the bundle, stop
        with TestClient(app) as c:
            deadline = time.monotonic() + 60
            while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)

    monkeypatch.setattr("uvicorn.run", run_until_ready)
    monkeypatch.delenv("FEDXRAY_FORWARD", raising=False)
    assert main(["serve", "--bundle", str(bundle_dir), "--forward", "torchscript"]) == 0
    err = capsys.readouterr().err
    assert "; forward: torchscript" in err and "ready; forward: torchscript (torch " in err
    assert main(["serve", "--bundle", str(bundle_dir)]) == 0
    err = capsys.readouterr().err
    assert "forward: auto, the fastest of" in err and "timed on load: {" in err
