"""HTTP serving: ``POST /chat`` (the reference server's protocol), health and Prometheus metrics.

The wire protocols are written down in ``docs/server.md``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import struct
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..audio import OUTPUT_SAMPLE_RATE, WHISPER_SAMPLE_RATE, float_to_pcm16, load_audio
from ..errors import AudioError, MiniOmniError
from ..generate import SamplingOptions
from ..streaming import AudioChunk, Done
from .access import bearer_ok, is_public
from .connection import add_realtime_routes
from .engine import AnswerRequest, Engine, EngineBusy, ErrorEvent
from .settings import ServerSettings
from .web import add_web_routes

log = logging.getLogger(__name__)

# Raw little-endian 16-bit samples; audio/L16 would promise big-endian (RFC 2586), so not that.
PCM_MEDIA_TYPE = f"audio/pcm;rate={OUTPUT_SAMPLE_RATE};encoding=s16le;channels=1"


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def wav_stream_header(sample_rate: int = OUTPUT_SAMPLE_RATE) -> bytes:
    """A WAV header for a stream of unknown length (sizes set to the maximum, as streaming players expect)."""
    byte_rate = sample_rate * 2
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
            byte_rate, 2, 16) + b"data" + struct.pack("<I", 0xFFFFFFFF))


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI application around a running :class:`Engine`."""
    settings = settings or ServerSettings()
    app = FastAPI(
        title="miniomni",
        description="Mini-Omni speech-to-speech serving. POST /chat streams the spoken answer as raw PCM.",
    )
    app.state.engine = engine
    app.state.settings = settings
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    # This middleware sees HTTP only: /v1/realtime checks the key (header or subprotocol) itself.
    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if settings.api_key and request.method != "OPTIONS" and not is_public(request.url.path):
            if not bearer_ok(request.headers, settings.api_key):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                      "authentication_error")
        return await call_next(request)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "active_sessions": engine.active_sessions, "max_sessions": engine.max_sessions}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return render_metrics(engine)

    @app.post("/chat", responses={200: {"content": {PCM_MEDIA_TYPE: {}, "audio/wav": {}}}})
    async def chat(request: Request, format: str = "pcm") -> Response:  # noqa: A002 - the query parameter's name
        """Answer a spoken question with streamed speech.

        Body: ``{"audio": base64 WAV (or FLAC/OGG/MP3), "stream_stride": 4, "max_tokens": 2048}``.
        Answer: 16-bit little-endian mono PCM at 24 kHz, chunked as it is generated;
        ``?format=wav`` puts a streaming WAV header first.
        """
        if format not in ("pcm", "wav"):
            return error_response(400, f"format must be pcm or wav, got {format!r}")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            return error_response(413, f"request body of {length} bytes exceeds {settings.max_request_bytes}")
        body = await request.body()
        if len(body) > settings.max_request_bytes:
            return error_response(413, f"request body exceeds {settings.max_request_bytes} bytes")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "the body must be JSON: {\"audio\": \"<base64 WAV>\"}")
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
            audio = await run_in_threadpool(load_audio, data)
        except AudioError as exc:
            return error_response(400, str(exc))
        seconds = len(audio) / WHISPER_SAMPLE_RATE
        if seconds > settings.max_audio_seconds:
            return error_response(413, f"the question is {seconds:.1f} s long; at most "
                                       f"{settings.max_audio_seconds:g} s is accepted")
        answer = AnswerRequest(task="A1A2-batch", audio=audio, sample_rate=WHISPER_SAMPLE_RATE,
                               max_new_tokens=max_tokens, options=SamplingOptions(), max_chunk=stride)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            session = engine.open(answer, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
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
                        log.warning("chat session %d failed: %s", session.id, event.message)
                        return
            finally:
                session.cancel()  # a client that went away stops its answer within one step

        media_type = "audio/wav" if format == "wav" else PCM_MEDIA_TYPE
        return StreamingResponse(body_stream(), media_type=media_type,
                                 headers={"X-Sample-Rate": str(OUTPUT_SAMPLE_RATE), "X-Sample-Format": "s16le",
                                          "X-Channels": "1"})

    add_realtime_routes(app, engine, settings)  # WS /v1/realtime, with its own API-key and origin check
    add_web_routes(app)  # the page at /

    @app.exception_handler(MiniOmniError)
    async def miniomni_error(request: Request, exc: MiniOmniError) -> JSONResponse:
        return error_response(400, str(exc))

    return app


def render_metrics(engine: Engine) -> str:
    """Prometheus text exposition of the engine's counters."""
    stats = engine.stats
    lines = []

    def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
        if not any(line.startswith(f"# HELP {name} ") for line in lines):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{labels} {value:g}")

    metric("miniomni_active_sessions", "gauge", "Answers being prepared, decoded or finished off.",
           engine.active_sessions)
    metric("miniomni_queued_sessions", "gauge", "Answers waiting for their prompt to be prepared.",
           engine.queued_sessions)
    metric("miniomni_max_sessions", "gauge", "Concurrent answers allowed.", engine.max_sessions)
    metric("miniomni_decode_steps_total", "counter", "Batched decode steps run.", stats.steps)
    metric("miniomni_decode_step_seconds_total", "counter", "Time spent in decode steps.", stats.step_seconds_total)
    metric("miniomni_decode_step_last_seconds", "gauge", "Duration of the last decode step.", stats.last_step_ms / 1000)
    metric("miniomni_first_audio_seconds_sum", "counter", "Sum of times to first audio.",
           stats.first_audio_ms_total / 1000)
    metric("miniomni_first_audio_seconds_count", "counter", "Answers that produced audio.", stats.first_audio_count)
    for result, value in (("finished", stats.answers_finished), ("failed", stats.answers_failed),
                          ("rejected_busy", stats.rejected_busy)):
        metric("miniomni_answers_total", "counter", "Answers by outcome.", value, f'{{result="{result}"}}')
    metric("miniomni_preparation_seconds_total", "counter", "Time spent preparing questions (Whisper, prefill).",
           stats.job_seconds_total)
    for result, value in (("started", stats.speculative_started), ("used", stats.speculative_used),
                          ("dropped", stats.speculative_dropped)):
        metric("miniomni_speculative_answers_total", "counter",
               "Answers prepared while the VAD made sure a turn had ended, by outcome.", value,
               f'{{result="{result}"}}')
    return "\n".join(lines) + "\n"
