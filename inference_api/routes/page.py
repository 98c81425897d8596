"""GET /: the web page (its scripts and styles are served from STATIC under /static, mounted by the app)."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

STATIC = resources.files("inference_api") / "static"
router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def index():
    return HTMLResponse((STATIC / "index.html").read_text(), headers={"Cache-Control": "no-cache"})
