"""GET /v1/model: the served bundle's public model card (what a reader needs to judge the model)."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from inference_api import schemas
from inference_api.deps import app_state, runtime
from inference_api.openapi import ERRORS
from inference_api.state import AppState, Runtime

router = APIRouter(tags=["model"])


@router.get("/v1/model", response_model=schemas.ModelCard, responses={401: ERRORS[401], 503: ERRORS[503]},
            summary="The served bundle's public model card")
async def model_card(rt: Runtime = Depends(runtime), state: AppState = Depends(app_state)):
    return rt.service.model_card(state.limits()).model_copy(update={"inference": rt.predictor.forward.describe()})
