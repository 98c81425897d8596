"""POST /v1/explain/{finding}: one finding's full-size heatmap overlay as a PNG."""
from __future__ import annotations

import asyncio
from functools import partial

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from common.explain import FAST, render_overlay
from inference_api import schemas
from inference_api.deps import app_state, runtime
from inference_api.errors import InputError
from inference_api.openapi import ERRORS, UPLOAD_BODY
from inference_api.state import AppState, Runtime
from inference_api.uploads import read_files

router = APIRouter(tags=["explain"])


@router.post("/v1/explain/{finding}", openapi_extra=UPLOAD_BODY, response_class=Response,
             summary="Full-size heatmap overlay (PNG) of one finding for one image",
             responses={**ERRORS, 200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                        "description": "Overlay at the original image size (at most the decoded size, "
                        "FEDXRAY_MAX_SIDE). Headers: X-Finding, X-Probability, X-Peak-X, X-Peak-Y (original "
                        "pixels)"}})
async def explain(request: Request, finding: str = Path(description="Finding name, exactly as the model card "
                                                                    "lists it"),
                  method: schemas.CamMethod = Query(FAST, description="Heatmap method"),
                  max_side: int | None = Query(None, ge=16, le=100_000,
                                               description="Scale down to this longest side"),
                  rt: Runtime = Depends(runtime), state: AppState = Depends(app_state)):
    settings, svc = state.settings, rt.service
    if finding not in svc.findings:
        raise InputError(422, f"unknown finding {finding!r}: this model knows {svc.findings}", "unknown_finding")
    c = svc.findings.index(finding)
    async with state.uploads.reserve() as body:
        with rt.predictor.incoming() as arrival:
            files = await read_files(request, max_bytes=settings.max_upload_bytes, field_names=("file",),
                                     reservation=body)
            if len(files) != 1:
                raise InputError(400, f"send exactly one file in field 'file' (got {len(files)})")
            header = rt.probe(files[0])
            async with state.decodes.reserve(header.decode_bytes(settings.max_side)) as held:
                prepared = await rt.decode(files[0], header, held, max_side)
                out = await asyncio.wrap_future(rt.predictor.submit(prepared.x, want_cams=method == FAST,
                                                                    arrival=arrival))
                svc.check_features(out.features)
                maps = await rt.heatmaps(prepared, out, [c], method)
                img = prepared.image
                ov = await rt.decoder.run(partial(render_overlay, max_side=max_side,
                                                  original_size=(img.width, img.height)), img.pixels, maps[0])
    return Response(ov.png, media_type="image/png", headers={
        "X-Finding": svc.findings[c], "X-Probability": f"{out.probabilities[c]:.6f}",
        "X-Peak-X": f"{ov.peak_x:.1f}", "X-Peak-Y": f"{ov.peak_y:.1f}", "X-Model-Id": svc.model_ref.model_id})
