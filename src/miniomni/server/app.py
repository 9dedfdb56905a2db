"""The HTTP application as wiring: access checks, health and Prometheus metrics, and the routes of
``/chat`` (:mod:`.chat`), the Realtime WebSocket (:mod:`.transports.websocket`), WebRTC calls
(:mod:`.transports.webrtc`), client secrets (:mod:`.realtime.ephemeral`) and the page (:mod:`.web`).

The wire protocols are written down in ``docs/server.md``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from ..errors import MiniOmniError
from .access import bearer_ok, client_secret_route, is_public
from .chat import add_chat_route
from .engine import Engine
from .heap import freeze_loaded, trim_heap
from .metrics import CONTENT_TYPE as METRICS_MEDIA_TYPE
from .metrics import ServerMetrics
from .realtime.ephemeral import add_client_secret_routes, presented_client_secret
from .replies import error_response
from .settings import ServerSettings
from .transports.websocket import add_realtime_routes, close_all
from .web import add_web_routes

log = logging.getLogger(__name__)


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """What uvicorn must enforce for these settings (the largest WebSocket message)."""
    return {"ws_max_size": settings.max_message_bytes}


class _OneLineClientErrors(logging.Filter):
    """uvicorn logs a text frame that is not UTF-8 with a traceback: a client's fault is one line here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UnicodeDecodeError):
            peer = _peer(record.exc_info[2])
            record.msg = (f"WebSocket client{peer} sent a text frame that is not UTF-8; its connection was closed "
                          "with 1007")
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


def _peer(traceback: TracebackType | None) -> str:
    """' host:port' of the connection whose protocol raised, when its frame shows it."""
    while traceback is not None:
        client = getattr(traceback.tb_frame.f_locals.get("self"), "client", None)
        if isinstance(client, tuple) and len(client) == 2:
            return f" {client[0]}:{client[1]}"
        traceback = traceback.tb_next
    return ""


def add_webrtc_routes_if_available(app: FastAPI, engine: Engine, settings: ServerSettings) -> None:
    """The WebRTC transport (:mod:`.transports.webrtc`) needs aiortc, an optional dependency: without it,
    no such route."""
    try:
        from .transports.webrtc import add_webrtc_routes
    except ImportError as exc:
        log.info("no WebRTC transport (POST /v1/realtime/calls): %s", exc)
        return
    add_webrtc_routes(app, engine, settings)


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI application around a running :class:`Engine`."""
    settings = settings or ServerSettings()
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _OneLineClientErrors) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_OneLineClientErrors())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()  # where a shutdown from another thread is carried out
        freeze_loaded()  # the model and modules: the collections after connections skip them
        yield

    app = FastAPI(
        title="miniomni",
        description="Mini-Omni speech-to-speech serving. POST /chat streams the spoken answer as raw PCM.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = ServerMetrics(engine)
    app.state.connections = set()  # every open transport (WebSocket, WebRTC): the limit and shutdown count them
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Location"])  # a WebRTC call's id

    # This middleware sees HTTP only: /v1/realtime checks the key (header or subprotocol) itself.
    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if settings.api_key and request.method != "OPTIONS" and not is_public(request.url.path):
            # An ek_ client secret may stand in on a WebRTC call's offer: that route checks it (ephemeral.py).
            if not bearer_ok(request.headers, settings.api_key) and not (
                    client_secret_route(request.method, request.url.path)
                    and presented_client_secret(request.headers) is not None):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                      "authentication_error")
        response = await call_next(request)
        if request.url.path == "/chat":
            trim_heap()  # a question's audio and features, freed (deferred: at most once per interval)
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "active_answers": engine.active_answers, "max_answers": engine.max_answers}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(app.state.metrics.render(), media_type=METRICS_MEDIA_TYPE)

    add_chat_route(app, engine, settings)  # POST /chat
    add_client_secret_routes(app, settings)  # POST /v1/realtime/client_secrets: ek_ keys for pages
    add_realtime_routes(app, engine, settings)  # WS /v1/realtime, with its own API-key and origin check
    add_webrtc_routes_if_available(app, engine, settings)  # POST /v1/realtime/calls, when aiortc is installed
    add_web_routes(app)  # the page at /

    @app.exception_handler(MiniOmniError)
    async def miniomni_error(request: Request, exc: MiniOmniError) -> JSONResponse:
        return error_response(400, str(exc))

    return app


def shut_down(app: FastAPI, message: str = "the server is shutting down; reconnect in a moment",
              ) -> concurrent.futures.Future | None:
    """From any thread (a signal handler too): end every answer with an error and close every connection (1001).

    Returns a future that is done once the connections are closed (None when the server never started).
    """
    loop = getattr(app.state, "loop", None)
    if loop is not None and not loop.is_closed():
        # The connections say why first; then the engine ends every other answer (/chat) with the message.
        return asyncio.run_coroutine_threadsafe(close_all(app, message), loop)
    app.state.engine.request_shutdown(message)
    return None
