"""FastAPI app factory: `create_app(settings)`. Uvicorn entry: `fedxray serve --bundle DIR`.

The bundle loads in a background thread at startup, so /health answers at once and /ready turns true when
the model is in memory (or reports the load error). Uploads are parsed in memory (inference_api.uploads)
within the server's upload budget, their headers checked (a batch's pixels summed) before anything is
decoded, decoded and preprocessed on the decode slots within the decode budget (inference_api.limits),
checked by the input-quality gate (common.quality), and run through the single micro-batching Predictor.
Every error is {"detail": words, "code": reason code}; headers: see SecurityHeaders.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
import time
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib import resources

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import common
from common.bundle import Bundle, load_bundle, read_card
from common.explain import FAST
from common.imageio import ImageHeader
from inference_api import schemas
from inference_api.errors import InputError
from inference_api.limits import Budget, Decoder, Overloaded, OverBudget, Reservation
from inference_api.predictor import Arrival, Predictor
from inference_api.service import Prepared, Service
from inference_api.settings import Settings
from inference_api.uploads import UploadedFile, check_content_type, read_files

log = logging.getLogger("fedxray.api")

_IMAGE_FIELD = {"type": "string", "format": "binary",
                "description": "Chest X-ray: PNG (8/16-bit, gray, RGB(A), palette), JPEG, DICOM (MONOCHROME1/2, "
                               "uncompressed or a codec installed here), TIFF, BMP, WebP or GIF; one frame only"}
_ERRORS = {
    400: {"model": schemas.ErrorResponse, "description": "Malformed multipart body, no file part, a text value "
                                                         "where a file belongs, an over-long part header"},
    401: {"model": schemas.ErrorResponse, "description": "API key missing or wrong (when the server requires one)"},
    413: {"model": schemas.ErrorResponse, "description": "Upload above the byte limit, image or request above the "
                                                         "pixel limit, too many files"},
    415: {"model": schemas.ErrorResponse, "description": "Not multipart, or the file part is not an image type"},
    422: {"model": schemas.ErrorResponse, "description": "Unusable image (empty, corrupt, not an image, too small, "
                                                         "multi-frame, DICOM without pixels or with a codec not "
                                                         "available), refused by the input-quality gate (code says "
                                                         "which check), or a bad parameter"},
    503: {"model": schemas.ErrorResponse, "description": "Model not loaded yet (see /ready), or the server is at its "
                                                         "memory/decode budget: retry after Retry-After seconds",
          "headers": {"Retry-After": {"description": "Seconds to wait (when busy)", "schema": {"type": "integer"}}}},
}
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


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's list of errors as one sentence: 'query parameter explain: Input should be a valid boolean'."""
    parts = []
    for e in exc.errors()[:5]:
        loc = [str(x) for x in e.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])}" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


@dataclass
class Runtime:
    service: Service
    predictor: Predictor


class AppState:
    """What the routes need, filled in once the bundle is loaded."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.runtime: Runtime | None = None
        self.error: str | None = None
        self.load_finished = threading.Event()
        s = settings
        self.uploads = Budget(s.upload_budget_bytes, "upload memory", wait_s=s.budget_wait_s,
                              retry_after_s=s.retry_after_s)
        self.decodes = Budget(s.decode_budget_bytes, "decode memory", wait_s=s.budget_wait_s,
                              retry_after_s=s.retry_after_s)
        self.decoder = Decoder(s.decode_slots, wait_s=s.budget_wait_s, retry_after_s=s.retry_after_s)

    def load(self, bundle: Bundle | None = None) -> None:
        s = self.settings
        try:
            bundle = bundle or load_bundle(s.bundle)
            service = Service(bundle, max_pixels=s.max_pixels, min_resolution=s.min_resolution,
                              overlay_max_side=s.overlay_max_side, frontal_only=s.frontal_only, max_side=s.max_side)
            predictor = Predictor(bundle, max_batch=s.max_batch, batch_window_s=s.batch_window_ms / 1000,
                                  threads=s.threads).start()
            self.runtime = Runtime(service, predictor)
            log.info("model %s (%s, %d findings) ready", bundle.model_id, bundle.model_config.arch,
                     len(bundle.findings))
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("could not load the model bundle: %s", self.error)
        finally:
            self.load_finished.set()

    def limits(self) -> dict:
        s = self.settings
        return {"max_upload_bytes": s.max_upload_bytes, "max_pixels_per_image": s.max_pixels,
                "max_request_pixels": s.max_request_pixels, "max_batch_files": s.max_batch_files,
                "min_resolution": s.min_resolution, "decoded_max_side": s.max_side, "decode_slots": s.decode_slots,
                "decode_budget_bytes": s.decode_budget_bytes, "upload_budget_bytes": s.upload_budget_bytes}

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.predictor.close()
        self.decoder.close()


@dataclass
class Options:
    explain: bool
    targets: list[int] | None
    method: str
    preview: bool


def _card_findings(settings: Settings, bundle: Bundle | None) -> list[str] | None:
    """Finding names for the schema's enums, from the bundle or its model.json (cheap: no weights)."""
    if bundle is not None:
        return list(bundle.findings)
    try:
        return [str(f) for f in read_card(settings.bundle)["findings"]]
    except Exception:
        return None


def _with_enums(spec: dict, findings: list[str] | None) -> dict:
    """Make the schema say which finding names exist (they depend on the served bundle)."""
    if not findings:
        return spec
    comp = spec.get("components", {}).get("schemas", {})
    enum = {"type": "string", "enum": list(findings)}
    for model, prop in (("FindingResult", "finding"), ("Explanation", "finding")):
        if model in comp:
            comp[model]["properties"][prop].update(enum)
    for model, prop in (("PredictResponse", "positive_findings"), ("ModelCard", "findings")):
        if model in comp:
            comp[model]["properties"][prop]["items"] = dict(enum)
    for param in spec["paths"].get("/v1/explain/{finding}", {}).get("post", {}).get("parameters", []):
        if param["name"] == "finding":
            param["schema"] = {**param.get("schema", {}), **enum}
    name = "(" + "|".join(re.escape(f) for f in findings) + ")"
    for path in ("/v1/predict", "/v1/predict/batch"):
        for param in spec["paths"].get(path, {}).get("post", {}).get("parameters", []):
            if param["name"] == "findings":
                param["schema"] = {"type": "string", "pattern": f"^(all|{name}(,{name})*)?$"}
    return spec


def create_app(settings: Settings | None = None, *, bundle: Bundle | None = None) -> FastAPI:
    """The service. Pass `bundle` to serve an already loaded bundle (tests, embedding) instead of settings.bundle."""
    settings = settings or Settings()
    state = AppState(settings)

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
    findings_enum = _card_findings(settings, bundle)

    def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = _with_enums(get_openapi(title=app.title, version=app.version,
                                                         description=app.description, routes=app.routes),
                                             findings_enum)
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(SecurityHeaders)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=[settings.api_key_header, "content-type"],
                           expose_headers=["X-Finding", "X-Probability", "X-Peak-X", "X-Peak-Y", "X-Model-Id",
                                           "Retry-After"])

    @app.exception_handler(InputError)
    async def input_error(_request: Request, e: InputError):
        return _error(e.status, e.detail, e.code, e.headers)

    @app.exception_handler(Overloaded)
    async def overloaded(_request: Request, e: Overloaded):
        return _error(503, str(e), "overloaded", {"Retry-After": str(e.retry_after_s)})

    @app.exception_handler(OverBudget)
    async def over_budget(_request: Request, e: OverBudget):
        return _error(413, f"this request is too large for the server: {e}; send fewer or smaller images",
                      "too_many_pixels")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError):
        return _error(422, _validation_detail(e), "invalid_parameter")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException):
        code = _STATUS_CODES.get(e.status_code, "bad_request")
        return _error(e.status_code, str(e.detail), code, getattr(e, "headers", None))

    key_header = APIKeyHeader(name=settings.api_key_header, auto_error=False,
                              description="Required when the server sets FEDXRAY_API_KEY")

    def require_key(key: str | None = Security(key_header)) -> None:
        expected = settings.api_key.get_secret_value() if settings.api_key else None
        if expected and not (key and secrets.compare_digest(key.encode(), expected.encode())):
            raise HTTPException(401, f"missing or wrong API key: send it in the {settings.api_key_header} header",
                                headers={"WWW-Authenticate": "ApiKey"})

    def runtime() -> Runtime:
        if state.runtime is None:
            raise InputError(503, f"model not loaded: {state.error or 'still loading, retry shortly'}", "not_ready",
                             {"Retry-After": str(settings.retry_after_s)})
        return state.runtime

    def options(explain: bool = Query(False, description="Add heatmap overlays (positive findings by default)"),
                findings: str | None = Query(None, description="Findings to explain: comma-separated names as the "
                                             "model card spells them, or 'all'; implies explain=true"),
                method: schemas.CamMethod = Query(FAST, description="Heatmap method"),
                preview: bool = Query(False, description="Also return the decoded image as a PNG"),
                rt: Runtime = Depends(runtime)) -> Options:
        return Options(explain or findings is not None, rt.service.parse_targets(findings), method, preview)

    v1 = [Depends(require_key)] if settings.api_key else []  # the schema then says what the server requires

    def probe(rt: Runtime, upload: UploadedFile) -> ImageHeader:
        check_content_type(upload.content_type)
        return rt.service.probe(upload.data, upload.filename)

    async def decode(rt: Runtime, upload: UploadedFile, header: ImageHeader, held: Reservation,
                     keep_side: int | None) -> Prepared:
        """Decode on a decode slot; afterwards the reservation keeps only what the answer still needs."""
        prepared = await state.decoder.run(rt.service.prepare, upload.data, upload.filename, keep_side,
                                           big=header.pixels > 4_000_000)
        held.shrink_to(prepared.retained_bytes)
        return prepared

    async def predict_one(rt: Runtime, upload: UploadedFile, header: ImageHeader, opts: Options,
                          arrival: Arrival | None = None) -> schemas.PredictResponse:
        """Decode (within the decode budget), gate, predict (micro-batched) and explain one upload."""
        svc = rt.service
        keep = settings.overlay_max_side if (opts.explain or opts.preview) else 0
        async with state.decodes.reserve(header.decode_bytes(settings.max_side)) as held:
            prepared = await decode(rt, upload, header, held, keep)
            fast_cams = opts.explain and opts.method == FAST
            t1 = time.perf_counter()
            out = await asyncio.wrap_future(rt.predictor.submit(prepared.x, want_cams=fast_cams, arrival=arrival))
            t2 = time.perf_counter()
            score, ood_issues = svc.check_features(out.features)
            issues = prepared.warnings + ood_issues
            warnings = [i.detail for i in issues]
            explanations = None
            if opts.explain:
                targets = svc.explain_targets(out.probabilities, opts.targets)
                if not targets:
                    warnings.append("no finding reached its threshold, so there is nothing to explain: pass "
                                    "findings=all or finding names to get heatmaps anyway")
                maps = await heatmaps(rt, prepared, out, targets, opts.method)
                explanations = await state.decoder.run(svc.explanations, prepared.image, maps, targets, opts.method)
            preview = await state.decoder.run(svc.preview, prepared.image) if opts.preview else None
            t3 = time.perf_counter()
        table = svc.findings_table(out.probabilities)
        pre_ms = prepared.decode_ms + prepared.preprocess_ms
        return schemas.PredictResponse(
            model=svc.model_ref, image=svc.image_info(prepared.image), findings=table,
            positive_findings=[r.finding for r in table if r.positive], explanations=explanations,
            preview_png_base64=preview, warnings=warnings, input_check=svc.input_check(issues, score),
            timing=schemas.Timing(decode_ms=prepared.decode_ms, preprocess_ms=prepared.preprocess_ms,
                                  inference_ms=(t2 - t1) * 1000, explain_ms=(t3 - t2) * 1000,
                                  total_ms=(t3 - t1) * 1000 + pre_ms, batch_size=out.batch_size))

    async def heatmaps(rt: Runtime, prepared: Prepared, out, targets: list[int], method: str):
        """(T, h, w) maps: the one-pass CAMs already computed, or pytorch-grad-cam run alone on the worker."""
        if method == FAST:
            return out.cams[targets]
        return await asyncio.wrap_future(rt.predictor.call(rt.service.grad_cam(prepared.x, targets, method)))

    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "properties": {"file": _IMAGE_FIELD}}}}}}
    batch_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": _IMAGE_FIELD, "minItems": 1,
                                 "maxItems": settings.max_batch_files}}}}}}}

    @app.post("/v1/predict", response_model=schemas.PredictResponse, dependencies=v1, responses=_ERRORS,
              openapi_extra=upload_body, tags=["predict"], summary="Findings (and heatmaps) for one image")
    async def predict(request: Request, opts: Options = Depends(options), rt: Runtime = Depends(runtime)):
        async with state.uploads.reserve() as body:
            with rt.predictor.incoming() as arrival:
                files = await read_files(request, max_bytes=settings.max_upload_bytes, field_names=("file",),
                                         reservation=body)
                if len(files) != 1:
                    raise InputError(400, f"send exactly one file in field 'file' (got {len(files)}); "
                                          f"use /v1/predict/batch for several")
                return await predict_one(rt, files[0], probe(rt, files[0]), opts, arrival)

    @app.post("/v1/predict/batch", response_model=schemas.BatchResponse, dependencies=v1, responses=_ERRORS,
              openapi_extra=batch_body, tags=["predict"],
              summary="Several images in one request; each gets a result or its own error")
    async def predict_batch(request: Request, opts: Options = Depends(options), rt: Runtime = Depends(runtime)):
        async with state.uploads.reserve() as body:
            files = await read_files(request, max_bytes=settings.max_upload_bytes, field_names=("files", "file"),
                                     reservation=body)
            if len(files) > settings.max_batch_files:
                raise InputError(413, f"{len(files)} files in one request; the limit is {settings.max_batch_files}:"
                                      f" split the batch", "too_many_files")
            headers: list[ImageHeader | InputError] = []
            for f in files:  # every header first: the request's pixel budget is checked before any decoding
                try:
                    headers.append(probe(rt, f))
                except InputError as e:
                    headers.append(e)
            total = sum(h.pixels for h in headers if isinstance(h, ImageHeader))
            if total > settings.max_request_pixels:
                raise InputError(413, f"the images of this request hold {total:,} pixels in all; the limit is "
                                      f"{settings.max_request_pixels:,} per request: send fewer or smaller images",
                                 "too_many_pixels")

            async def one(i: int, f: UploadedFile, h, arrival: Arrival) -> schemas.BatchItem:
                try:
                    if isinstance(h, InputError):
                        raise h
                    return schemas.BatchItem(index=i, filename=f.filename,
                                             result=await predict_one(rt, f, h, opts, arrival))
                except InputError as e:
                    err = schemas.ErrorInfo(status=e.status, code=e.code, detail=e.detail)
                except Overloaded as e:
                    err = schemas.ErrorInfo(status=503, code="overloaded", detail=str(e))
                except OverBudget as e:
                    err = schemas.ErrorInfo(status=413, code="too_many_pixels", detail=str(e))
                finally:
                    arrival.close()  # a rejected image must not keep a forming batch waiting
                return schemas.BatchItem(index=i, filename=f.filename, error=err)

            with ExitStack() as stack:  # announce every image first, so they can share a micro-batch
                arrivals = [stack.enter_context(rt.predictor.incoming()) for _ in files]
                items = await asyncio.gather(*(one(i, f, h, a) for i, (f, h, a)
                                               in enumerate(zip(files, headers, arrivals))))
        ok = sum(it.result is not None for it in items)
        return schemas.BatchResponse(items=list(items), succeeded=ok, failed=len(items) - ok)

    @app.post("/v1/explain/{finding}", dependencies=v1, tags=["explain"], openapi_extra=upload_body,
              response_class=Response, summary="Full-size heatmap overlay (PNG) of one finding for one image",
              responses={**_ERRORS, 200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                         "description": "Overlay at the original image size (at most the decoded size, "
                         "FEDXRAY_MAX_SIDE). Headers: X-Finding, X-Probability, X-Peak-X, X-Peak-Y (original "
                         "pixels)"}})
    async def explain(request: Request, finding: str = Path(description="Finding name, exactly as the model card "
                                                                        "lists it"),
                      method: schemas.CamMethod = Query(FAST, description="Heatmap method"),
                      max_side: int | None = Query(None, ge=16, le=100_000,
                                                   description="Scale down to this longest side"),
                      rt: Runtime = Depends(runtime)):
        svc = rt.service
        if finding not in svc.findings:
            raise InputError(422, f"unknown finding {finding!r}: this model knows {svc.findings}", "unknown_finding")
        c = svc.findings.index(finding)
        async with state.uploads.reserve() as body:
            with rt.predictor.incoming() as arrival:
                files = await read_files(request, max_bytes=settings.max_upload_bytes, field_names=("file",),
                                         reservation=body)
                if len(files) != 1:
                    raise InputError(400, f"send exactly one file in field 'file' (got {len(files)})")
                header = probe(rt, files[0])
                async with state.decodes.reserve(header.decode_bytes(settings.max_side)) as held:
                    prepared = await decode(rt, files[0], header, held, max_side)
                    out = await asyncio.wrap_future(rt.predictor.submit(prepared.x, want_cams=method == FAST,
                                                                        arrival=arrival))
                    svc.check_features(out.features)
                    maps = await heatmaps(rt, prepared, out, [c], method)
                    from common.explain import render_overlay

                    img = prepared.image
                    ov = await state.decoder.run(partial(render_overlay, max_side=max_side,
                                                         original_size=(img.width, img.height)), img.pixels, maps[0])
        return Response(ov.png, media_type="image/png", headers={
            "X-Finding": svc.findings[c], "X-Probability": f"{out.probabilities[c]:.6f}",
            "X-Peak-X": f"{ov.peak_x:.1f}", "X-Peak-Y": f"{ov.peak_y:.1f}", "X-Model-Id": svc.model_ref.model_id})

    @app.get("/v1/model", response_model=schemas.ModelCard, dependencies=v1, tags=["model"],
             responses={401: _ERRORS[401], 503: _ERRORS[503]}, summary="The served bundle's public model card")
    async def model_card(rt: Runtime = Depends(runtime)):
        return rt.service.model_card(state.limits())

    @app.get("/health", response_model=schemas.Health, tags=["operations"], summary="Liveness")
    async def health():
        return schemas.Health(status="ok")

    @app.get("/ready", response_model=schemas.Ready, tags=["operations"],
             responses={503: {"model": schemas.Ready, "description": "Model not loaded (yet)",
                              "headers": {"Retry-After": {"description": "Seconds to wait",
                                                          "schema": {"type": "integer"}}}}},
             summary="Readiness: 200 once the model is loaded and its worker runs")
    async def ready():
        rt = state.runtime
        if rt is not None and rt.predictor.alive:
            return schemas.Ready(ready=True, model_id=rt.service.model_ref.model_id)
        detail = state.error or ("inference worker stopped" if rt is not None else "loading the model bundle")
        return JSONResponse(schemas.Ready(ready=False, detail=detail).model_dump(), status_code=503,
                            headers={"Retry-After": str(settings.retry_after_s)})

    static = resources.files("inference_api") / "static"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse((static / "index.html").read_text(), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app
