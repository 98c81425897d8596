"""FastAPI app factory: `create_app(settings)`. Uvicorn entry: `fedxray serve --bundle DIR`.

The bundle loads in a background thread at startup, so /health answers at once and /ready turns true when
the model is in memory (or reports the load error). Uploads are parsed in memory (inference_api.uploads),
decoded and preprocessed in the thread pool, and run through the single micro-batching Predictor.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles

import common
from common.bundle import Bundle, load_bundle
from common.explain import CAM_METHODS, FAST
from inference_api import schemas
from inference_api.predictor import Arrival, Predictor
from inference_api.service import InputError, Prepared, Service
from inference_api.settings import Settings
from inference_api.uploads import UploadedFile, check_content_type, read_files

log = logging.getLogger("fedxray.api")

_IMAGE_FIELD = {"type": "string", "format": "binary",
                "description": "PNG (8/16-bit, RGBA, palette), JPEG or DICOM (MONOCHROME1/2) chest X-ray"}
_ERRORS = {
    400: {"model": schemas.ErrorResponse, "description": "Malformed multipart body or no file field"},
    401: {"model": schemas.ErrorResponse, "description": "API key missing or wrong (when the server requires one)"},
    413: {"model": schemas.ErrorResponse, "description": "Upload above the byte limit or image above the pixel limit"},
    415: {"model": schemas.ErrorResponse, "description": "Not multipart, or the file part is not an image type"},
    422: {"model": schemas.ErrorResponse, "description": "Unusable image (empty, truncated, not an image, too "
                                                         "small, DICOM without pixels, multi-frame, compressed "
                                                         "transfer syntax) or bad parameter"},
    503: {"model": schemas.ErrorResponse, "description": "Model not loaded yet (see /ready)"},
}


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

    def load(self, bundle: Bundle | None = None) -> None:
        s = self.settings
        try:
            bundle = bundle or load_bundle(s.bundle)
            service = Service(bundle, max_pixels=s.max_pixels, min_resolution=s.min_resolution,
                              overlay_max_side=s.overlay_max_side, frontal_only=s.frontal_only)
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

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.predictor.close()


@dataclass
class Options:
    explain: bool
    targets: list[int] | None
    method: str
    preview: bool


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
                              "are processed in memory and never stored or logged.")
    app.state.fedxray = state
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=[settings.api_key_header, "content-type"],
                           expose_headers=["X-Finding", "X-Probability", "X-Peak-X", "X-Peak-Y", "X-Model-Id"])

    key_header = APIKeyHeader(name=settings.api_key_header, auto_error=False,
                              description="Required when the server sets FEDXRAY_API_KEY")

    def require_key(key: str | None = Security(key_header)) -> None:
        expected = settings.api_key.get_secret_value() if settings.api_key else None
        if expected and not (key and secrets.compare_digest(key.encode(), expected.encode())):
            raise HTTPException(401, f"missing or wrong API key: send it in the {settings.api_key_header} header",
                                headers={"WWW-Authenticate": "ApiKey"})

    def runtime() -> Runtime:
        if state.runtime is None:
            raise HTTPException(503, f"model not loaded: {state.error or 'still loading, retry shortly'}")
        return state.runtime

    def options(explain: bool = Query(False, description="Add heatmap overlays (positive findings by default)"),
                findings: str | None = Query(None, description="Findings to explain: comma-separated names or "
                                                                 "'all'; implies explain=true"),
                method: str = Query(FAST, description=f"Heatmap method: {', '.join(CAM_METHODS)}"),
                preview: bool = Query(False, description="Also return the decoded image as a PNG"),
                rt: Runtime = Depends(runtime)) -> Options:
        try:
            return Options(explain or findings is not None, rt.service.parse_targets(findings),
                           rt.service.parse_method(method), preview)
        except InputError as e:
            raise HTTPException(e.status, e.detail) from None

    v1 = [Depends(require_key)]

    async def predict_one(rt: Runtime, upload: UploadedFile, opts: Options, arrival: Arrival | None = None
                          ) -> schemas.PredictResponse:
        """Check, decode, predict (micro-batched) and explain one upload. Raises InputError/HTTPException."""
        svc = rt.service
        check_content_type(upload.content_type)
        prepared = await run_in_threadpool(svc.prepare, upload.data, upload.filename)
        fast_cams = opts.explain and opts.method == FAST
        t1 = time.perf_counter()
        out = await asyncio.wrap_future(rt.predictor.submit(prepared.x, want_cams=fast_cams, arrival=arrival))
        t2 = time.perf_counter()
        warnings = svc.warnings(prepared.image)
        explanations = None
        if opts.explain:
            targets = svc.explain_targets(out.probabilities, opts.targets)
            if not targets:
                warnings.append("no finding reached its threshold, so there is nothing to explain: pass "
                                "findings=all or finding names to get heatmaps anyway")
            maps = await heatmaps(rt, prepared, out, targets, opts.method)
            explanations = await run_in_threadpool(svc.explanations, prepared.image, maps, targets, opts.method)
        preview = await run_in_threadpool(svc.preview, prepared.image) if opts.preview else None
        t3 = time.perf_counter()
        table = svc.findings_table(out.probabilities)
        pre_ms = prepared.decode_ms + prepared.preprocess_ms
        return schemas.PredictResponse(
            model=svc.model_ref, image=svc.image_info(prepared.image), findings=table,
            positive_findings=[r.finding for r in table if r.positive], explanations=explanations,
            preview_png_base64=preview, warnings=warnings,
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
        "properties": {"files": {"type": "array", "items": _IMAGE_FIELD}}}}}}}

    @app.post("/v1/predict", response_model=schemas.PredictResponse, dependencies=v1, responses=_ERRORS,
              openapi_extra=upload_body, tags=["predict"], summary="Findings (and heatmaps) for one image")
    async def predict(request: Request, opts: Options = Depends(options), rt: Runtime = Depends(runtime)):
        with rt.predictor.incoming() as arrival:
            files = await read_files(request, max_bytes=settings.max_upload_bytes, field_names=("file",))
            if len(files) != 1:
                raise HTTPException(400, f"send exactly one file in field 'file' (got {len(files)}); "
                                         f"use /v1/predict/batch for several")
            try:
                return await predict_one(rt, files[0], opts, arrival)
            except InputError as e:
                raise HTTPException(e.status, e.detail) from None

    @app.post("/v1/predict/batch", response_model=schemas.BatchResponse, dependencies=v1, responses=_ERRORS,
              openapi_extra=batch_body, tags=["predict"],
              summary="Several images in one request; each gets a result or its own error")
    async def predict_batch(request: Request, opts: Options = Depends(options), rt: Runtime = Depends(runtime)):
        files = await read_files(request, max_bytes=settings.max_upload_bytes, field_names=("files", "file"))
        if len(files) > settings.max_batch_files:
            raise HTTPException(413, f"{len(files)} files in one request; the limit is {settings.max_batch_files}:"
                                     f" split the batch")

        async def one(i: int, f: UploadedFile, arrival: Arrival) -> schemas.BatchItem:
            try:
                return schemas.BatchItem(index=i, filename=f.filename, result=await predict_one(rt, f, opts, arrival))
            except (InputError, HTTPException) as e:
                status = e.status if isinstance(e, InputError) else e.status_code
                return schemas.BatchItem(index=i, filename=f.filename,
                                         error=schemas.ErrorInfo(status=status, detail=str(e.detail)))
            finally:
                arrival.close()  # a rejected image must not keep a forming batch waiting

        with ExitStack() as stack:  # announce every image first, so they can share a micro-batch
            arrivals = [stack.enter_context(rt.predictor.incoming()) for _ in files]
            items = await asyncio.gather(*(one(i, f, a) for i, (f, a) in enumerate(zip(files, arrivals))))
        ok = sum(it.result is not None for it in items)
        return schemas.BatchResponse(items=list(items), succeeded=ok, failed=len(items) - ok)

    @app.post("/v1/explain/{finding}", dependencies=v1, tags=["explain"], openapi_extra=upload_body,
              response_class=Response, summary="Full-size heatmap overlay (PNG) of one finding for one image",
              responses={**_ERRORS, 200: {"content": {"image/png": {}}, "description": "Overlay at the original "
                         "image size. Headers: X-Finding, X-Probability, X-Peak-X, X-Peak-Y (original pixels)"}})
    async def explain(request: Request, finding: str = Path(description="Finding name (case-insensitive)"),
                      method: str = Query(FAST, description=f"Heatmap method: {', '.join(CAM_METHODS)}"),
                      max_side: int | None = Query(None, ge=16, description="Scale down to this longest side"),
                      rt: Runtime = Depends(runtime)):
        svc = rt.service
        try:
            targets, method = svc.parse_targets(finding), svc.parse_method(method)
            if len(targets) != 1:
                raise InputError(422, "name exactly one finding in the path")
            with rt.predictor.incoming() as arrival:
                files = await read_files(request, max_bytes=settings.max_upload_bytes, field_names=("file",))
                if len(files) != 1:
                    raise InputError(400, f"send exactly one file in field 'file' (got {len(files)})")
                check_content_type(files[0].content_type)
                prepared = await run_in_threadpool(svc.prepare, files[0].data, files[0].filename)
                out = await asyncio.wrap_future(rt.predictor.submit(prepared.x, want_cams=method == FAST,
                                                                    arrival=arrival))
            maps = await heatmaps(rt, prepared, out, targets, method)
        except InputError as e:
            raise HTTPException(e.status, e.detail) from None
        from common.explain import render_overlay

        ov = await run_in_threadpool(render_overlay, prepared.image.pixels, maps[0], max_side=max_side)
        c = targets[0]
        return Response(ov.png, media_type="image/png", headers={
            "X-Finding": svc.findings[c], "X-Probability": f"{out.probabilities[c]:.6f}",
            "X-Peak-X": f"{ov.peak_x:.1f}", "X-Peak-Y": f"{ov.peak_y:.1f}", "X-Model-Id": svc.model_ref.model_id,
            "Cache-Control": "no-store"})

    @app.get("/v1/model", response_model=schemas.ModelCard, dependencies=v1, tags=["model"],
             responses={401: _ERRORS[401], 503: _ERRORS[503]}, summary="The served bundle's model card")
    async def model_card(rt: Runtime = Depends(runtime)):
        return rt.service.model_card()

    @app.get("/health", response_model=schemas.Health, tags=["operations"], summary="Liveness")
    async def health():
        return schemas.Health(status="ok")

    @app.get("/ready", response_model=schemas.Ready, tags=["operations"],
             responses={503: {"model": schemas.Ready, "description": "Model not loaded (yet)"}},
             summary="Readiness: 200 once the model is loaded and its worker runs")
    async def ready():
        rt = state.runtime
        if rt is not None and rt.predictor.alive:
            return schemas.Ready(ready=True, model_id=rt.service.model_ref.model_id)
        detail = state.error or ("inference worker stopped" if rt is not None else "loading the model bundle")
        return JSONResponse(schemas.Ready(ready=False, detail=detail).model_dump(), status_code=503)

    static = resources.files("inference_api") / "static"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse((static / "index.html").read_text(), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app
