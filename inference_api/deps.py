"""The dependencies every router shares: the app's state, the loaded model (503 until it is), the API-key check."""
from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from inference_api.errors import InputError
from inference_api.settings import Settings
from inference_api.state import AppState, Runtime


def app_state(request: Request) -> AppState:
    return request.app.state.fedxray


def runtime(state: AppState = Depends(app_state)) -> Runtime:
    """The loaded model, or 503 + Retry-After while it loads (or failed to)."""
    if state.runtime is None:
        raise InputError(503, f"model not loaded: {state.error or 'still loading, retry shortly'}", "not_ready",
                         {"Retry-After": str(state.settings.retry_after_s)})
    return state.runtime


def api_key_dependencies(settings: Settings) -> list:
    """What the /v1 routers are included with: the key check when the server sets a key, else nothing (the
    schema then says what the server requires)."""
    if not settings.api_key:
        return []
    key_header = APIKeyHeader(name=settings.api_key_header, auto_error=False,
                              description="Required when the server sets FEDXRAY_API_KEY")

    def require_key(key: str | None = Security(key_header)) -> None:
        expected = settings.api_key.get_secret_value() if settings.api_key else None
        if expected and not (key and secrets.compare_digest(key.encode(), expected.encode())):
            raise HTTPException(401, f"missing or wrong API key: send it in the {settings.api_key_header} header",
                                headers={"WWW-Authenticate": "ApiKey"})

    return [Depends(require_key)]
