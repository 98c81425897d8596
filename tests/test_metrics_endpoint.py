"""GET /metrics (Prometheus text): a request is counted by route template and status with its latency, a refusal by
its reason code, the micro-batch sizes and the served model appear, and with an API key /metrics needs it too."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.image_files import png
from common.bundle import load_bundle
from inference_api.app import create_app
from inference_api.settings import Settings
from tests.inference_support import trained_bundle, xray


def _samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def client(tmp_path_factory):
    bundle_dir = trained_bundle(tmp_path_factory)
    app = create_app(Settings(bundle=str(bundle_dir), api_key="k3y", min_resolution=32), bundle=load_bundle(bundle_dir))
    with TestClient(app) as c:
        yield c


def test_metrics_count_requests_refusals_batches_and_name_the_model(client):
    small_xray_png = png(xray(96))
    h = {"X-API-Key": "k3y"}
    assert client.post("/v1/predict", files={"file": ("a.png", small_xray_png, "image/png")}, headers=h).status_code == 200
    assert client.post("/v1/predict", files={"file": ("b.png", b"not an image", "image/png")},
                       headers=h).status_code in (400, 415, 422)
    assert client.get("/metrics").status_code == 401          # the key guards /metrics too
    r = client.get("/metrics", headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)
    ok = [v for (name, labels), v in m.items() if name == "http_requests_total"
          and dict(labels).get("handler") == "/v1/predict" and dict(labels).get("status") == "200"]
    assert ok == [1.0], {k: v for k, v in m.items() if k[0] == "http_requests_total"}
    assert any(name == "http_request_duration_seconds_count" and dict(labels).get("handler") == "/v1/predict"
               for name, labels in m)
    refused = {dict(labels)["reason"]: v for (name, labels), v in m.items() if name == "fedxray_refusals_total"}
    assert sum(refused.values()) >= 2 and refused.get("unauthorized") == 1, refused   # the bad upload + the 401
    assert len(refused) >= 2
    assert m[("fedxray_batch_size_count", ())] == 1.0 and m[("fedxray_batch_size_sum", ())] == 1.0
    info = [dict(labels) for (name, labels), v in m.items() if name == "fedxray_model_info" and v == 1]
    assert len(info) == 1 and info[0]["model_id"] and info[0]["forward"]
    assert m[("fedxray_ready", ())] == 1.0
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]
