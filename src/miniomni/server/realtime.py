"""``WS /v1/realtime``: the OpenAI Realtime protocol (GA event names) over the batched engine.

One connection is one Realtime session: an input audio buffer (16-bit PCM, 24 kHz, mono),
the last user message, at most one running response, and optional server VAD. A response
answers the last user message alone (Mini-Omni has no multi-turn context): spoken input is
answered with task ``A1A2-batch`` (speech and transcript) or ``A1T2`` (text only), typed
input with ``T1A2`` or ``T1T2``. The protocol, what is supported and what is not, is
written down in ``docs/server.md``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hmac
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..audio import float_to_pcm16
from ..generate import SamplingOptions
from ..streaming import AudioChunk, Done, TextDelta
from .engine import AnswerRequest, Engine, EngineBusy, ErrorEvent

log = logging.getLogger(__name__)

INPUT_RATE = 24000  # the only input and output format: 16-bit little-endian mono PCM at 24 kHz
PCM_FORMAT = {"type": "audio/pcm", "rate": INPUT_RATE}
# Queued outgoing events of one connection, in bytes of JSON. A client that stops reading
# lets it fill (the socket blocks first); past this its answer is stopped and it is closed.
MAX_PENDING_BYTES = 8 * 1024 * 1024
AUDIO_CHUNK_FRAMES = 4  # frames (85 ms each) per audio delta once streaming is under way
API_KEY_PROTOCOL = "openai-insecure-api-key."
UNSUPPORTED_EVENTS = {
    "conversation.item.delete": "deleting items",
    "conversation.item.retrieve": "retrieving items",
    "conversation.item.truncate": "truncating items",
    "output_audio_buffer.clear": "output_audio_buffer.clear (WebRTC/SIP only); send response.cancel",
    "transcription_session.update": "transcription sessions",
}


class ClientError(Exception):
    """A bad client event: becomes an ``error`` event; the connection stays open."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.kind = message, code, param, kind


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


# ---------------------------------------------------------------------- configuration


@dataclass
class TurnDetection:
    threshold: float = 0.5
    silence_duration_ms: int = 500
    prefix_padding_ms: int = 300
    create_response: bool = True
    interrupt_response: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"type": "server_vad", **self.__dict__}


@dataclass
class SessionConfig:
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    max_output_tokens: int | None = None  # None: "inf", i.e. the server's max_tokens_limit
    instructions: str = ""


MISSING = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_modalities(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not value or any(m not in ("audio", "text") for m in value):
        raise ClientError(f"{param} must be [\"audio\"] or [\"text\"], got {value!r}", param=param)
    # Audio always comes with its transcript; the beta default ["text", "audio"] means audio.
    return ["audio"] if "audio" in value else ["text"]


def check_format(value: Any, param: str) -> None:
    """Only 16-bit PCM at 24 kHz: GA ``{"type": "audio/pcm", "rate": 24000}`` or beta ``"pcm16"``."""
    if value == "pcm16":
        return
    if isinstance(value, dict) and value.get("type") == "audio/pcm" and value.get("rate", INPUT_RATE) in (None, INPUT_RATE):
        return
    raise ClientError(f"{param}: only 16-bit PCM at 24 kHz is supported ({{\"type\": \"audio/pcm\", \"rate\": 24000}}, "
                      f"or \"pcm16\" in the beta shape); got {value!r}", code="unsupported_audio_format", param=param)


def parse_turn_detection(value: Any, param: str) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClientError(f"{param} must be an object or null", param=param)
    kind = value.get("type", "server_vad")
    if kind != "server_vad":
        raise ClientError(f"{param}.type {kind!r} is not supported; use \"server_vad\" or null", param=f"{param}.type")
    td = TurnDetection()
    threshold = value.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ClientError(f"{param}.threshold must be a number from 0 to 1", param=f"{param}.threshold")
        td.threshold = float(threshold)
    for name, top in (("silence_duration_ms", 10_000), ("prefix_padding_ms", 10_000)):
        item = value.get(name)
        if item is not None:
            if not _is_int(item) or not 0 <= item <= top:
                raise ClientError(f"{param}.{name} must be an integer from 0 to {top}", param=f"{param}.{name}")
            setattr(td, name, item)
    for name in ("create_response", "interrupt_response"):
        item = value.get(name)
        if item is not None:
            if not isinstance(item, bool):
                raise ClientError(f"{param}.{name} must be true or false", param=f"{param}.{name}")
            setattr(td, name, item)
    return td


def parse_max_tokens(value: Any, param: str, limit: int) -> int | None:
    """``"inf"`` or null: the server's limit; integers above it are capped (clients send 4096)."""
    if value is None or value == "inf":
        return None
    if not _is_int(value) or value < 1:
        raise ClientError(f"{param} must be a positive integer or \"inf\"", param=param)
    return min(value, limit)


def decode_pcm16(data: Any, param: str) -> bytes:
    if not isinstance(data, str):
        raise ClientError(f"{param} must be a base64 string of 16-bit PCM at 24 kHz", code="invalid_audio", param=param)
    try:
        pcm = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"{param} is not valid base64", code="invalid_audio", param=param) from None
    if len(pcm) % 2:
        raise ClientError(f"{param} holds {len(pcm)} bytes: 16-bit PCM needs an even number",
                          code="invalid_audio", param=param)
    return pcm


def pcm16_to_float(pcm: bytes | bytearray) -> np.ndarray:
    return np.frombuffer(bytes(pcm), dtype="<i2").astype(np.float32) / 32768.0


# ---------------------------------------------------------------------- state


@dataclass
class UserInput:
    item_id: str
    text: str | None = None
    audio: np.ndarray | None = None  # float32, 24 kHz


@dataclass
class Response:
    id: str
    item_id: str
    audio_out: bool
    max_output_tokens: int
    metadata: Any = None
    session: Any = None  # the engine Session
    text: list[str] = field(default_factory=list)
    finished: bool = False


class RealtimeConnection:
    """One client's session; runs on the event loop, engine events arrive with ``call_soon_threadsafe``."""

    def __init__(self, websocket: WebSocket, engine: Engine, settings: Any, model: str) -> None:
        self.ws = websocket
        self.engine = engine
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.session_id = new_id("sess")
        self.conversation_id = new_id("conv")
        self.model = model
        self.config = SessionConfig()
        from .vad import vad_available

        self.vad_available = vad_available()
        if not self.vad_available:
            self.config.turn_detection = None
        self.buffer = bytearray()  # uncommitted input audio, pcm16 at 24 kHz
        self.buffer_start = 0  # stream position (24 kHz samples) of the buffer's first sample
        self.stream_samples = 0  # every sample appended on this connection
        self.max_buffer_bytes = int(settings.max_audio_seconds * INPUT_RATE) * 2
        self.vad = None
        self.vad_base = 0  # stream position where the VAD started listening
        self.speech_start: int | None = None  # stream position of the detected speech start
        self.speech_item_id: str | None = None
        self.last_user: UserInput | None = None
        self.last_item_id: str | None = None
        self.response: Response | None = None
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.pending_bytes = 0
        self.closing = False
        self.close_reason: tuple[int, str] | None = None
        self.main_task: asyncio.Task | None = None
        self.handlers = {
            "session.update": self.on_session_update,
            "input_audio_buffer.append": self.on_append,
            "input_audio_buffer.commit": self.on_commit,
            "input_audio_buffer.clear": self.on_clear,
            "conversation.item.create": self.on_item_create,
            "response.create": self.on_response_create,
            "response.cancel": self.on_response_cancel,
        }

    # ------------------------------------------------------------------ sending

    def send(self, event: dict[str, Any]) -> None:
        """Queue a server event (a fresh ``event_id`` first); never blocks."""
        if self.closing:
            return
        data = json.dumps({"event_id": new_id("event"), **event}, separators=(",", ":"))
        if self.pending_bytes + len(data) > MAX_PENDING_BYTES:
            self.abort(1008, "the client is not reading its events")
            return
        self.pending_bytes += len(data)
        self.outbox.put_nowait(data)

    def error(self, message: str, code: str | None = None, param: str | None = None,
              kind: str = "invalid_request_error", event_id: str | None = None) -> None:
        self.send({"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                              "event_id": event_id}})

    async def sender(self) -> None:
        try:
            while True:
                data = await self.outbox.get()
                self.pending_bytes -= len(data)
                await self.ws.send_text(data)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the client went away; the receive side ends the session
            self.abort(None, None)

    def abort(self, code: int | None, reason: str | None) -> None:
        """Stop this connection: its answer is cancelled at once and the receive loop ends."""
        if self.closing:
            return
        if code is not None:
            log.warning("realtime session %s: %s; closing it", self.session_id, reason)
            self.close_reason = (code, reason or "")
        self.closing = True
        self.cancel_engine_session()
        if self.main_task is not None and self.main_task is not asyncio.current_task():
            self.main_task.cancel()

    def cancel_engine_session(self) -> None:
        if self.response is not None and self.response.session is not None:
            self.response.session.cancel()

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        self.main_task = asyncio.current_task()
        sender = asyncio.create_task(self.sender())
        try:
            self.send({"type": "session.created", "session": self.session_object()})
            await self.receive_loop()
        except asyncio.CancelledError:
            if self.close_reason is None and not self.closing:
                raise
            uncancel = getattr(self.main_task, "uncancel", None)
            if uncancel is not None:
                uncancel()
        finally:
            self.closing = True
            self.cancel_engine_session()
            self.response = None
            sender.cancel()
            if self.close_reason is not None and self.ws.application_state == WebSocketState.CONNECTED:
                try:
                    await asyncio.wait_for(self.ws.close(*self.close_reason), timeout=2)
                except Exception:  # noqa: BLE001
                    pass

    async def receive_loop(self) -> None:
        while not self.closing:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self.error("binary frames are not part of the protocol: send JSON events as text frames "
                           "(audio goes base64-encoded in input_audio_buffer.append)", code="binary_frame")
                continue
            try:
                event = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                self.error("the message is not valid JSON: send one JSON event per text frame", code="invalid_json")
                continue
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                self.error("an event must be a JSON object with a string \"type\"", code="invalid_event")
                continue
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            kind = event["type"]
            handler = self.handlers.get(kind)
            try:
                if handler is None:
                    if kind in UNSUPPORTED_EVENTS:
                        raise ClientError(f"{kind} is not supported by this server ({UNSUPPORTED_EVENTS[kind]})",
                                          code="unsupported_event", param="type")
                    raise ClientError(f"unknown event type {kind!r}; supported: {', '.join(sorted(self.handlers))}",
                                      code="unknown_event_type", param="type")
                await handler(event)
            except ClientError as exc:
                self.error(exc.message, exc.code, exc.param, exc.kind, event_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the connection; say what failed
                log.exception("realtime session %s: %s failed", self.session_id, kind)
                self.error(f"internal error handling {kind}: {exc!r}", code="internal_error", kind="server_error",
                           event_id=event_id)

    # ------------------------------------------------------------------ session

    def session_object(self) -> dict[str, Any]:
        config = self.config
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.session_id,
            "model": self.model,
            "output_modalities": list(config.output_modalities),
            "instructions": config.instructions,
            "max_output_tokens": "inf" if config.max_output_tokens is None else config.max_output_tokens,
            "tools": [],
            "tool_choice": "auto",
            "audio": {
                "input": {
                    "format": dict(PCM_FORMAT),
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": None if config.turn_detection is None else config.turn_detection.as_dict(),
                },
                "output": {"format": dict(PCM_FORMAT)},
            },
        }

    async def on_session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise ClientError("session.update needs a \"session\" object", param="session")
        config = copy.deepcopy(self.config)
        kind = session.get("type")
        if kind not in (None, "realtime"):
            raise ClientError(f"session.type {kind!r} is not supported; only \"realtime\"", param="session.type")
        for key in ("output_modalities", "modalities"):  # GA, beta
            if key in session:
                config.output_modalities = parse_modalities(session[key], f"session.{key}")
        audio = session.get("audio")
        if audio is not None:
            if not isinstance(audio, dict):
                raise ClientError("session.audio must be an object", param="session.audio")
            for side in ("input", "output"):
                part = audio.get(side)
                if part is None:
                    continue
                if not isinstance(part, dict):
                    raise ClientError(f"session.audio.{side} must be an object", param=f"session.audio.{side}")
                if "format" in part:
                    check_format(part["format"], f"session.audio.{side}.format")
                if side == "input" and "turn_detection" in part:
                    config.turn_detection = parse_turn_detection(part["turn_detection"],
                                                                 "session.audio.input.turn_detection")
        for key in ("input_audio_format", "output_audio_format"):  # beta
            if key in session:
                check_format(session[key], f"session.{key}")
        if "turn_detection" in session:  # beta
            config.turn_detection = parse_turn_detection(session["turn_detection"], "session.turn_detection")
        for key in ("max_output_tokens", "max_response_output_tokens"):  # GA, beta
            if key in session:
                config.max_output_tokens = parse_max_tokens(session[key], f"session.{key}",
                                                             self.settings.max_tokens_limit)
        if "instructions" in session:
            if not isinstance(session["instructions"], str):
                raise ClientError("session.instructions must be a string", param="session.instructions")
            config.instructions = session["instructions"]
        if config.turn_detection is not None and not self.vad_available:
            raise ClientError("server VAD needs the silero-vad package on the server (pip install 'miniomni[server]'); "
                              "set turn_detection to null", code="vad_unavailable",
                              param="session.audio.input.turn_detection")
        self.config = config
        if config.turn_detection is None:
            self.vad = None
            self.speech_start = self.speech_item_id = None
        elif self.vad is not None:
            self.vad.configure(config.turn_detection.threshold, config.turn_detection.silence_duration_ms)
        self.send({"type": "session.updated", "session": self.session_object()})

    # ------------------------------------------------------------------ input audio

    async def on_append(self, event: dict[str, Any]) -> None:
        pcm = decode_pcm16(event.get("audio"), "audio")
        if not pcm:
            return
        vad_on = self.config.turn_detection is not None
        if not vad_on and len(self.buffer) + len(pcm) > self.max_buffer_bytes:
            raise ClientError(f"the input audio buffer holds at most {self.settings.max_audio_seconds:g} s; "
                              "commit or clear it first", code="input_audio_buffer_full", param="audio")
        self.buffer += pcm
        self.stream_samples += len(pcm) // 2
        if not vad_on:
            return
        if self.vad is None:
            from .vad import StreamingVAD

            td = self.config.turn_detection
            self.vad = await run_in_threadpool(StreamingVAD, td.threshold, td.silence_duration_ms, INPUT_RATE)
            self.vad_base = self.stream_samples - len(pcm) // 2
        vad = self.vad
        events = await run_in_threadpool(vad.process, pcm16_to_float(pcm))
        if vad is not self.vad or self.closing:  # turned off meanwhile
            return
        for vad_event in events:
            position = min(self.vad_base + vad_event.sample * INPUT_RATE // 16000, self.stream_samples)
            if vad_event.kind == "speech_started":
                self.on_speech_started(position)
            else:
                self.on_speech_stopped(position)
        if self.speech_start is not None and self.stream_samples - max(self.speech_start, self.buffer_start) \
                >= self.max_buffer_bytes // 2:
            self.vad.end_speech()  # a monologue past max_audio_seconds: take the turn now
            self.on_speech_stopped(self.stream_samples)
        if self.speech_start is None and len(self.buffer) > self.max_buffer_bytes:
            drop = len(self.buffer) - self.max_buffer_bytes  # no speech going on: keep a rolling window
            del self.buffer[:drop]
            self.buffer_start += drop // 2

    def on_speech_started(self, position: int) -> None:
        td = self.config.turn_detection
        start = max(0, position - td.prefix_padding_ms * INPUT_RATE // 1000)
        self.speech_start = start
        self.speech_item_id = new_id("item")
        self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": start * 1000 // INPUT_RATE,
                   "item_id": self.speech_item_id})
        if self.response is not None and td.interrupt_response:
            self.cancel_response("turn_detected")  # barge-in: stopped within one decode step

    def on_speech_stopped(self, position: int) -> None:
        if self.speech_start is None:
            return
        item_id = self.speech_item_id or new_id("item")
        start = max(self.speech_start, self.buffer_start)
        self.speech_start = self.speech_item_id = None
        self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": position * 1000 // INPUT_RATE,
                   "item_id": item_id})
        begin = (start - self.buffer_start) * 2
        end = max(begin, (position - self.buffer_start) * 2)
        pcm = bytes(self.buffer[begin:end])
        del self.buffer[:end]
        self.buffer_start = max(position, self.buffer_start)
        if not pcm:
            return
        self.add_user_audio(pcm, item_id)
        td = self.config.turn_detection
        if td is not None and td.create_response:
            try:
                self.start_response({})
            except ClientError as exc:  # busy, or a response still running (interrupt_response false)
                self.error(exc.message, exc.code, exc.param, exc.kind)

    async def on_commit(self, event: dict[str, Any]) -> None:
        if not self.buffer:
            raise ClientError("the input audio buffer is empty: append audio before committing",
                              code="input_audio_buffer_commit_empty")
        pcm = bytes(self.buffer)
        self.buffer_start += len(self.buffer) // 2
        self.buffer.clear()
        item_id = self.speech_item_id or new_id("item")
        self.speech_start = self.speech_item_id = None
        if self.vad is not None:
            self.vad.end_speech()
        self.add_user_audio(pcm, item_id)

    async def on_clear(self, event: dict[str, Any]) -> None:
        self.buffer_start += len(self.buffer) // 2
        self.buffer.clear()
        self.speech_start = self.speech_item_id = None
        if self.vad is not None:
            self.vad.end_speech()
        self.send({"type": "input_audio_buffer.cleared"})

    def add_user_audio(self, pcm: bytes, item_id: str) -> None:
        previous = self.last_item_id
        self.last_user = UserInput(item_id, audio=pcm16_to_float(pcm))
        self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous})
        self.announce_item({"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                            "status": "completed", "content": [{"type": "input_audio", "transcript": None}]})

    def announce_item(self, item: dict[str, Any]) -> None:
        previous, self.last_item_id = self.last_item_id, item["id"]
        self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})

    # ------------------------------------------------------------------ conversation items

    def parse_user_message(self, item: Any, param: str) -> tuple[UserInput | None, dict[str, Any]]:
        """A message item -> (the user input, or None for other roles; the item as echoed back)."""
        if not isinstance(item, dict):
            raise ClientError(f"{param} must be an object", param=param)
        kind = item.get("type", "message")
        if kind != "message":
            raise ClientError(f"{param}.type {kind!r} is not supported; only \"message\" items", param=f"{param}.type")
        role = item.get("role")
        if role not in ("user", "system", "assistant"):
            raise ClientError(f"{param}.role must be \"user\", \"system\" or \"assistant\"", param=f"{param}.role")
        content = item.get("content")
        if not isinstance(content, list) or not all(isinstance(c, dict) for c in content):
            raise ClientError(f"{param}.content must be a list of content objects", param=f"{param}.content")
        item_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else new_id("item")
        echoed = {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed",
                  "content": []}
        texts: list[str] = []
        audio = bytearray()
        for index, part in enumerate(content):
            part_type = part.get("type")
            where = f"{param}.content[{index}]"
            if part_type in ("input_text", "text", "output_text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise ClientError(f"{where}.text must be a string", param=f"{where}.text")
                texts.append(text)
                echoed["content"].append({"type": part_type, "text": text})
            elif part_type == "input_audio":
                audio += decode_pcm16(part.get("audio"), f"{where}.audio")
                echoed["content"].append({"type": "input_audio", "transcript": part.get("transcript")})
            elif role != "user" and part_type in ("audio", "output_audio"):
                echoed["content"].append({"type": part_type, "transcript": part.get("transcript")})
            else:
                raise ClientError(f"{where}.type {part_type!r} is not supported; use input_text or input_audio",
                                  param=f"{where}.type")
        if role != "user":
            return None, echoed
        if texts and audio:
            raise ClientError(f"{param}: this model takes text or audio in one message, not both", param=param)
        if audio:
            if len(audio) > self.max_buffer_bytes:
                raise ClientError(f"{param}: the audio is longer than {self.settings.max_audio_seconds:g} s",
                                  code="input_audio_too_long", param=param)
            return UserInput(item_id, audio=pcm16_to_float(audio)), echoed
        text = "\n".join(texts)
        if not text.strip():
            raise ClientError(f"{param}: the message has no text or audio to answer", param=f"{param}.content")
        return UserInput(item_id, text=text), echoed

    async def on_item_create(self, event: dict[str, Any]) -> None:
        user, echoed = self.parse_user_message(event.get("item"), "item")
        if user is not None:
            self.last_user = user
        self.announce_item(echoed)

    # ------------------------------------------------------------------ responses

    async def on_response_create(self, event: dict[str, Any]) -> None:
        params = event.get("response")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ClientError("response must be an object", param="response")
        self.start_response(params)

    def start_response(self, params: dict[str, Any]) -> None:
        if self.response is not None:
            raise ClientError(f"response {self.response.id} is still running; cancel it or wait for response.done",
                              code="conversation_already_has_active_response")
        modalities = self.config.output_modalities
        for key in ("output_modalities", "modalities"):
            if key in params:
                modalities = parse_modalities(params[key], f"response.{key}")
        max_tokens = self.config.max_output_tokens
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in params:
                max_tokens = parse_max_tokens(params[key], f"response.{key}", self.settings.max_tokens_limit)
        user = self.last_user
        if params.get("input") is not None:
            items = params["input"]
            if not isinstance(items, list):
                raise ClientError("response.input must be a list of items", param="response.input")
            user = None
            for index, item in enumerate(items):
                parsed, _ = self.parse_user_message(item, f"response.input[{index}]")
                user = parsed or user
        if user is None:
            raise ClientError("nothing to answer: commit input audio or create a user message first",
                              code="response_no_input")
        audio_out = modalities == ["audio"]
        if user.audio is not None:
            request = AnswerRequest(task="A1A2-batch" if audio_out else "A1T2", audio=user.audio,
                                    sample_rate=INPUT_RATE)
        else:
            request = AnswerRequest(task="T1A2" if audio_out else "T1T2", text=user.text)
        limit = self.settings.max_tokens_limit if max_tokens is None else max_tokens
        request.max_new_tokens = limit
        request.options = SamplingOptions()
        request.max_chunk = AUDIO_CHUNK_FRAMES
        response = Response(new_id("resp"), new_id("item"), audio_out, limit, params.get("metadata"))
        try:
            response.session = self.engine.open(request, lambda ev: self.from_engine(response, ev))
        except EngineBusy as exc:
            raise ClientError(str(exc), code="server_busy", kind="server_error") from None
        self.response = response
        self.send({"type": "response.created", "response": self.response_object(response, "in_progress", [])})
        item = self.assistant_item(response, "in_progress", None)
        self.send({"type": "response.output_item.added", "response_id": response.id, "output_index": 0, "item": item})
        previous, self.last_item_id = self.last_item_id, response.item_id
        self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        self.send({"type": "response.content_part.added", **self.where(response), "part": self.part(response, "")})

    def from_engine(self, response: Response, event: Any) -> None:
        """Called on an engine thread: hand the event to the loop."""
        try:
            self.loop.call_soon_threadsafe(self.on_engine_event, response, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            if response.session is not None:
                response.session.cancel()

    def on_engine_event(self, response: Response, event: Any) -> None:
        if response.finished or self.closing:
            return
        if isinstance(event, TextDelta):
            response.text.append(event.text)
            kind = "response.output_audio_transcript.delta" if response.audio_out else "response.output_text.delta"
            self.send({"type": kind, **self.where(response), "delta": event.text})
        elif isinstance(event, AudioChunk):
            audio = base64.b64encode(float_to_pcm16(event.audio)).decode("ascii")
            self.send({"type": "response.output_audio.delta", **self.where(response), "delta": audio})
        elif isinstance(event, Done):
            usage = {"total_tokens": event.prompt_length + len(event.text_tokens),
                     "input_tokens": event.prompt_length, "output_tokens": len(event.text_tokens)}
            self.finish(response, "completed", text=event.text, usage=usage)
        elif isinstance(event, ErrorEvent):
            kind = "server_error" if event.message.startswith("internal error") else "invalid_request_error"
            self.error(event.message, code="response_failed", kind=kind)
            self.finish(response, "failed", details={"type": "failed", "error": {"type": kind,
                                                                                 "code": "response_failed",
                                                                                 "message": event.message}})

    async def on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if self.response is None or (wanted and wanted != self.response.id):
            raise ClientError("there is no running response to cancel" if self.response is None
                              else f"response {wanted!r} is not running", code="response_cancel_not_active")
        self.cancel_response("client_cancelled")

    def cancel_response(self, reason: str) -> None:
        response = self.response
        if response is None:
            return
        if response.session is not None:
            response.session.cancel()  # the engine drops it before its next step
        self.finish(response, "cancelled", details={"type": "cancelled", "reason": reason})

    def finish(self, response: Response, status: str, text: str | None = None, details: Any = None,
               usage: Any = None) -> None:
        if response.finished:
            return
        response.finished = True
        if self.response is response:
            self.response = None
        text = "".join(response.text) if text is None else text
        where = self.where(response)
        if response.audio_out:
            self.send({"type": "response.output_audio.done", **where})
            self.send({"type": "response.output_audio_transcript.done", **where, "transcript": text})
        else:
            self.send({"type": "response.output_text.done", **where, "text": text})
        self.send({"type": "response.content_part.done", **where, "part": self.part(response, text)})
        item = self.assistant_item(response, "completed" if status == "completed" else "incomplete", text)
        self.send({"type": "response.output_item.done", "response_id": response.id, "output_index": 0, "item": item})
        self.send({"type": "conversation.item.done", "item": item})
        self.send({"type": "response.done",
                   "response": self.response_object(response, status, [item], details=details, usage=usage)})

    # ------------------------------------------------------------------ shapes

    @staticmethod
    def where(response: Response) -> dict[str, Any]:
        return {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}

    @staticmethod
    def part(response: Response, text: str) -> dict[str, Any]:
        return {"type": "audio", "transcript": text} if response.audio_out else {"type": "text", "text": text}

    @staticmethod
    def assistant_item(response: Response, status: str, text: str | None) -> dict[str, Any]:
        content = []
        if text is not None:
            content = [{"type": "output_audio", "transcript": text} if response.audio_out
                       else {"type": "output_text", "text": text}]
        return {"id": response.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content}

    def response_object(self, response: Response, status: str, output: list[dict[str, Any]], details: Any = None,
                        usage: Any = None) -> dict[str, Any]:
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": self.conversation_id,
            "output_modalities": ["audio"] if response.audio_out else ["text"],
            "max_output_tokens": response.max_output_tokens,
            "audio": {"output": {"format": dict(PCM_FORMAT)}},
            "usage": usage,
            "metadata": response.metadata,
        }


# ---------------------------------------------------------------------- access and routes


def choose_subprotocol(offered: list[str]) -> str | None:
    """Browsers fail the handshake unless one offered subprotocol is selected; never echo the key."""
    if "realtime" in offered:
        return "realtime"
    for protocol in offered:
        if not protocol.startswith(API_KEY_PROTOCOL):
            return protocol
    return None


def refusal(websocket: WebSocket, settings: Any, offered: list[str]) -> str | None:
    """Why this handshake is refused, or None. The HTTP middleware does not see WebSockets."""
    origin = websocket.headers.get("origin")
    if origin is not None:
        allowed = settings.cors_origins or []
        host = (websocket.headers.get("host") or "").lower()
        if "*" not in allowed and origin not in allowed and urlsplit(origin).netloc.lower() != host:
            return f"origin not allowed (add it with --cors-origin): {origin}"
    if settings.api_key:
        expected = settings.api_key.encode()
        header = websocket.headers.get("authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), expected):
            return None
        for protocol in offered:
            if protocol.startswith(API_KEY_PROTOCOL) and hmac.compare_digest(
                    protocol[len(API_KEY_PROTOCOL):].encode(), expected):
                return None
        return "missing or wrong API key (send Authorization: Bearer KEY, or subprotocol openai-insecure-api-key.KEY)"
    return None


def add_realtime_routes(app: FastAPI, engine: Engine, settings: Any) -> None:
    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        """OpenAI Realtime protocol (GA event names); see docs/server.md."""
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        reason = refusal(websocket, settings, offered)
        await websocket.accept(subprotocol=choose_subprotocol(offered))
        if reason is not None:
            await websocket.close(code=1008, reason=reason.encode()[:123].decode(errors="ignore"))
            return
        model = websocket.query_params.get("model") or "mini-omni"
        await RealtimeConnection(websocket, engine, settings, model).run()
