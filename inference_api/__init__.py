"""The inference service: FastAPI app factory, micro-batching predictor, web page and CLI commands."""
from __future__ import annotations


def create_app(settings=None, **kwargs):
    """Lazy re-export of inference_api.app.create_app (keeps `fedxray --help` free of FastAPI imports)."""
    from inference_api.app import create_app as _create_app

    return _create_app(settings, **kwargs)
