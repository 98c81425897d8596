"""`GET /metrics` in Prometheus' text format, for the IT team that runs the API.

Request counts by route and status and latency histograms come from prometheus-fastapi-instrumentator (routes
by their template, `/v1/explain/{finding}`, never by a value from the request). What is the service's own is
read from its state at scrape time by one collector, so no request path pays for it: the micro-batch sizes
the Predictor ran (a histogram), refusals by reason code (every `{"detail", "code"}` error the API answered
4xx/5xx with: the input gate's codes, budgets, overload), and the served model's id and forward. Each app has
its own registry (tests build many apps in one process). With an API key set, /metrics needs it too: pass it
from Prometheus' scrape config (`http_headers` or `authorization`).
"""
from __future__ import annotations

import threading
from collections import Counter

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


class Refusals:
    """Answers with an error code, counted by code and status (thread-safe; read by the collector)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()

    def add(self, code: str, status: int) -> None:
        with self._lock:
            self._counts[(code, int(status))] += 1

    def snapshot(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self._counts)


class ServiceCollector:
    """The service's own metrics, derived at scrape time from AppState."""

    def __init__(self, state) -> None:
        self.state = state

    def collect(self):
        refusals = CounterMetricFamily("fedxray_refusals", "Requests answered with an error code, by reason",
                                       labels=["reason", "status"])
        for (code, status), n in sorted(self.state.refusals.snapshot().items()):
            refusals.add_metric([code, str(status)], n)
        yield refusals
        rt = self.state.runtime
        sizes = dict(rt.predictor.batch_sizes) if rt is not None else {}
        buckets, running = [], 0
        top = max([rt.predictor.max_batch if rt is not None else 1, *sizes])
        for b in range(1, top + 1):
            running += sizes.get(b, 0)
            buckets.append((str(b), running))
        buckets.append(("+Inf", running))
        hist = HistogramMetricFamily("fedxray_batch_size", "Images per model pass (the micro-batcher)")
        hist.add_metric([], buckets, sum_value=sum(k * v for k, v in sizes.items()))
        yield hist
        info = GaugeMetricFamily("fedxray_model_info", "The served model (1 while loaded)",
                                 labels=["model_id", "arch", "forward"])
        ready = GaugeMetricFamily("fedxray_ready", "1 when the model is loaded and predictions are served")
        if rt is not None:
            info.add_metric([rt.service.model_ref.model_id, rt.service.model_ref.architecture,
                             rt.predictor.forward.name], 1)
        ready.add_metric([], 1 if rt is not None else 0)
        yield info
        yield ready


def instrument(app, state, dependencies: list) -> CollectorRegistry:
    """Request metrics on every route, the service's collector, and GET /metrics (behind `dependencies`)."""
    from prometheus_fastapi_instrumentator import Instrumentator

    registry = CollectorRegistry(auto_describe=True)
    registry.register(ServiceCollector(state))
    Instrumentator(registry=registry, should_group_status_codes=False, excluded_handlers=["/metrics"],
                   should_instrument_requests_inprogress=False).instrument(app).expose(
        app, include_in_schema=False, dependencies=dependencies or None)
    return registry
