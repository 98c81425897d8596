"""FastAPI app factory: `create_app(settings)`. Uvicorn entry: `fedxray serve --bundle DIR`.

The bundle loads in a background thread at startup, so /health answers at once and /ready turns true when
the model is in memory (or reports the load error). Uploads are parsed in memory (inference_api.uploads)
within the server's upload budget, their headers checked (a batch's pixels summed) before anything is
decoded, decoded and preprocessed on the decode slots within the decode budget (inference_api.limits),
checked by the input-quality gate (common.quality), and run through the single micro-batching Predictor.
The routes live in inference_api.routes (one router per concern), what they share in inference_api.deps and
inference_api.state, the schema's additions in inference_api.openapi; here they are put together.
Every error is {"detail": words, "code": reason code}; headers: see SecurityHeaders.
"""
from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import common
from common.bundle import Bundle
from inference_api.deps import api_key_dependencies
from inference_api.errors import InputError
from inference_api.limits import Overloaded, OverBudget
from inference_api.metrics import instrument
from inference_api.openapi import card_findings, for_server
from inference_api.routes import explain, model, operations, page, predict
from inference_api.settings import Settings
from inference_api.state import AppState

_NO_STORE = ("/v1/",)
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "upload_too_large", 415: "unsupported_media_type", 422: "invalid_parameter", 503: "not_ready"}


class SecurityHeaders:
    """Pure ASGI middleware: nosniff everywhere, no-store on every /v1 answer (all carry patient-derived data or
    describe the model behind it), and a Content-Security-Policy on the page and its assets."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"
                           or not path.startswith(_NO_STORE)]
                headers.append((b"x-content-type-options", b"nosniff"))
                if path.startswith(_NO_STORE):
                    headers.append((b"cache-control", b"no-store"))
                if path == "/" or path.startswith("/static/"):
                    headers += [(b"content-security-policy", _CSP.encode()), (b"x-frame-options", b"DENY"),
                                (b"referrer-policy", b"no-referrer")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(status: int, detail: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def _refuse(request: Request, status: int, detail: str, code: str, headers: dict | None = None) -> JSONResponse:
    """An error answer, counted by its code for GET /metrics."""
    request.app.state.fedxray.refusals.add(code, status)
    return _error(status, detail, code, headers)


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's list of errors as one sentence: 'query parameter explain: Input should be a valid boolean'."""
    parts = []
    for e in exc.errors()[:5]:
        loc = [str(x) for x in e.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])}" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(settings: Settings | None = None, *, bundle: Bundle | None = None,
               announce: Callable[[str], None] | None = None) -> FastAPI:
    """The service. Pass `bundle` to serve an already loaded bundle (tests, embedding) instead of settings.bundle;
    `announce` gets one line once the model is loaded (which forward runs), e.g. for `fedxray serve` to print."""
    settings = settings or Settings()
    state = AppState(settings, announce)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if bundle is not None:
            state.load(bundle)
        else:
            threading.Thread(target=state.load, name="fedxray-bundle-loader", daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="fedxray inference API", version=common.__version__, lifespan=lifespan,
                  description="Chest X-ray findings with calibrated thresholds and Grad-CAM heatmaps. Uploads "
                              "are processed in memory and never stored or logged. Every upload passes an "
                              "input-quality gate first (see the model card's input_gate).")
    app.state.fedxray = state
    findings_enum = card_findings(settings, bundle)

    def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = for_server(get_openapi(title=app.title, version=app.version,
                                                        description=app.description, routes=app.routes),
                                            settings, findings_enum)
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(SecurityHeaders)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=[settings.api_key_header, "content-type"],
                           expose_headers=["X-Finding", "X-Probability", "X-Peak-X", "X-Peak-Y", "X-Model-Id",
                                           "Retry-After"])
    _handle_errors(app)
    v1 = api_key_dependencies(settings)
    for router in (predict.router, explain.router, model.router):
        app.include_router(router, dependencies=v1)
    app.include_router(operations.router)
    app.include_router(page.router)
    instrument(app, state, v1)
    app.mount("/static", StaticFiles(directory=str(page.STATIC)), name="static")
    return app


def _handle_errors(app: FastAPI) -> None:
    """Every error as {"detail", "code"}, with the status and headers its exception carries."""

    @app.exception_handler(InputError)
    async def input_error(request: Request, e: InputError):
        return _refuse(request, e.status, e.detail, e.code, e.headers)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, e: Overloaded):
        return _refuse(request, 503, str(e), "overloaded", {"Retry-After": str(e.retry_after_s)})

    @app.exception_handler(OverBudget)
    async def over_budget(request: Request, e: OverBudget):
        return _refuse(request, 413, f"this request is too large for the server: {e}; send fewer or smaller images",
                      "too_many_pixels")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return _refuse(request, 422, _validation_detail(e), "invalid_parameter")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = _STATUS_CODES.get(e.status_code, "bad_request")
        return _refuse(request, e.status_code, str(e.detail), code, getattr(e, "headers", None))
