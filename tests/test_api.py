"""The inference API over real HTTP semantics (Starlette TestClient): every bad-input case, auth, the OpenAPI
contract, PNG vs DICOM, the batch endpoint, micro-batching, the explain endpoint and `fedxray predict`."""
from __future__ import annotations

import base64
import csv
import dataclasses
import re
import logging
import tempfile
import threading
from io import BytesIO

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from benchmarks.image_files import compressed_dicom, dicom_bytes, jpeg, patch_png_size, png
from common.bundle import load_bundle
from common.quality import CODES as GATE_CODES
from inference_api import create_app
from inference_api.predictor import Predictor
from inference_api.settings import Settings
from tests.inference_support import FINDINGS, narrow, trained_bundle, with_markers, xray

LIMITS = dict(min_resolution=32, max_pixels=2_000_000, max_upload_bytes=3_000_000, overlay_max_side=64)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return trained_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def client(bundle_dir, bundle):
    with TestClient(create_app(Settings(bundle=str(bundle_dir), **LIMITS), bundle=bundle)) as c:
        yield c


def post(client, data: bytes, *, name="x.png", ctype="image/png", path="/v1/predict", params=None, headers=None):
    return client.post(path, files={"file": (name, data, ctype)}, params=params or {}, headers=headers or {})


def image16() -> np.ndarray:
    """A 96x96 image on the 16-bit grid (so PNG and DICOM carry exactly the same values), its own range = the
    bit range (see with_markers)."""
    return np.round(with_markers(xray(96, seed=3)) * 65535) / 65535


def dcm(arr: np.ndarray, **kw) -> bytes:
    return dicom_bytes((arr * 65535).round().astype(np.uint16), **kw)


# ----------------------------------------------------------------------------------------- happy path


def test_predict_png_returns_documented_fields(client, bundle):
    r = post(client, png(xray(96)))
    assert r.status_code == 200, r.text
    body = r.json()
    probs = [f["probability"] for f in body["findings"]]
    assert probs == sorted(probs, reverse=True) and {f["finding"] for f in body["findings"]} == set(FINDINGS)
    thr = dict(zip(bundle.findings, bundle.thresholds))
    for f in body["findings"]:
        assert f["threshold"] == pytest.approx(thr[f["finding"]])
        assert f["positive"] == (f["probability"] >= f["threshold"])
    assert body["positive_findings"] == [f["finding"] for f in body["findings"] if f["positive"]]
    assert body["model"]["model_id"] == bundle.model_id and body["model"]["architecture"] == "smallcnn"
    assert body["model"]["version"]
    assert body["image"] == {"width": 96, "height": 96, "format": "png", "bit_depth": 8, "view": None}
    assert body["explanations"] is None and body["warnings"] == []
    assert body["timing"]["batch_size"] >= 1 and body["timing"]["total_ms"] > 0


def test_predict_with_explanations_for_named_findings(client):
    arr = narrow(xray(120, seed=4), 100)  # not square: overlays must keep the original geometry
    r = post(client, png(arr), params={"findings": "Nodule,Pneumonia", "explain": "true"})
    assert r.status_code == 200, r.text
    ex = r.json()["explanations"]
    assert [e["finding"] for e in ex] == ["Nodule", "Pneumonia"] and all(e["method"] == "fast" for e in ex)
    for e in ex:
        img = Image.open(BytesIO(base64.b64decode(e["overlay_png_base64"])))
        assert img.format == "PNG" and img.size == (e["overlay_width"], e["overlay_height"])
        assert (e["overlay_width"], e["overlay_height"]) == (53, 64)  # 100x120 scaled to overlay_max_side=64
        assert 0 <= e["peak"]["x"] < 100 and 0 <= e["peak"]["y"] < 120  # original pixels


def test_explain_true_without_names_explains_positive_findings(client):
    r = post(client, png(xray(96, findings=("Nodule", "Cardiomegaly"))), params={"explain": "true"})
    body = r.json()
    assert [e["finding"] for e in body["explanations"]] == body["positive_findings"]
    if not body["positive_findings"]:
        assert any("nothing to explain" in w for w in body["warnings"])


def test_grad_cam_family_selectable(client):
    r = post(client, png(xray(64)), params={"findings": "Effusion", "method": "gradcam++"})
    assert r.status_code == 200, r.text
    assert r.json()["explanations"][0]["method"] == "gradcam++"


@pytest.mark.parametrize("kind", ["png8", "png16", "jpeg", "rgba", "palette", "mono2", "mono1", "rescale_window",
                                  "dicom_pa_octet_stream"])
def test_accepted_inputs(client, kind):
    arr = image16()
    data, ctype = {
        "png8": lambda: (png(arr), "image/png"),
        "png16": lambda: (png(arr, 16), "image/png"),
        "jpeg": lambda: (jpeg(arr), "image/jpeg"),
        "rgba": lambda: (png(arr, mode="RGBA"), "image/png"),
        "palette": lambda: (png(arr, mode="P"), "image/png"),
        "mono2": lambda: (dcm(arr), "application/dicom"),
        "mono1": lambda: (dcm(1 - arr, pi="MONOCHROME1"), "application/dicom"),
        "rescale_window": lambda: (dcm(arr, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=64535,
                                       WindowWidth=131070), "application/dicom"),
        "dicom_pa_octet_stream": lambda: (dcm(arr, ViewPosition="PA"), "application/octet-stream"),
    }[kind]()
    r = post(client, data, ctype=ctype)
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == []


def test_png_and_dicom_of_the_same_pixels_predict_the_same(client):
    arr = image16()
    a = post(client, png(arr, 16)).json()
    b = post(client, dcm(arr), name="x.dcm", ctype="application/dicom").json()
    c = post(client, dcm(1 - arr, pi="MONOCHROME1"), name="y.dcm", ctype="application/dicom").json()
    assert (a["image"]["format"], b["image"]["format"], b["image"]["bit_depth"]) == ("png", "dicom", 16)
    pa = {f["finding"]: f["probability"] for f in a["findings"]}
    for other in (b, c):
        for f in other["findings"]:
            assert abs(f["probability"] - pa[f["finding"]]) < 1e-5  # measured: identical pixels -> 0 difference


def test_lateral_view_is_accepted_with_a_warning(client):
    r = post(client, dcm(image16(), ViewPosition="LL"), name="lat.dcm", ctype="application/dicom")
    assert r.status_code == 200
    body = r.json()
    assert body["image"]["view"] == "LL" and len(body["warnings"]) == 1
    assert "lateral view" in body["warnings"][0] and "frontal" in body["warnings"][0]


# -------------------------------------------------------------------------------------------- rejects


def _bad_cases():
    good = png(xray(64))
    arr16 = (xray(64) * 65535).astype(np.uint16)
    no_pixels = dicom_bytes(arr16)
    from pydicom import dcmread
    ds = dcmread(BytesIO(no_pixels))
    del ds.PixelData
    buf = BytesIO()
    ds.save_as(buf)
    big = np.random.default_rng(0).integers(0, 255, (1500, 1500), dtype=np.uint8)
    return {
        "zero_bytes": (b"", "image/png", 422, "empty"),
        "non_image": (b"hello, this is text and not an X-ray at all" * 3, "application/octet-stream", 422,
                      "not a PNG, JPEG or DICOM"),
        "truncated_png": (good[: len(good) // 2], "image/png", 422, "truncated"),
        "truncated_jpeg": (jpeg(xray(64))[:300], "image/jpeg", 422, "truncated"),
        "below_min_resolution": (png(xray(16)), "image/png", 422, "below the minimum of 32"),
        "bomb_header": (patch_png_size(good, 5000, 5000), "image/png", 413, "above the limit of 2,000,000"),
        "huge_bomb_header": (patch_png_size(good, 60000, 60000), "image/png", 413, "too large"),
        "too_many_pixels": (png(big / 255.0), "image/png", 413, "above the limit of 2,000,000"),
        "wrong_content_type": (good, "text/plain", 415, "unsupported content type"),
        "pdf_content_type": (good, "application/pdf", 415, "unsupported content type"),
        "dicom_no_pixel_data": (buf.getvalue(), "application/dicom", 422, "no pixel data"),
        "dicom_multi_frame": (dicom_bytes(np.stack([arr16, arr16]), NumberOfFrames=2), "application/dicom", 422,
                              "multi-frame"),
        "dicom_compressed": (compressed_dicom(size=64), "application/dicom", 422, "transfer syntax"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_upload_gets_a_clear_4xx(client, case):
    data, ctype, status, fragment = _bad_cases()[case]
    r = post(client, data, ctype=ctype)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


def test_request_level_rejects(client):
    r = client.post("/v1/predict", json={"image": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/v1/predict", files={"other": ("x.png", png(xray(64)), "image/png")})
    assert r.status_code == 400 and "field named 'file'" in r.json()["detail"]
    r = client.post("/v1/predict", content=b"--xx\r\nbroken",
                    headers={"content-type": "multipart/form-data; boundary=xx"})
    assert 400 <= r.status_code < 500
    r = post(client, png(xray(64)), params={"findings": "Fracture"})
    assert r.status_code == 422 and "unknown finding" in r.json()["detail"] and "Nodule" in r.json()["detail"]
    assert post(client, png(xray(64)), params={"findings": "nodule"}).json()["code"] == "unknown_finding"
    r = post(client, png(xray(64)), params={"explain": "true", "method": "magic"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_parameter"
    assert r.json()["detail"].startswith("query parameter method: Input should be 'fast'")


def test_upload_size_capped_before_reading_everything(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(3_100_000)
    r = post(client, big)
    assert r.status_code == 413 and "3,000,000 bytes" in r.json()["detail"]

    sent = []

    def stream():  # chunked, no Content-Length: the cap must trigger while streaming
        boundary = b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        yield boundary
        for _ in range(100):
            sent.append(1)
            yield bytes(100_000)

    r = client.post("/v1/predict", content=stream(), headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 413


def test_random_corruptions_never_give_500(client):
    rng = np.random.default_rng(7)
    seeds = [png(xray(64)), png(xray(64), 16), jpeg(xray(64)), dcm(xray(64))]
    for k in range(40):
        data = bytearray(seeds[k % len(seeds)])
        for _ in range(int(rng.integers(1, 20))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if k % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        r = post(client, bytes(data), ctype="application/octet-stream")
        assert r.status_code < 500, (k, r.status_code, r.text)


def test_uploads_never_touch_the_disk(client, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    grain = np.random.default_rng(1).normal(0, 0.06, (1200, 1200))  # film grain: a PNG that hardly compresses
    arr = np.clip(xray(1200, seed=1) + grain, 0, 1)  # ~1.2 MB PNG: above Starlette's 1 MB spool limit
    data = png(arr)
    assert len(data) > 1_100_000
    r = post(client, data)
    assert r.status_code == 200, r.text


def test_logs_carry_no_patient_data(client, caplog):
    caplog.set_level(logging.DEBUG)
    post(client, dcm(image16(), PatientID="PID-4711"), name="Doe_Jane.dcm", ctype="application/dicom")
    post(client, dicom_bytes(np.zeros((2, 40, 40), np.uint16), NumberOfFrames=2, PatientID="PID-4711"),
         name="Doe_Jane.dcm", ctype="application/dicom")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Doe" not in text and "PID-4711" not in text and "Jane" not in text


# ------------------------------------------------------------------------------------ other endpoints


def test_batch_endpoint_mixes_results_and_errors(client):
    files = [("files", ("a.png", png(xray(64, seed=1)), "image/png")),
             ("files", ("b.txt", b"not an image", "application/octet-stream")),
             ("files", ("c.dcm", dcm(image16()), "application/dicom"))]
    r = client.post("/v1/predict/batch", files=files, params={"findings": "all"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["succeeded"], body["failed"]) == (2, 1)
    a, b, c = body["items"]
    assert a["filename"] == "a.png" and len(a["result"]["explanations"]) == 4 and a["error"] is None
    assert b["result"] is None and b["error"]["status"] == 422 and "not a PNG" in b["error"]["detail"]
    assert c["result"]["image"]["format"] == "dicom"
    too_many = [("files", (f"{i}.png", png(xray(40)), "image/png")) for i in range(17)]
    r = client.post("/v1/predict/batch", files=too_many)
    assert r.status_code == 413 and "limit is 16" in r.json()["detail"]


def test_explain_endpoint_returns_full_size_png(client):
    arr = narrow(xray(150, seed=2), 130)
    r = post(client, png(arr), path="/v1/explain/Pneumonia")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(BytesIO(r.content)).size == (130, 150)  # original size, not overlay_max_side
    assert r.headers["x-finding"] == "Pneumonia" and 0 <= float(r.headers["x-peak-x"]) < 130
    assert 0 <= float(r.headers["x-probability"]) <= 1
    r = post(client, png(arr), path="/v1/explain/Nodule", params={"method": "gradcam", "max_side": 65})
    assert r.status_code == 200 and Image.open(BytesIO(r.content)).size == (56, 65)
    assert post(client, png(arr), path="/v1/explain/Fracture").json()["code"] == "unknown_finding"
    assert post(client, png(arr), path="/v1/explain/pneumonia").status_code == 422  # names as the card spells them
    assert post(client, b"", path="/v1/explain/Nodule").status_code == 422


def test_model_card_health_ready(client, bundle):
    card = client.get("/v1/model").json()
    assert card["model_id"] == bundle.model_id and card["findings"] == bundle.findings
    assert card["frontal_only"] is True and "gradcam++" in card["cam_methods"] and card["privacy"] is None
    assert set(card["thresholds"]) == set(FINDINGS) and card["preprocess"]["image_size"] == 64
    assert card["provenance"]["training"] == "centralised" and "test" in card["metrics"]
    ece = card["metrics"]["test"]["macro"]["ece"]   # calibration is on the card the API serves
    assert ece is not None and 0 < ece < 1 and card["metrics"]["test"]["headline"]["ece"] == ece
    assert card["metrics"]["validation"]["per_finding"][FINDINGS[0]]["ece"] is not None
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["ready"] is True


def test_not_ready_while_bundle_missing(tmp_path):
    with TestClient(create_app(Settings(bundle=str(tmp_path / "nope")))) as c:
        c.app.state.fedxray.load_finished.wait(10)
        r = c.get("/ready")
        assert r.status_code == 503 and "no model bundle" in r.json()["detail"]
        assert c.get("/health").status_code == 200
        r = post(c, png(xray(64)))
        assert r.status_code == 503 and "model not loaded" in r.json()["detail"]


def test_api_key(bundle_dir, bundle):
    app = create_app(Settings(bundle=str(bundle_dir), api_key="s3cret", **LIMITS), bundle=bundle)
    with TestClient(app) as c:
        assert post(c, png(xray(64))).status_code == 401
        r = post(c, png(xray(64)), headers={"X-API-Key": "wrong"})
        assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
        assert post(c, png(xray(64)), headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/v1/model").status_code == 401
        assert c.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert c.get("/").status_code == 200  # the page itself is public; its API calls carry the key


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("FEDXRAY_BUNDLE", "/b")
    monkeypatch.setenv("FEDXRAY_API_KEY", "k")
    monkeypatch.setenv("FEDXRAY_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("FEDXRAY_MAX_UPLOAD_BYTES", "123456")
    monkeypatch.setenv("FEDXRAY_THREADS", "2")
    s = Settings()
    assert (s.bundle, s.api_key.get_secret_value(), s.max_upload_bytes, s.threads) == ("/b", "k", 123456, 2)
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    monkeypatch.setenv("FEDXRAY_CORS_ORIGINS", '["https://c.example"]')
    assert Settings().cors_origins == ["https://c.example"]


def test_cors(bundle_dir, bundle):
    app = create_app(Settings(bundle=str(bundle_dir), cors_origins=["https://viewer.example"]), bundle=bundle)
    with TestClient(app) as c:
        r = c.options("/v1/predict", headers={"Origin": "https://viewer.example",
                                              "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://viewer.example"
        r = c.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_openapi_documents_every_field(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name, fields in {
        "PredictResponse": ["model", "image", "findings", "positive_findings", "explanations", "warnings", "timing"],
        "FindingResult": ["finding", "probability", "threshold", "positive"],
        "Explanation": ["finding", "method", "overlay_png_base64", "overlay_width", "overlay_height", "peak"],
        "Timing": ["decode_ms", "preprocess_ms", "inference_ms", "explain_ms", "total_ms", "batch_size"],
        "ModelRef": ["model_id", "version", "architecture"],
        "ModelCard": ["findings", "thresholds", "preprocess", "metrics", "provenance", "privacy", "explanation_eval"],
        "BatchResponse": ["items", "succeeded", "failed"],
    }.items():
        props = schemas[name]["properties"]
        for f in fields:
            assert f in props, (name, f)
        for f, p in props.items():
            described = "description" in p or ("$ref" in str(p) and name == "PredictResponse")
            assert described, f"{name}.{f} has no description"
    paths = spec["paths"]
    assert {"/v1/predict", "/v1/predict/batch", "/v1/explain/{finding}", "/v1/model", "/health", "/ready"} <= set(paths)
    body = paths["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["file"]["format"] == "binary"
    params = {p["name"] for p in paths["/v1/predict"]["post"]["parameters"]}
    assert {"explain", "findings", "method", "preview"} <= params
    assert {"413", "415", "422", "401"} <= set(paths["/v1/predict"]["post"]["responses"])
    assert "image/png" in paths["/v1/explain/{finding}"]["post"]["responses"]["200"]["content"]
    assert "securitySchemes" not in spec.get("components", {})  # this server requires no key: the schema says so


def test_openapi_names_findings_and_security(bundle_dir, bundle):
    with TestClient(create_app(Settings(bundle=str(bundle_dir), api_key="k", **LIMITS), bundle=bundle)) as c:
        spec = c.get("/openapi.json").json()
    assert "APIKeyHeader" in spec["components"]["securitySchemes"]
    s = spec["components"]["schemas"]
    assert s["FindingResult"]["properties"]["finding"]["enum"] == FINDINGS
    assert s["ErrorResponse"]["properties"]["detail"]["type"] == "string"
    assert "out_of_distribution" in s["ErrorResponse"]["properties"]["code"]["enum"]
    assert "gradcam++" in s["Explanation"]["properties"]["method"]["enum"]
    path = {p["name"]: p["schema"] for p in spec["paths"]["/v1/explain/{finding}"]["post"]["parameters"]}
    assert path["finding"]["enum"] == FINDINGS and "fast" in path["method"]["enum"]
    q = {p["name"]: p["schema"] for p in spec["paths"]["/v1/predict"]["post"]["parameters"]}
    assert re.fullmatch(q["findings"]["pattern"], "Nodule,Pneumonia") and not re.fullmatch(q["findings"]["pattern"], "x")


def test_openapi_states_each_servers_batch_limit(bundle_dir, bundle):
    """The routers and their multipart bodies are shared by every app: each schema still states its own limit."""
    specs = [create_app(Settings(bundle=str(bundle_dir), max_batch_files=n, **LIMITS), bundle=bundle).openapi()
             for n in (3, 7)]
    files = [s["paths"]["/v1/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
             ["properties"]["files"] for s in specs]
    assert [f["maxItems"] for f in files] == [3, 7] and all(f["minItems"] == 1 for f in files)


def test_web_page_is_self_contained(client):
    html = client.get("/").text
    assert "<table id=\"findings\"" in html and "/static/app.js" in html
    for asset in (html, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in asset and "https://" not in asset  # no CDN


# ------------------------------------------------------------------------------------- micro-batching


def test_predictor_batches_queued_images(bundle):
    with Predictor(bundle, max_batch=8, batch_window_s=0.0) as p:
        gate = threading.Event()
        blocker = p.call(lambda model: gate.wait(10))  # occupy the worker while 6 images queue up
        x = torch.zeros(3, 64, 64)
        futures = [p.submit(x) for _ in range(6)]
        gate.set()
        blocker.result(10)
        outs = [f.result(10) for f in futures]
    assert [o.batch_size for o in outs] == [6] * 6 and p.stats()["batch_sizes"] == {6: 1}
    assert np.allclose(outs[0].probabilities, outs[5].probabilities)


def test_predictor_waits_for_announced_images_only(bundle):
    with Predictor(bundle, max_batch=4, batch_window_s=0.5) as p:
        x = torch.zeros(3, 64, 64)
        lone = p.submit(x).result(10)  # nothing announced: runs at once, no window
        with p.incoming() as a1, p.incoming() as a2:
            f0 = p.submit(x)
            timer = threading.Timer(0.1, lambda: (p.submit(x, arrival=a1), p.submit(x, arrival=a2)))
            timer.start()
            timer.join()
        assert f0.result(10).batch_size == 3
    assert lone.batch_size == 1 and p.stats()["batch_sizes"] == {1: 1, 3: 1}


def test_concurrent_http_requests_share_batches(bundle_dir, bundle):
    settings = Settings(bundle=str(bundle_dir), batch_window_ms=50, max_batch=8, **LIMITS)
    with TestClient(create_app(settings, bundle=bundle)) as c:
        predictor = c.app.state.fedxray.runtime.predictor
        data = png(xray(96))
        results = []

        def one():
            results.append(post(c, data).json()["timing"]["batch_size"])

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = predictor.stats()
    assert stats["images"] == 8 and stats["passes"] < 8 and max(results) > 1, stats


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_predict_folder(bundle_dir, tmp_path):
    from fedxray.cli import main

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(png(narrow(xray(80), 70)))
    (src / "sub" / "b.dcm").write_bytes(dcm(image16()))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    (src / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    assert main(["predict", str(src), "--bundle", str(bundle_dir), "--out", str(out), "--explain", "all"]) == 0
    rows = {r["file"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert set(rows) == {"a.png", "sub/b.dcm", "broken.png"}
    assert rows["broken.png"]["status"] == "error" and "truncated" in rows["broken.png"]["error"]
    assert rows["a.png"]["status"] == "ok" and 0 <= float(rows["a.png"]["Nodule"]) <= 1
    assert rows["sub/b.dcm"]["format"] == "dicom"
    overlay = out / "overlays" / "a.png__Nodule.png"
    assert Image.open(overlay).size == (70, 80)  # original size
    assert (out / "overlays" / "sub__b.dcm__Pneumonia.png").is_file()
    assert main(["predict", str(src / "broken.png"), "--bundle", str(bundle_dir), "--out", str(out)]) == 2


# ------------------------------------------------------------- the same picture, the same answer (issue 11)


def _probs(r) -> dict:
    assert r.status_code == 200, r.text
    return {f["finding"]: f["probability"] for f in r.json()["findings"]}


def test_dicom_rescale_slope_with_halved_pixels_predicts_like_the_original(client):
    """RescaleSlope=2 with the stored values halved, no VOI, BitsStored=12: once half as bright, a call flipped."""
    values = (np.round(with_markers(xray(96, seed=3)) * 2047) * 2).astype(np.uint16)  # even, 0..4094
    a = _probs(post(client, dicom_bytes(values, bits_stored=12), name="a.dcm", ctype="application/dicom"))
    b = _probs(post(client, dicom_bytes(values // 2, bits_stored=12, RescaleSlope=2, RescaleIntercept=0),
                    name="b.dcm", ctype="application/dicom"))
    c = _probs(post(client, png(values / 4094.0, 16)))  # a 16-bit PNG of the same values
    for f in FINDINGS:
        assert abs(a[f] - b[f]) < 1e-6 and abs(a[f] - c[f]) < 1e-4, (f, a[f], b[f], c[f])


# ------------------------------------------------------------------------------ input-quality gate


def _colour_gradient(n=96) -> bytes:
    g = np.zeros((n, n, 3), np.uint8)
    g[..., 0], g[..., 2] = np.linspace(0, 255, n)[None], np.linspace(255, 0, n)[:, None]
    buf = BytesIO()
    Image.fromarray(g).save(buf, "PNG")
    return buf.getvalue()


GATE_CASES = {
    "noise": (lambda: png(np.random.default_rng(0).random((96, 96))), "out_of_distribution"),
    "colour_gradient": (_colour_gradient, "not_grayscale"),
    "all_white": (lambda: png(np.ones((96, 96))), "near_constant"),
    "all_black_dicom": (lambda: dcm(np.zeros((96, 96))), "near_constant"),
    "inverted": (lambda: png(1 - xray(96, seed=3)), "inverted"),
    "inverted_dicom_monochrome": (lambda: dcm(image16(), pi="MONOCHROME1"), "inverted"),
    "strip_64x400": (lambda: png(narrow(xray(96, seed=3), 400)[:64]), "extreme_aspect_ratio"),
}


@pytest.mark.parametrize("case", list(GATE_CASES))
def test_gate_refuses_non_xrays_with_a_reason_code(client, case):
    make, code = GATE_CASES[case]
    r = post(client, make())
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == code and body["detail"].startswith("refused: ") and "findings" not in body
    b = client.post("/v1/predict/batch", files=[("files", ("x.png", make(), "image/png"))]).json()
    assert b["items"][0]["error"]["code"] == code and b["items"][0]["result"] is None


def test_gate_passes_xrays_and_reports_its_score(client, bundle):
    gate = bundle.card["quality_gate"]
    for seed in range(4):
        r = post(client, png(xray(96, seed=seed)))
        assert r.status_code == 200, r.text
        check = r.json()["input_check"]
        assert check["issues"] == [] and 0 < check["ood_score"] <= check["ood_threshold"]
        assert check["ood_threshold"] == pytest.approx(gate["ood"]["threshold"])


def test_lateral_view_warns_per_policy_and_policy_can_refuse(bundle_dir, bundle):
    lateral = dcm(image16(), ViewPosition="LL")
    card = {**bundle.card, "quality_gate": {**bundle.card["quality_gate"],
                                            "policy": {"lateral_view": "reject", "inverted": "warn"}}}
    strict = dataclasses.replace(bundle, card=card)
    with TestClient(create_app(Settings(bundle=str(bundle_dir), **LIMITS), bundle=strict)) as c:
        r = post(c, lateral, ctype="application/dicom")
        assert r.status_code == 422 and r.json()["code"] == "lateral_view"
        r = post(c, png(1 - xray(96, seed=3)))  # inverted: only a warning under this policy (then the OOD check)
        assert r.json().get("code") == "out_of_distribution" or "inverted" in r.json()["warnings"][0]
        assert c.get("/v1/model").json()["input_gate"]["policy"]["lateral_view"] == "reject"


def test_model_card_states_gate_thresholds_and_false_rejection(client, bundle):
    gate = client.get("/v1/model").json()["input_gate"]
    assert set(gate["policy"]) == set(GATE_CODES) and gate["thresholds"]["aspect_ratio_max"] == 3.0
    assert gate["ood"]["fitted_on"] >= 8 and gate["ood"]["threshold"] > 0 and "feature_mean" not in gate["ood"]
    for split in ("validation", "test"):
        rates = gate["false_rejection"][split]
        assert rates["images"] > 0 and 0 <= rates["refused"] <= 0.25, rates
        assert set(rates["by_check"]) == set(GATE_CODES)
    assert len(bundle.card["quality_gate"]["ood"]["feature_mean"]) == gate["ood"]["features"]


def test_model_card_has_no_paths_and_no_raw_run_config(client, bundle_dir):
    text = client.get("/v1/model").text
    card = client.get("/v1/model").json()
    root = str(bundle_dir.parent.parent)
    assert root not in text and str(bundle_dir) not in text and '"/' not in text
    prov = card["provenance"]
    assert "config" not in prov and "run_config" not in prov and "root" not in prov["data"]
    assert prov["settings"]["model"]["arch"] == "smallcnn" and prov["settings"]["preprocess"]["image_size"] == 64
    assert "path" not in prov["settings"]["data"] and "output_dir" not in prov["settings"]
    assert set(card["weights"]) == {"sha256", "bytes"} and card["limits"]["max_request_pixels"] > 0


def test_public_provenance_of_a_federated_card():
    from inference_api.service import public_provenance

    prov = {"run_id": "fed-1", "training": "federated", "seconds": 3.0,
            "server_data": {"root": "/srv/data/holdout", "splits": {"val": {"images": 10}}},
            "federation": {"strategy": "fedavg", "nodes": {"st-mary": {"node_id": 7}, "st-john": {}},
                           "examples_per_node": {"st-mary": 40, "st-john": 50}, "dp": {"enabled": True}},
            "run_config": {"data.path": "/data/x", "federation.server_data_path": "/srv", "output_dir": "runs/demo",
                           "federation.rounds": 8, "federation.strategy": "fedavg", "privacy.target_epsilon": 3.0, "model.arch": "resnet50",
                           "preprocess.image_size": 224, "model.weights": "/home/me/w.pt", "train.seed": 42},
            "warm_start": {"kind": "bundle", "model_id": "fx-abc", "weights_sha256": "00ff", "public_data": "MedMNIST v2",
                           "data": {"source": "medmnist", "root": "/srv/public", "images": {"train": 9}, "patients": 9,
                                    "fingerprint": "1234"}, "architecture": {"arch": "resnet50"}},
            "calibration": {"method": "platt", "fitted_on": "validation split", "scope": "per finding",
                            "scale": {"pneumonia": 0.5}, "shift": {"pneumonia": -6.0},
                            "val_nll": {"before": 2.1, "after": 0.3}}}
    out = public_provenance(prov)
    assert out["calibration"] == prov["calibration"]   # how the served probabilities were calibrated
    assert out["warm_start"] == {"kind": "bundle", "model_id": "fx-abc", "weights_sha256": "00ff",
                                 "public_data": "MedMNIST v2", "data": {"source": "medmnist", "images": {"train": 9},
                                                                         "patients": 9, "fingerprint": "1234"}}
    assert out["settings"] == {"federation": {"rounds": 8, "strategy": "fedavg"}, "privacy": {"target_epsilon": 3.0},
                               "model": {"arch": "resnet50", "weights": "state-dict file"},
                               "preprocess": {"image_size": 224}, "train": {"seed": 42}}
    assert out["server_data"] == {"splits": {"val": {"images": 10}}} and out["federation"]["hospitals"] == 2
    assert "nodes" not in out["federation"] and "/" not in str(out).replace("/v1", "")


# -------------------------------------------------------------------------------------- formats


def _encode(fmt: str, n: int = 1, **kw) -> bytes:
    frames = [Image.fromarray((xray(96, seed=3 + i) * 255).round().astype(np.uint8), mode="L") for i in range(n)]
    buf = BytesIO()
    frames[0].save(buf, fmt, save_all=n > 1, append_images=frames[1:], **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, ctype, kw", [("TIFF", "image/tiff", {}), ("BMP", "image/bmp", {}),
                                            ("WEBP", "image/webp", {"lossless": True}), ("GIF", "image/gif", {})])
def test_single_frame_formats_accepted_like_png(client, fmt, ctype, kw):
    ref = _probs(post(client, _encode("PNG")))
    got = post(client, _encode(fmt, **kw), name=f"x.{fmt.lower()}", ctype=ctype)
    assert got.json()["image"]["format"] == fmt.lower()
    for f, p in _probs(got).items():
        assert abs(p - ref[f]) < 0.02  # GIF's palette is 256 grays: the same picture, nearly the same numbers


@pytest.mark.parametrize("fmt, ctype, kw", [("GIF", "image/gif", {}), ("PNG", "image/png", {}),
                                            ("TIFF", "image/tiff", {}), ("WEBP", "image/webp", {"lossless": True})])
def test_multi_frame_uploads_refused(client, fmt, ctype, kw):
    r = post(client, _encode(fmt, 3, **kw), ctype=ctype)
    assert r.status_code == 422 and r.json()["code"] == "multi_frame" and "3 frames" in r.json()["detail"]


# ------------------------------------------------------------------------------- headers and logs


def test_security_headers(client):
    data = png(xray(96))
    answers = {"predict": post(client, data), "refused": post(client, b"junk"),
               "batch": client.post("/v1/predict/batch", files=[("files", ("a.png", data, "image/png"))]),
               "explain": post(client, data, path="/v1/explain/Nodule"), "model": client.get("/v1/model"),
               "validation": post(client, data, params={"explain": "maybe"})}
    for name, r in answers.items():
        assert r.headers["cache-control"] == "no-store", name
        assert r.headers["x-content-type-options"] == "nosniff", name
    assert answers["validation"].json() == {"code": "invalid_parameter", "detail": answers["validation"].json()["detail"]}
    assert isinstance(answers["validation"].json()["detail"], str)
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and page.headers["x-content-type-options"] == "nosniff"
    assert client.get("/health").headers["x-content-type-options"] == "nosniff"


def test_undecodable_jpeg2000_logs_one_line_without_traceback(client, caplog):
    caplog.set_level(logging.DEBUG)
    r = post(client, compressed_dicom(size=64), ctype="application/dicom")
    assert r.status_code == 422 and r.json()["code"] == "dicom_unsupported"
    assert not [rec for rec in caplog.records if rec.exc_info]
    ours = [rec.getMessage() for rec in caplog.records if rec.name.startswith("inference_api")]
    assert len(ours) == 1 and "dicom_unsupported" in ours[0] and "JPEG 2000" in ours[0] and "\n" not in ours[0]


# ------------------------------------------------------------------------------------ memory budget


def test_request_pixel_budget_refuses_an_oversized_batch_before_decoding(bundle_dir, bundle, monkeypatch):
    settings = Settings(bundle=str(bundle_dir), **{**LIMITS, "max_pixels": 40_000_000}, max_request_pixels=50_000_000)
    zeros = patch_png_size(png(np.zeros((64, 64))), 6300, 6300)  # headers of 40 Mpx images: nothing decoded
    decoded = []
    import inference_api.service as service_module

    monkeypatch.setattr(service_module, "decode_image", lambda *a, **k: decoded.append(1) / 0)
    with TestClient(create_app(settings, bundle=bundle)) as c:
        r = c.post("/v1/predict/batch", files=[("files", (f"{i}.png", zeros, "image/png")) for i in range(2)])
    assert r.status_code == 413 and r.json()["code"] == "too_many_pixels" and "79,380,000" in r.json()["detail"]
    assert decoded == []


def test_decode_budget_full_gives_503_with_retry_after(bundle_dir, bundle):
    settings = Settings(bundle=str(bundle_dir), **LIMITS, budget_wait_s=0.2, retry_after_s=7)
    with TestClient(create_app(settings, bundle=bundle)) as c:
        budget = c.app.state.fedxray.decodes
        budget.used = budget.capacity  # as if other requests held all of it
        r = post(c, png(xray(96)))
        assert r.status_code == 503 and r.headers["retry-after"] == "7" and r.json()["code"] == "overloaded"
        budget.used = 0
        assert post(c, png(xray(96))).status_code == 200


def test_image_above_the_whole_decode_budget_is_413(bundle_dir, bundle):
    settings = Settings(bundle=str(bundle_dir), **{**LIMITS, "max_pixels": 40_000_000},
                        decode_budget_bytes=2**24)
    with TestClient(create_app(settings, bundle=bundle)) as c:
        r = post(c, png(np.zeros((3000, 3000))))
        assert r.status_code == 413 and r.json()["code"] == "too_many_pixels", r.text


def test_serve_refuses_non_loopback_without_a_key(bundle_dir, monkeypatch, capsys):
    from fedxray.cli import main
    from inference_api.cli import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.10")
    monkeypatch.delenv("FEDXRAY_API_KEY", raising=False)
    started = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.append(kw))
    assert main(["serve", "--bundle", str(bundle_dir), "--host", "0.0.0.0"]) == 2
    assert "FEDXRAY_API_KEY" in capsys.readouterr().err and started == []
    assert main(["serve", "--bundle", str(bundle_dir), "--host", "0.0.0.0", "--allow-unauthenticated"]) == 0
    assert main(["serve", "--bundle", str(bundle_dir)]) == 0  # loopback: the demo needs no key
    monkeypatch.setenv("FEDXRAY_API_KEY", "k")
    assert main(["serve", "--bundle", str(bundle_dir), "--host", "0.0.0.0"]) == 0
    assert [kw["host"] for kw in started] == ["0.0.0.0", "127.0.0.1", "0.0.0.0"]
