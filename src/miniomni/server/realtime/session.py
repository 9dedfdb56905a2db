"""One Realtime session, whatever carries it: client events in, server events out.

A session holds its configuration and its input turns (:mod:`..turns.taking`) and dispatches
client events to its parts: :mod:`.conversation` (the items), :mod:`.listening` (input audio and
turn detection), :mod:`.answers` (responses) and :mod:`.transcripts` (the user's words). Events are
parsed and shaped by :mod:`.protocol`. A transport (:mod:`..transports.websocket` for WebSocket,
:mod:`..transports.webrtc` for WebRTC) hands it client events as text and carries what it says
through an :class:`~.context.Output`; everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from ...errors import install_hint
from ..engine import Engine
from ..settings import ServerSettings
from ..turns.endofturn import TurnModelUnavailable, load_turn_model
from ..turns.taking import InputTurns
from ..turns.vad import vad_available
from .answers import Answers
from .context import Output
from .conversation import Conversation, Response
from .listening import Listening
from .protocol import (
    UNSUPPORTED_EVENTS,
    ClientError,
    SessionConfig,
    error_event,
    new_id,
    parse_json,
    parse_session_update,
    session_object,
)
from .transcripts import Transcripts

log = logging.getLogger(__name__)


class RealtimeSession:
    """One client's session; engine events arrive on the loop with ``call_soon_threadsafe``.

    ``output`` is its transport; with ``plays_audio`` it is an :class:`~.context.AudioOutput` that
    plays the answers itself (a media track) instead of carrying audio deltas.
    """

    def __init__(self, engine: Engine, settings: ServerSettings, model: str, output: Output,
                 plays_audio: bool = False) -> None:
        self.engine = engine
        self.settings = settings
        self.output = output
        self.plays_audio = plays_audio
        self.loop = asyncio.get_running_loop()
        self.session_id = new_id("sess")
        self.conversation_id = new_id("conv")
        self.model = model
        self.config = SessionConfig()
        self.vad_available = vad_available()
        if not self.vad_available:
            self.config.turn_detection = None
        self.turns = InputTurns(settings.max_audio_seconds, self.config.turn_detection)
        self.closing = False
        self.conversation = Conversation(self, running=lambda: self.answers.response)
        self.transcripts = Transcripts(self, self.conversation)
        self.answers = Answers(self, self.conversation, self.transcripts)
        self.listening = Listening(self, self.conversation, self.transcripts, self.answers)
        self.tokens = 2 * settings.max_events_per_second  # the rate limit's bucket
        self.refilled = time.monotonic()
        self.dropped = 0
        conversation, answers, listening = self.conversation, self.answers, self.listening
        self.handlers = {
            "session.update": self.on_session_update,
            "transcription_session.update": self.on_transcription_session_update,
            "input_audio_buffer.append": listening.on_append,
            "input_audio_buffer.commit": listening.on_commit,
            "input_audio_buffer.clear": listening.on_clear,
            "output_audio_buffer.clear": listening.on_output_audio_clear,
            "conversation.item.create": conversation.on_item_create,
            "conversation.item.retrieve": conversation.on_item_retrieve,
            "conversation.item.delete": conversation.on_item_delete,
            "conversation.item.truncate": answers.on_item_truncate,
            "response.create": answers.on_response_create,
            "response.cancel": answers.on_response_cancel,
        }

    @property
    def response(self) -> Response | None:
        """The response running now, if any."""
        return self.answers.response

    # ------------------------------------------------------------------ out

    def send(self, event: dict[str, Any]) -> None:
        """Say a server event (a fresh ``event_id`` first); never blocks."""
        if self.closing:
            return
        try:
            data = json.dumps({"event_id": new_id("event"), **event}, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError) as exc:  # never a client's fault: parse_json bounds them
            log.exception("realtime session %s: an event could not be written", self.session_id)
            data = json.dumps(error_event(f"internal error writing a {event.get('type')} event: {exc!r}",
                                          "internal_error", kind="server_error"))
        self.output.send_text(data)

    def error(self, message: str, code: str | None = None, param: str | None = None,
              kind: str = "invalid_request_error", event_id: str | None = None) -> None:
        self.send(error_event(message, code, param, kind, event_id))

    def start(self) -> None:
        """The session begins: ``session.created``."""
        self.send({"type": "session.created", "session": self.session_object()})

    def close(self) -> None:
        """The transport is closing: nothing more is said, and every answer of this session stops."""
        self.closing = True
        self.answers.stop()
        self.transcripts.cancel()
        self.listening.close()

    def shut_down(self) -> None:
        """The server is stopping: say so, end the running answer as failed, close with 1001 (going away)."""
        if self.closing:
            return
        message = "the server is shutting down; reconnect in a moment"
        self.error(message, code="server_shutting_down", kind="server_error")
        if self.answers.response is not None:
            self.answers.finish(self.answers.response, "failed", details={"type": "failed", "error": {
                "type": "server_error", "code": "server_shutting_down", "message": message}})
        self.output.close(1001, "the server is shutting down")

    # ------------------------------------------------------------------ in

    def within_rate(self) -> bool:
        """A token bucket of max_events_per_second, holding up to twice that."""
        rate = self.settings.max_events_per_second
        now = time.monotonic()
        self.tokens = min(2 * rate, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    async def receive(self, text: str | None) -> None:
        """One client message: a JSON event as text (``None``: a binary frame, which the protocol has not)."""
        if self.closing:
            return
        if not self.within_rate():
            self.dropped += 1
            if self.dropped > 2 * self.settings.max_events_per_second:  # a flood, not a burst
                self.output.close(1008, f"more than {self.settings.max_events_per_second:g} events per second")
                return
            self.error(f"more than {self.settings.max_events_per_second:g} events per second: this event was "
                       "dropped; send fewer, larger audio chunks", code="rate_limit_exceeded")
            return
        if text is None:
            self.error("binary frames are not part of the protocol: send JSON events as text frames "
                       "(audio goes base64-encoded in input_audio_buffer.append)", code="binary_frame")
            return
        try:
            event = parse_json(text)
        except ClientError as exc:
            self.error(f"{exc.message} (one JSON event per text frame)", code=exc.code)
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.error("an event must be a JSON object with a string \"type\"", code="invalid_event")
            return
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
        except Exception as exc:
            log.exception("realtime session %s: %s failed", self.session_id, kind)
            self.error(f"internal error handling {kind}: {exc!r}", code="internal_error", kind="server_error",
                       event_id=event_id)

    # ------------------------------------------------------------------ session

    def session_object(self) -> dict[str, Any]:
        return session_object(self.session_id, self.model, self.config)

    async def on_transcription_session_update(self, event: dict[str, Any]) -> None:
        """The beta protocol's transcription sessions: a session.update that makes this one."""
        session = event.get("session")
        if not isinstance(session, dict):
            raise ClientError("transcription_session.update needs a \"session\" object", param="session")
        await self.on_session_update({"session": {**session, "type": "transcription"}})

    async def on_session_update(self, event: dict[str, Any]) -> None:
        await self.configure(event.get("session"))

    async def configure(self, update: Any, announce: bool = True) -> None:
        """Apply one ``session.update`` body; ``session.updated`` follows unless ``announce`` is False
        (a configuration applied before ``session.created``, which then shows it). Errors are said either way."""
        config = parse_session_update(update, self.config, self.settings.max_tokens_limit)
        if config.turn_detection is not None and not self.vad_available:
            raise ClientError(f"server VAD needs the silero-vad package on the server ({install_hint('server')}); "
                              "set turn_detection to null", code="vad_unavailable",
                              param="session.audio.input.turn_detection")
        listening = self.listening
        if config.turn_detection is not None and config.turn_detection.semantic and listening.end_of_turn is None:
            try:
                listening.end_of_turn = await run_in_threadpool(load_turn_model, self.settings.turn_model)
            except TurnModelUnavailable as exc:  # the rest of the update holds; turn detection stays as it was
                config.turn_detection = self.config.turn_detection
                self.error(str(exc), code="turn_model_unavailable", param="session.audio.input.turn_detection.type")
        self.config = config
        self.turns.configure(config.turn_detection)
        if announce:
            self.send({"type": "session.updated", "session": self.session_object()})

    async def append_audio(self, pcm: bytes, rolling: bool = False) -> None:
        """Input audio from a transport that carries it itself (a media track): see :meth:`.Listening.append_audio`."""
        await self.listening.append_audio(pcm, rolling)
