"""The inference API over real HTTP semantics (Starlette TestClient): every bad-input case, auth, the OpenAPI
contract, PNG vs DICOM, the batch endpoint, micro-batching, the explain endpoint and `fedxray predict`."""
from __future__ import annotations

import base64
import csv
import logging
import tempfile
import threading
from io import BytesIO

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000

from common.bundle import load_bundle
from inference_api import create_app
from inference_api.predictor import Predictor
from inference_api.settings import Settings
from tests.inference_support import FINDINGS, jpeg, narrow, png, trained_bundle, with_markers, xray
from tests.test_imageio import dicom_bytes, dicom_dataset, patch_png_size

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
    r = post(client, png(arr), params={"findings": "nodule,Pneumonia", "explain": "true"})
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


def compressed_dicom() -> bytes:
    """JPEG 2000 transfer syntax whose codestream cannot be decoded here."""
    ds = dicom_dataset(np.zeros((64, 64), dtype=np.uint16))
    ds.PixelData = encapsulate([b"\x00garbage, not a codestream" * 4])
    ds["PixelData"].VR = "OB"
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = JPEG2000
    buf = BytesIO()
    FileDataset(None, ds, file_meta=meta, preamble=b"\0" * 128).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


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
        "dicom_compressed": (compressed_dicom(), "application/dicom", 422, "transfer syntax"),
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
    grain = np.random.default_rng(1).normal(0, 0.06, (1100, 1100))  # film grain: a PNG that hardly compresses
    arr = np.clip(xray(1100, seed=1) + grain, 0, 1)  # ~1.2 MB PNG: above Starlette's 1 MB spool limit
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
    assert "APIKeyHeader" in spec["components"]["securitySchemes"]


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
    from common.cli import main

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
