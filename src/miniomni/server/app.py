"""HTTP serving: ``POST /chat`` (the reference server's protocol), health and Prometheus metrics.

The wire protocols are written down in ``docs/server.md``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..audio import OUTPUT_SAMPLE_RATE, WHISPER_SAMPLE_RATE, AudioTooLong, float_to_pcm16, load_audio
from ..errors import AudioError, MiniOmniError
from ..generate import SamplingOptions
from ..streaming import AudioChunk, Done
from .access import bearer_ok, client_secret_route, is_public
from .bodies import BodyTooLarge, ClientDisconnect, read_body
from .connection import add_realtime_routes, close_all
from .engine import AnswerRequest, Engine, EngineBusy, ErrorEvent
from .ephemeral import add_client_secret_routes, presented_client_secret
from .heap import freeze_loaded, trim_heap
from .metrics import CONTENT_TYPE as METRICS_MEDIA_TYPE
from .metrics import ServerMetrics
from .protocol import ClientError, parse_json
from .replies import error_response
from .settings import ServerSettings
from .web import add_web_routes

log = logging.getLogger(__name__)

# Raw little-endian 16-bit samples; audio/L16 would promise big-endian (RFC 2586), so not that.
PCM_MEDIA_TYPE = f"audio/pcm;rate={OUTPUT_SAMPLE_RATE};encoding=s16le;channels=1"


def wav_stream_header(sample_rate: int = OUTPUT_SAMPLE_RATE) -> bytes:
    """A WAV header for a stream of unknown length (sizes set to the maximum, as streaming players expect)."""
    byte_rate = sample_rate * 2
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
            byte_rate, 2, 16) + b"data" + struct.pack("<I", 0xFFFFFFFF))


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
    """The WebRTC transport (:mod:`.webrtc`) needs aiortc, an optional dependency: without it, no such route."""
    try:
        from .webrtc import add_webrtc_routes
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
        return {"status": "ok", "active_sessions": engine.active_sessions, "max_sessions": engine.max_sessions}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(app.state.metrics.render(), media_type=METRICS_MEDIA_TYPE)

    @app.post("/chat", responses={200: {"content": {PCM_MEDIA_TYPE: {}, "audio/wav": {}}}})
    async def chat(request: Request, format: str = "pcm") -> Response:  # noqa: A002 - the query parameter's name
        """Answer a spoken question with streamed speech.

        Body: ``{"audio": base64 WAV (or FLAC/OGG/MP3), "stream_stride": 4, "max_tokens": 2048}``.
        Answer: 16-bit little-endian mono PCM at 24 kHz, chunked as it is generated;
        ``?format=wav`` puts a streaming WAV header first.
        """
        if format not in ("pcm", "wav"):
            return error_response(400, f"format must be pcm or wav, got {format!r}")
        try:
            body = await read_body(request, settings.max_request_bytes)
        except BodyTooLarge as exc:
            return error_response(413, str(exc))
        except ClientDisconnect:
            log.info("a /chat client went away during its upload")
            return Response(status_code=400)
        try:
            payload = parse_json(body, "the body")
        except ClientError as exc:
            return error_response(400, f"{exc.message}: {{\"audio\": \"<base64 WAV>\"}}")
        if not isinstance(payload, dict) or not isinstance(payload.get("audio"), str):
            return error_response(400, "the JSON body needs \"audio\": a base64-encoded audio file")
        stride = payload.get("stream_stride", 4)
        max_tokens = payload.get("max_tokens", settings.max_tokens_limit)
        if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= 64:
            return error_response(400, "stream_stride must be an integer from 1 to 64 (frames of 85 ms per chunk)")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or \
                not 1 <= max_tokens <= settings.max_tokens_limit:
            return error_response(400, f"max_tokens must be an integer from 1 to {settings.max_tokens_limit}")
        try:
            data = base64.b64decode(payload["audio"], validate=True)
        except (binascii.Error, ValueError):
            return error_response(400, "\"audio\" is not valid base64")
        try:
            # The header's length is checked before any decoding or resampling.
            audio = await run_in_threadpool(load_audio, data, None, settings.max_audio_seconds)
        except AudioTooLong as exc:
            return error_response(413, str(exc))
        except AudioError as exc:
            return error_response(400, str(exc))
        answer = AnswerRequest(task="A1A2-batch", audio=audio, sample_rate=WHISPER_SAMPLE_RATE,
                               max_new_tokens=max_tokens, options=SamplingOptions(), max_chunk=stride)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            job = engine.open(answer, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except EngineBusy as exc:
            return error_response(503, str(exc), "server_busy")

        async def body_stream():
            try:
                if format == "wav":
                    yield wav_stream_header()
                while True:
                    event = await events.get()
                    if isinstance(event, AudioChunk):
                        yield float_to_pcm16(event.audio)
                    elif isinstance(event, Done):
                        return
                    elif isinstance(event, ErrorEvent):
                        log.warning("chat answer %d failed: %s", job.id, event.message)
                        return
            finally:
                job.cancel()  # a client that went away stops its answer within one step

        media_type = "audio/wav" if format == "wav" else PCM_MEDIA_TYPE
        return StreamingResponse(body_stream(), media_type=media_type,
                                 headers={"X-Sample-Rate": str(OUTPUT_SAMPLE_RATE), "X-Sample-Format": "s16le",
                                          "X-Channels": "1"})

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
