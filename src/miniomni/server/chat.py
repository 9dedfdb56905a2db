"""``POST /chat``: a spoken question in, the spoken answer streamed back as raw PCM (or WAV).

The reference server's protocol: ``{"audio": base64 WAV (or FLAC/OGG/MP3), "stream_stride": 4,
"max_tokens": 2048}`` in; 16-bit little-endian mono PCM at 24 kHz out, chunked as it is generated;
``?format=wav`` puts a streaming WAV header first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import struct

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..audio import OUTPUT_SAMPLE_RATE, WHISPER_SAMPLE_RATE, AudioTooLong, float_to_pcm16, load_audio
from ..errors import AudioError
from ..generate import SamplingOptions
from ..streaming import AudioChunk, Done
from .bodies import BodyTooLarge, ClientDisconnect, read_body
from .engine import AnswerRequest, Engine, EngineBusy, ErrorEvent
from .engine.jobs import AnswerJob
from .realtime.protocol import ClientError, parse_json
from .replies import error_response
from .settings import ServerSettings

log = logging.getLogger(__name__)

# Raw little-endian 16-bit samples; audio/L16 would promise big-endian (RFC 2586), so not that.
PCM_MEDIA_TYPE = f"audio/pcm;rate={OUTPUT_SAMPLE_RATE};encoding=s16le;channels=1"


class BadRequest(Exception):
    """A request refused with ``status`` and a message that says what to send instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def wav_stream_header(sample_rate: int = OUTPUT_SAMPLE_RATE) -> bytes:
    """A WAV header for a stream of unknown length (sizes set to the maximum, as streaming players expect)."""
    byte_rate = sample_rate * 2
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
            byte_rate, 2, 16) + b"data" + struct.pack("<I", 0xFFFFFFFF))


def _options(payload: object, settings: ServerSettings) -> tuple[str, int, int]:
    """(base64 audio, stream stride, max tokens) from the parsed body, or :class:`BadRequest`."""
    if not isinstance(payload, dict) or not isinstance(payload.get("audio"), str):
        raise BadRequest(400, "the JSON body needs \"audio\": a base64-encoded audio file")
    stride = payload.get("stream_stride", 4)
    max_tokens = payload.get("max_tokens", settings.max_tokens_limit)
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= 64:
        raise BadRequest(400, "stream_stride must be an integer from 1 to 64 (frames of 85 ms per chunk)")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or \
            not 1 <= max_tokens <= settings.max_tokens_limit:
        raise BadRequest(400, f"max_tokens must be an integer from 1 to {settings.max_tokens_limit}")
    return payload["audio"], stride, max_tokens


async def _question(request: Request, settings: ServerSettings) -> AnswerRequest:
    """The request body as the engine's question, or :class:`BadRequest` saying what was wrong."""
    try:
        body = await read_body(request, settings.max_request_bytes)
    except BodyTooLarge as exc:
        raise BadRequest(413, str(exc)) from exc
    try:
        payload = parse_json(body, "the body")
    except ClientError as exc:
        raise BadRequest(400, f"{exc.message}: {{\"audio\": \"<base64 WAV>\"}}") from exc
    encoded, stride, max_tokens = _options(payload, settings)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(400, "\"audio\" is not valid base64") from exc
    try:
        # The header's length is checked before any decoding or resampling.
        audio = await run_in_threadpool(load_audio, data, None, settings.max_audio_seconds)
    except AudioTooLong as exc:
        raise BadRequest(413, str(exc)) from exc
    except AudioError as exc:
        raise BadRequest(400, str(exc)) from exc
    return AnswerRequest(task="A1A2-batch", audio=audio, sample_rate=WHISPER_SAMPLE_RATE,
                         max_new_tokens=max_tokens, options=SamplingOptions(), max_chunk=stride)


async def _speech(job: AnswerJob, events: asyncio.Queue, wav: bool):
    """The answer's audio as bytes, until it is done; a client that goes away stops it within one step."""
    try:
        if wav:
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
        job.cancel()


def add_chat_route(app: FastAPI, engine: Engine, settings: ServerSettings) -> None:
    """Register ``POST /chat`` on ``app``."""

    @app.post("/chat", responses={200: {"content": {PCM_MEDIA_TYPE: {}, "audio/wav": {}}}})
    async def chat(request: Request, format: str = "pcm") -> Response:  # noqa: A002 - the query parameter's name
        """Answer a spoken question with streamed speech (see the module's description)."""
        if format not in ("pcm", "wav"):
            return error_response(400, f"format must be pcm or wav, got {format!r}")
        try:
            answer = await _question(request, settings)
        except BadRequest as exc:
            return error_response(exc.status, exc.message)
        except ClientDisconnect:
            log.info("a /chat client went away during its upload")
            return Response(status_code=400)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            job = engine.open(answer, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except EngineBusy as exc:
            return error_response(503, str(exc), "server_busy")
        media_type = "audio/wav" if format == "wav" else PCM_MEDIA_TYPE
        return StreamingResponse(_speech(job, events, format == "wav"), media_type=media_type,
                                 headers={"X-Sample-Rate": str(OUTPUT_SAMPLE_RATE), "X-Sample-Format": "s16le",
                                          "X-Channels": "1"})
