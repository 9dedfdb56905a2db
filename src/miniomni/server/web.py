"""The browser page at ``/``: push-to-talk and hands-free voice chat over ``/v1/realtime``."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# The page and its scripts hold no data, and a browser cannot send a bearer header when it
# loads a page: they stay public; the page sends the API key the user types with its WebSocket.
PUBLIC_PATHS = ("/", "/static/")


def is_public(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


def add_web_routes(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")
