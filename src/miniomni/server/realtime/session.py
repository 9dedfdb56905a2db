"""One Realtime session, whatever carries it: client events in, server events out.

A session holds its configuration, its input turns (:mod:`..turns.taking`), the last user
message and at most one running response. A response answers the last user message
alone (Mini-Omni has no multi-turn context): spoken input with task ``A1A2-batch`` (speech
and transcript) or ``A1T2`` (text only), typed input with ``T1A2`` or ``T1T2``. Events are
parsed and shaped by :mod:`.protocol`; here are the dispatch of client events, turn-taking
and the lifecycle of responses. A transport (:mod:`..transports.websocket` for WebSocket,
:mod:`..transports.webrtc` for WebRTC) hands it client events as text and carries what it says
through an :class:`Output`; everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool

from ...errors import install_hint
from ..engine import (
    AnswerJob,
    Engine,
    EngineBusy,
)
from ..settings import ServerSettings
from ..turns.endofturn import EndOfTurnModel, TurnModelUnavailable, load_turn_model
from ..turns.taking import (
    InputTurns,
    SpeechStarted,
    SpeechStopped,
    TimeoutTriggered,
    TurnCheck,
    TurnEnded,
    TurnEvent,
    TurnMayEnd,
    TurnResumed,
    vad_settings,
)
from ..turns.vad import StreamingVAD, vad_available
from .answers import Answering, ItemRecord, Response, Speculation
from .formats import InputConverter
from .protocol import (
    PROTOCOL_SAMPLE_RATE,
    UNSUPPORTED_EVENTS,
    ClientError,
    SessionConfig,
    UserInput,
    decode_pcm16,
    error_event,
    new_id,
    parse_json,
    parse_response_create,
    parse_session_update,
    pcm16_to_float,
    session_object,
    user_audio_item,
)

log = logging.getLogger(__name__)

class Output(Protocol):
    """What a transport does for its session."""

    def send_text(self, data: str) -> None:
        """Queue one server event (JSON text) for the client; never blocks."""

    def close(self, code: int, reason: str) -> None:
        """End the connection with this code and reason."""


class AudioOutput(Output, Protocol):
    """A transport that plays answers itself (a media track) instead of sending audio deltas."""

    def play(self, response_id: str, item_id: str, audio: np.ndarray) -> None:
        """Queue 24 kHz float32 samples of this answer for playback."""

    def stop_playing(self) -> int:
        """Drop what is queued; returns the milliseconds of the current answer played so far."""



class Transport:
    """What every transport of a session shares: it ends once, with a close code and a reason."""

    session: RealtimeSession
    closing: bool = False
    close_reason: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.abort(code, reason)

    def shut_down(self) -> None:
        """The server is stopping: the session says so and the transport closes with 1001 (going away)."""
        self.session.shut_down()

    def abort(self, code: int | None, reason: str | None) -> None:
        """End it: its answers are cancelled at once, then :meth:`stopped` lets the transport's loops end."""
        if self.closing:
            return
        if code is not None:
            log.log(logging.INFO if code in (1000, 1001) else logging.WARNING, "%s: %s; closing it", self.describe(),
                    reason)
            self.close_reason = (code, reason or "")
        self.closing = True
        self.session.close()
        self.stopped()

    def stopped(self) -> None:
        """The transport's own part of ending (wake its loops)."""

    def describe(self) -> str:
        """How the log names it."""
        return f"realtime session {self.session.session_id}"


class RealtimeSession(Answering):
    """One client's session; engine events arrive on the loop with ``call_soon_threadsafe``.

    ``output`` is its transport; with ``plays_audio`` it is an :class:`AudioOutput` that plays the
    answers itself (a media track) instead of carrying audio deltas.
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
        self.input_converter = InputConverter(self.config.input_format)
        self.vad_available = vad_available()
        if not self.vad_available:
            self.config.turn_detection = None
        self.turns = InputTurns(settings.max_audio_seconds, self.config.turn_detection)
        self.end_of_turn: EndOfTurnModel | None = None  # semantic VAD's model, loaded when a session asks for it
        self.last_user: UserInput | None = None
        self.last_item_id: str | None = None
        self.response: Response | None = None
        self.speculation: Speculation | None = None
        self.items: OrderedDict[str, ItemRecord] = OrderedDict()
        self.transcriptions: dict[str, AnswerJob] = {}  # user item id -> its standalone transcription
        self.closing = False
        self.tokens = 2 * settings.max_events_per_second  # the rate limit's bucket
        self.refilled = time.monotonic()
        self.dropped = 0
        self.handlers = {
            "session.update": self.on_session_update,
            "input_audio_buffer.append": self.on_append,
            "input_audio_buffer.commit": self.on_commit,
            "input_audio_buffer.clear": self.on_clear,
            "conversation.item.create": self.on_item_create,
            "response.create": self.on_response_create,
            "response.cancel": self.on_response_cancel,
            "conversation.item.truncate": self.on_item_truncate,
            "conversation.item.retrieve": self.on_item_retrieve,
            "conversation.item.delete": self.on_item_delete,
            "transcription_session.update": self.on_transcription_session_update,
            "output_audio_buffer.clear": self.on_output_audio_clear,
        }

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
        self.cancel_engine_session()
        self.response = None

    def shut_down(self) -> None:
        """The server is stopping: say so, end the running answer as failed, close with 1001 (going away)."""
        if self.closing:
            return
        message = "the server is shutting down; reconnect in a moment"
        self.error(message, code="server_shutting_down", kind="server_error")
        if self.response is not None:
            self.finish(self.response, "failed", details={"type": "failed", "error": {
                "type": "server_error", "code": "server_shutting_down", "message": message}})
        self.output.close(1001, "the server is shutting down")

    def cancel_engine_session(self) -> None:
        if self.response is not None and self.response.job is not None:
            self.response.job.cancel()
        self.drop_speculation()
        for transcription in self.transcriptions.values():
            transcription.cancel()
        self.transcriptions.clear()

    def drop_speculation(self) -> None:
        if self.speculation is not None:
            self.speculation.response.job.cancel()
            self.speculation = None

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
        if config.turn_detection is not None and config.turn_detection.semantic and self.end_of_turn is None:
            try:
                self.end_of_turn = await run_in_threadpool(load_turn_model, self.settings.turn_model)
            except TurnModelUnavailable as exc:  # the rest of the update holds; turn detection stays as it was
                config.turn_detection = self.config.turn_detection
                self.error(str(exc), code="turn_model_unavailable", param="session.audio.input.turn_detection.type")
        self.config = config
        self.turns.configure(config.turn_detection)
        if announce:
            self.send({"type": "session.updated", "session": self.session_object()})

    # ------------------------------------------------------------------ input audio and turns

    async def on_append(self, event: dict[str, Any]) -> None:
        fmt = self.config.input_format
        if self.input_converter.format != fmt:  # a new format: a new resampler
            self.input_converter = InputConverter(fmt)
        await self.append_audio(self.input_converter.to_pcm16(decode_pcm16(event.get("audio"), "audio", fmt)))

    async def append_audio(self, pcm: bytes, rolling: bool = False) -> None:
        """Add 24 kHz mono 16-bit input audio (an append event's, or with ``rolling`` a media track's, which keeps
        the latest audio when the buffer is full) and run turn detection."""
        if not pcm or self.closing:
            return
        turns = self.turns
        turns.append(pcm, rolling)
        if not turns.detecting:
            return
        if turns.vad is None:
            td = self.config.turn_detection
            first = turns.stream_samples - len(pcm) // 2
            vad = await run_in_threadpool(StreamingVAD, *vad_settings(td), PROTOCOL_SAMPLE_RATE)
            if not turns.detecting or self.closing:  # turned off while the VAD was being loaded
                return
            turns.start_vad(vad, first)
        # NumPy, a fraction of a millisecond per 32 ms window: inline, no thread hop.
        self.on_turn_events(turns.on_vad(turns.vad.process(pcm16_to_float(pcm))))

    def on_turn_events(self, events: list[TurnEvent]) -> None:
        for event in events:
            if not self.closing:  # (an end-of-turn decision may come back after the connection closed)
                self.on_turn_event(event)

    def on_turn_event(self, event: TurnEvent) -> None:
        if isinstance(event, SpeechStarted):
            self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": event.audio_start_ms,
                       "item_id": event.item_id})
            if self.response is not None and self.config.turn_detection.interrupt_response:
                self.cancel_response("turn_detected")  # barge-in: stopped within one decode step
        elif isinstance(event, SpeechStopped):
            self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": event.audio_end_ms,
                       "item_id": event.item_id})
        elif isinstance(event, TurnMayEnd):
            self.speculate(event)
        elif isinstance(event, TurnResumed):
            self.drop_speculation()
        elif isinstance(event, TurnCheck):  # semantic VAD: the end-of-turn model decides, off the event loop
            self.end_of_turn.ask(event.pcm, lambda p: self.on_turn_events(self.turns.on_end_of_turn(event, p)))
        elif isinstance(event, TimeoutTriggered):
            self.send({"type": "input_audio_buffer.timeout_triggered", "audio_start_ms": event.audio_start_ms,
                       "audio_end_ms": event.audio_end_ms, "item_id": event.item_id})
        elif isinstance(event, TurnEnded):
            td = self.config.turn_detection
            answering = self.config.type == "realtime" and td is not None and td.create_response
            self.add_user_audio(event, transcribe_here=not answering)
            if answering:
                try:
                    self.start_response({})
                except ClientError as exc:  # busy, or a response still running (interrupt_response false)
                    self.error(exc.message, exc.code, exc.param, exc.kind)
                    if self.config.transcribes:
                        self.transcribe(self.last_user)  # not answered, but still transcribed
            self.drop_speculation()  # unused (the turn or the session changed meanwhile)

    def speculate(self, turn: TurnMayEnd) -> None:
        """Start answering the turn the VAD may be ending; its events wait until the turn is taken."""
        self.drop_speculation()
        td = self.config.turn_detection
        if not self.settings.speculate or td is None or not td.create_response or self.response is not None \
                or self.config.type != "realtime":
            return
        user = UserInput(turn.item_id, audio=pcm16_to_float(turn.pcm), pcm=turn.pcm)
        params = parse_response_create({}, self.config, self.settings.max_tokens_limit)
        request, response = self.plan_response(user, params)
        try:
            response.job = self.engine.open(request, lambda ev: self.from_engine(response, ev), hold=True)
        except EngineBusy:
            return  # no room now: the turn is answered the usual way when it is taken
        self.speculation = Speculation(turn.item_id, turn.pcm, request, response)

    async def on_commit(self, event: dict[str, Any]) -> None:
        self.add_user_audio(self.turns.commit(), transcribe_here=True)

    async def on_output_audio_clear(self, event: dict[str, Any]) -> None:
        """WebRTC only: drop the answer audio queued on the track (the answer itself goes on; cancel it apart)."""
        if not self.plays_audio:
            raise ClientError(f"output_audio_buffer.clear is not supported by this server "
                              f"({UNSUPPORTED_EVENTS['output_audio_buffer.clear']})", code="unsupported_event",
                              param="type")
        self.clear_played_audio()

    async def on_clear(self, event: dict[str, Any]) -> None:
        self.turns.clear()
        self.send({"type": "input_audio_buffer.cleared"})

    def add_user_audio(self, turn: TurnEnded, transcribe_here: bool) -> None:
        """A committed spoken turn; transcribed on its own now if asked and ``transcribe_here`` (else by its answer)."""
        previous = self.last_item_id
        self.last_user = UserInput(turn.item_id, audio=pcm16_to_float(turn.pcm), pcm=turn.pcm)
        self.send({"type": "input_audio_buffer.committed", "item_id": turn.item_id, "previous_item_id": previous})
        self.remember(turn.item_id, ItemRecord("user"))
        self.announce_item(user_audio_item(turn.item_id))
        if transcribe_here and self.config.transcribes:
            self.transcribe(self.last_user)

    # ------------------------------------------------------------------ conversation items

    async def on_item_create(self, event: dict[str, Any]) -> None:
        user, echoed = self.parse_message(event.get("item"), "item")
        if user is not None:
            self.last_user = user
        self.remember(echoed["id"], ItemRecord(echoed.get("role", "user"), item=echoed))
        self.announce_item(echoed)

