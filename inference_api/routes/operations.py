"""GET /health (liveness) and /ready (the model is loaded and its worker runs): for probes, never behind the key."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from inference_api import schemas
from inference_api.deps import app_state
from inference_api.state import AppState

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=schemas.Health, summary="Liveness")
async def health():
    return schemas.Health(status="ok")


@router.get("/ready", response_model=schemas.Ready,
            responses={503: {"model": schemas.Ready, "description": "Model not loaded (yet)",
                             "headers": {"Retry-After": {"description": "Seconds to wait",
                                                         "schema": {"type": "integer"}}}}},
            summary="Readiness: 200 once the model is loaded and its worker runs")
async def ready(state: AppState = Depends(app_state)):
    rt = state.runtime
    if rt is not None and rt.predictor.alive:
        return schemas.Ready(ready=True, model_id=rt.service.model_ref.model_id, forward=rt.predictor.forward.name)
    detail = state.error or ("inference worker stopped" if rt is not None else "loading the model bundle")
    return JSONResponse(schemas.Ready(ready=False, detail=detail).model_dump(), status_code=503,
                        headers={"Retry-After": str(state.settings.retry_after_s)})
