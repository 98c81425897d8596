"""POST /v1/predict and /v1/predict/batch: findings (and heatmaps) for uploaded images."""
from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Query, Request

from common.explain import FAST
from common.imageio import ImageHeader
from inference_api import schemas
from inference_api.deps import app_state, runtime
from inference_api.errors import InputError
from inference_api.limits import Overloaded, OverBudget
from inference_api.openapi import BATCH_BODY, ERRORS, UPLOAD_BODY
from inference_api.predictor import Arrival
from inference_api.state import AppState, Runtime
from inference_api.uploads import UploadedFile, read_files

router = APIRouter(tags=["predict"])


@dataclass
class Options:
    explain: bool
    targets: list[int] | None
    method: str
    preview: bool


def options(explain: bool = Query(False, description="Add heatmap overlays (positive findings by default)"),
            findings: str | None = Query(None, description="Findings to explain: comma-separated names as the "
                                         "model card spells them, or 'all'; implies explain=true"),
            method: schemas.CamMethod = Query(FAST, description="Heatmap method"),
            preview: bool = Query(False, description="Also return the decoded image as a PNG"),
            rt: Runtime = Depends(runtime)) -> Options:
    return Options(explain or findings is not None, rt.service.parse_targets(findings), method, preview)


async def predict_one(state: AppState, rt: Runtime, upload: UploadedFile, header: ImageHeader, opts: Options,
                      arrival: Arrival | None = None) -> schemas.PredictResponse:
    """Decode (within the decode budget), gate, predict (micro-batched) and explain one upload."""
    settings, svc = state.settings, rt.service
    keep = settings.overlay_max_side if (opts.explain or opts.preview) else 0
    async with state.decodes.reserve(header.decode_bytes(settings.max_side)) as held:
        prepared = await rt.decode(upload, header, held, keep)
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
            maps = await rt.heatmaps(prepared, out, targets, opts.method)
            explanations = await rt.decoder.run(svc.explanations, prepared.image, maps, targets, opts.method)
        preview = await rt.decoder.run(svc.preview, prepared.image) if opts.preview else None
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


@router.post("/v1/predict", response_model=schemas.PredictResponse, responses=ERRORS, openapi_extra=UPLOAD_BODY,
             summary="Findings (and heatmaps) for one image")
async def predict(request: Request, opts: Options = Depends(options), rt: Runtime = Depends(runtime),
                  state: AppState = Depends(app_state)):
    settings = state.settings
    async with state.uploads.reserve() as body:
        with rt.predictor.incoming() as arrival:
            files = await read_files(request, max_bytes=settings.max_upload_bytes, field_names=("file",),
                                     reservation=body)
            if len(files) != 1:
                raise InputError(400, f"send exactly one file in field 'file' (got {len(files)}); "
                                      f"use /v1/predict/batch for several")
            return await predict_one(state, rt, files[0], rt.probe(files[0]), opts, arrival)


@router.post("/v1/predict/batch", response_model=schemas.BatchResponse, responses=ERRORS, openapi_extra=BATCH_BODY,
             summary="Several images in one request; each gets a result or its own error")
async def predict_batch(request: Request, opts: Options = Depends(options), rt: Runtime = Depends(runtime),
                        state: AppState = Depends(app_state)):
    settings = state.settings
    async with state.uploads.reserve() as body:
        files = await read_files(request, max_bytes=settings.max_upload_bytes, field_names=("files", "file"),
                                 reservation=body)
        if len(files) > settings.max_batch_files:
            raise InputError(413, f"{len(files)} files in one request; the limit is {settings.max_batch_files}:"
                                  f" split the batch", "too_many_files")
        headers: list[ImageHeader | InputError] = []
        for f in files:  # every header first: the request's pixel budget is checked before any decoding
            try:
                headers.append(rt.probe(f))
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
                                         result=await predict_one(state, rt, f, h, opts, arrival))
            except InputError as e:
                err = schemas.ErrorInfo(status=e.status, code=e.code, detail=e.detail)
            except Overloaded as e:
                err = schemas.ErrorInfo(status=503, code="overloaded", detail=str(e))
            except OverBudget as e:
                err = schemas.ErrorInfo(status=413, code="too_many_pixels", detail=str(e))
            finally:
                arrival.close()  # a rejected image must not keep a forming batch waiting
            state.refusals.add(err.code, err.status)   # a refused item counts as its own refusal (GET /metrics)
            return schemas.BatchItem(index=i, filename=f.filename, error=err)

        with ExitStack() as stack:  # announce every image first, so they can share a micro-batch
            arrivals = [stack.enter_context(rt.predictor.incoming()) for _ in files]
            items = await asyncio.gather(*(one(i, f, h, a) for i, (f, h, a)
                                           in enumerate(zip(files, headers, arrivals))))
    ok = sum(it.result is not None for it in items)
    return schemas.BatchResponse(items=list(items), succeeded=ok, failed=len(items) - ok)
