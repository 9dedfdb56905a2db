"""``WS /v1/realtime``: one WebSocket is one Realtime session over the batched engine.

A connection holds the session's configuration, its input turns (:mod:`.turns`), the last
user message and at most one running response. A response answers the last user message
alone (Mini-Omni has no multi-turn context): spoken input with task ``A1A2-batch`` (speech
and transcript) or ``A1T2`` (text only), typed input with ``T1A2`` or ``T1T2``. Events are
parsed and shaped by :mod:`.protocol`; here are the transport (a send queue with
back-pressure), the dispatch of client events and the lifecycle of responses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..audio import float_to_pcm16
from ..generate import SamplingOptions
from ..streaming import AudioChunk, Done, TextDelta
from .access import choose_subprotocol, websocket_refusal
from .endofturn import EndOfTurnModel, TurnModelUnavailable, load_turn_model
from .engine import (
    TRANSCRIPT_TOKENS,
    AnswerRequest,
    Engine,
    EngineBusy,
    ErrorEvent,
    Session,
    TranscriptDelta,
    TranscriptDone,
    TranscriptFailed,
)
from .heap import trim_heap
from .protocol import (
    PROTOCOL_SAMPLE_RATE,
    UNSUPPORTED_EVENTS,
    ClientError,
    ResponseIds,
    ResponseParams,
    SessionConfig,
    UserInput,
    cut_transcript,
    decode_pcm16,
    error_event,
    new_id,
    parse_json,
    parse_message,
    parse_response_create,
    parse_session_update,
    pcm16_to_float,
    session_object,
    user_audio_item,
)
from .settings import ServerSettings
from .turns import (
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
from .vad import StreamingVAD, vad_available

log = logging.getLogger(__name__)

# Queued outgoing events of one connection, in bytes of JSON. A client that stops reading
# lets it fill (the socket blocks first); past this its answer is stopped and it is closed.
# (It holds several of the largest messages: items are echoed back, some twice.)
MAX_PENDING_BYTES = 16 * 1024 * 1024
AUDIO_CHUNK_FRAMES = 4  # frames (85 ms each) per audio delta once streaming is under way


@dataclass
class Response(ResponseIds):
    """A running response: its ids, the engine session answering it, the text so far."""

    session: Session | None = None
    text: list[str] = field(default_factory=list)
    finished: bool = False
    user_item_id: str | None = None  # the user's turn it answers (and transcribes, when asked)
    audio_samples: int = 0  # audio sent so far


@dataclass
class ItemRecord:
    """What the connection remembers of a conversation item (for transcripts and truncation)."""

    role: str
    transcript: str | None = None
    audio_ms: int = 0  # an assistant item's audio
    response: Response | None = None


MAX_ITEMS = 256  # items remembered per connection (the oldest go first)


@dataclass
class Speculation:
    """An answer already being prepared (held in the engine) for a turn the VAD may be about to end."""

    item_id: str
    pcm: bytes
    request: AnswerRequest
    response: Response

    def matches(self, item_id: str, pcm: bytes, request: AnswerRequest) -> bool:
        """Whether it answers exactly this turn, asked exactly this way (else it is dropped)."""
        ours, theirs = self.request, request
        return (self.item_id == item_id and self.pcm == pcm and ours.task == theirs.task
                and ours.max_new_tokens == theirs.max_new_tokens and ours.max_chunk == theirs.max_chunk
                and ours.options == theirs.options and ours.transcribe == theirs.transcribe)


class RealtimeConnection:
    """One client's session; runs on the event loop, engine events arrive with ``call_soon_threadsafe``."""

    def __init__(self, websocket: WebSocket, engine: Engine, settings: ServerSettings, model: str) -> None:
        self.ws = websocket
        self.engine = engine
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.session_id = new_id("sess")
        self.conversation_id = new_id("conv")
        self.model = model
        self.config = SessionConfig()
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
        self.transcriptions: dict[str, Session] = {}  # user item id -> its standalone transcription
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.pending_bytes = 0
        self.closing = False
        self.close_reason: tuple[int, str] | None = None
        self.main_task: asyncio.Task | None = None
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
            "transcription_session.update": self.on_transcription_session_update,
        }

    # ------------------------------------------------------------------ transport

    def send(self, event: dict[str, Any]) -> None:
        """Queue a server event (a fresh ``event_id`` first); never blocks."""
        if self.closing:
            return
        try:
            data = json.dumps({"event_id": new_id("event"), **event}, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError) as exc:  # never a client's fault: parse_json bounds them
            log.exception("realtime session %s: an event could not be written", self.session_id)
            data = json.dumps(error_event(f"internal error writing a {event.get('type')} event: {exc!r}",
                                          "internal_error", kind="server_error"))
        if self.pending_bytes + len(data) > MAX_PENDING_BYTES:
            self.abort(1008, "the client is not reading its events")
            return
        self.pending_bytes += len(data)
        self.outbox.put_nowait(data)

    def error(self, message: str, code: str | None = None, param: str | None = None,
              kind: str = "invalid_request_error", event_id: str | None = None) -> None:
        self.send(error_event(message, code, param, kind, event_id))

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

    async def flush(self) -> None:
        while not self.outbox.empty():
            data = self.outbox.get_nowait()
            self.pending_bytes -= len(data)
            await self.ws.send_text(data)

    def shut_down(self) -> None:
        """The server is stopping: say so, end the running answer as failed, close with 1001 (going away)."""
        if self.closing:
            return
        message = "the server is shutting down; reconnect in a moment"
        self.error(message, code="server_shutting_down", kind="server_error")
        if self.response is not None:
            self.finish(self.response, "failed", details={"type": "failed", "error": {
                "type": "server_error", "code": "server_shutting_down", "message": message}})
        self.abort(1001, "the server is shutting down")

    def abort(self, code: int | None, reason: str | None) -> None:
        """Stop this connection: its answer is cancelled at once and the receive loop ends."""
        if self.closing:
            return
        if code is not None:
            log.log(logging.INFO if code in (1000, 1001) else logging.WARNING, "realtime session %s: %s; closing it",
                    self.session_id, reason)
            self.close_reason = (code, reason or "")
        self.closing = True
        self.cancel_engine_session()
        if self.main_task is not None and self.main_task is not asyncio.current_task():
            self.main_task.cancel()

    def cancel_engine_session(self) -> None:
        if self.response is not None and self.response.session is not None:
            self.response.session.cancel()
        self.drop_speculation()
        for transcription in self.transcriptions.values():
            transcription.cancel()
        self.transcriptions.clear()

    def drop_speculation(self) -> None:
        if self.speculation is not None:
            self.speculation.response.session.cancel()
            self.speculation = None

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
            if self.close_reason is not None and self.close_reason[0] in (1000, 1001):
                # A normal close: what was said before it (the error, the failed response) still goes out.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.flush(), timeout=2)
            sender.cancel()
            if self.close_reason is not None and self.ws.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):  # the client may be gone already
                    await asyncio.wait_for(self.ws.close(*self.close_reason), timeout=2)

    # ------------------------------------------------------------------ dispatch

    async def receive(self) -> dict[str, Any] | None:
        """The next WebSocket message, or None when the connection ends (closed, or idle too long)."""
        while True:
            try:
                return await asyncio.wait_for(self.ws.receive(), timeout=self.settings.idle_timeout)
            except asyncio.TimeoutError:
                if self.response is None:
                    self.abort(1000, f"no event for {self.settings.idle_timeout:g} s: closing the idle connection")
                    return None
            except (WebSocketDisconnect, RuntimeError):
                return None

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

    async def receive_loop(self) -> None:
        while not self.closing:
            message = await self.receive()
            if message is None or message["type"] == "websocket.disconnect":
                return
            if not self.within_rate():
                self.dropped += 1
                if self.dropped > 2 * self.settings.max_events_per_second:  # a flood, not a burst
                    self.abort(1008, f"more than {self.settings.max_events_per_second:g} events per second")
                    return
                self.error(f"more than {self.settings.max_events_per_second:g} events per second: this event was "
                           "dropped; send fewer, larger audio chunks", code="rate_limit_exceeded")
                continue
            text = message.get("text")
            if text is None:
                self.error("binary frames are not part of the protocol: send JSON events as text frames "
                           "(audio goes base64-encoded in input_audio_buffer.append)", code="binary_frame")
                continue
            try:
                event = parse_json(text)
            except ClientError as exc:
                self.error(f"{exc.message} (one JSON event per text frame)", code=exc.code)
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
        config = parse_session_update(event.get("session"), self.config, self.settings.max_tokens_limit)
        if config.turn_detection is not None and not self.vad_available:
            raise ClientError("server VAD needs the silero-vad package on the server (pip install 'miniomni[server]'); "
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
        self.send({"type": "session.updated", "session": self.session_object()})

    # ------------------------------------------------------------------ input audio and turns

    async def on_append(self, event: dict[str, Any]) -> None:
        pcm = decode_pcm16(event.get("audio"), "audio")
        if not pcm:
            return
        turns = self.turns
        turns.append(pcm)
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
            response.session = self.engine.open(request, lambda ev: self.from_engine(response, ev), hold=True)
        except EngineBusy:
            return  # no room now: the turn is answered the usual way when it is taken
        self.speculation = Speculation(turn.item_id, turn.pcm, request, response)

    async def on_commit(self, event: dict[str, Any]) -> None:
        self.add_user_audio(self.turns.commit(), transcribe_here=True)

    async def on_clear(self, event: dict[str, Any]) -> None:
        self.turns.clear()
        self.send({"type": "input_audio_buffer.cleared"})

    def add_user_audio(self, turn: TurnEnded, transcribe_here: bool) -> None:
        """A committed spoken turn; transcribed on its own now if asked and ``transcribe_here`` (else by its answer)."""
        previous = self.last_item_id
        self.last_user = UserInput(turn.item_id, audio=pcm16_to_float(turn.pcm), pcm=turn.pcm)
        self.send({"type": "input_audio_buffer.committed", "item_id": turn.item_id, "previous_item_id": previous})
        self.announce_item(user_audio_item(turn.item_id))
        if transcribe_here and self.config.transcribes:
            self.transcribe(self.last_user)

    def remember(self, item_id: str, record: ItemRecord) -> None:
        self.items[item_id] = record
        while len(self.items) > MAX_ITEMS:
            self.items.popitem(last=False)

    # ------------------------------------------------------------------ the user's words

    def transcribe(self, user: UserInput) -> None:
        """Transcribe a spoken user turn on its own (the model's asr task); events carry its item id."""
        request = AnswerRequest(task="asr", audio=user.audio, sample_rate=PROTOCOL_SAMPLE_RATE,
                                max_new_tokens=TRANSCRIPT_TOKENS)
        item_id = user.item_id
        user.transcribed = True
        try:
            self.transcriptions[item_id] = self.engine.open(request, lambda ev: self.from_transcriber(item_id, ev))
        except EngineBusy as exc:
            self.on_transcript(item_id, TranscriptFailed(str(exc)))

    def from_transcriber(self, item_id: str, event: Any) -> None:
        """Called on the compute thread with a standalone transcription's events."""
        if isinstance(event, TextDelta):
            event = TranscriptDelta(event.text)
        elif isinstance(event, Done):
            event = TranscriptDone(event.text)
        elif isinstance(event, ErrorEvent):
            event = TranscriptFailed(event.message)
        with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down)
            self.loop.call_soon_threadsafe(self.on_transcript, item_id, event)

    def on_transcript(self, item_id: str, event: Any) -> None:
        if self.closing:
            return
        where = {"item_id": item_id, "content_index": 0}
        if isinstance(event, TranscriptDelta):
            self.send({"type": "conversation.item.input_audio_transcription.delta", **where, "delta": event.text})
            return
        self.transcriptions.pop(item_id, None)
        if isinstance(event, TranscriptDone):
            self.remember(item_id, ItemRecord("user", transcript=event.text))
            self.send({"type": "conversation.item.input_audio_transcription.completed", **where,
                       "transcript": event.text})
        elif isinstance(event, TranscriptFailed):
            self.send({"type": "conversation.item.input_audio_transcription.failed", **where, "error": {
                "type": "transcription_error", "code": "transcription_failed", "message": event.message,
                "param": None}})

    def announce_item(self, item: dict[str, Any]) -> None:
        previous, self.last_item_id = self.last_item_id, item["id"]
        self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})

    # ------------------------------------------------------------------ conversation items

    def parse_message(self, item: Any, param: str) -> tuple[UserInput | None, dict[str, Any]]:
        return parse_message(item, param, self.turns.max_buffer_bytes, self.settings.max_audio_seconds)

    async def on_item_create(self, event: dict[str, Any]) -> None:
        user, echoed = self.parse_message(event.get("item"), "item")
        if user is not None:
            self.last_user = user
        self.announce_item(echoed)

    # ------------------------------------------------------------------ responses

    async def on_response_create(self, event: dict[str, Any]) -> None:
        self.start_response(event.get("response"))

    def start_response(self, raw: Any) -> None:
        if self.config.type == "transcription":
            raise ClientError("this is a transcription session: it transcribes spoken turns and does not answer; "
                              "update the session to type \"realtime\" for answers", code="invalid_value",
                              param="type")
        if self.response is not None:
            raise ClientError(f"response {self.response.id} is still running; cancel it or wait for response.done",
                              code="conversation_already_has_active_response")
        params = parse_response_create(raw, self.config, self.settings.max_tokens_limit)
        user = self.last_user
        if params.input_items is not None:
            user = None
            for index, item in enumerate(params.input_items):
                parsed, _ = self.parse_message(item, f"response.input[{index}]")
                user = parsed or user
        if user is None:
            raise ClientError("nothing to answer: commit input audio or create a user message first",
                              code="response_no_input")
        request, response = self.plan_response(user, params)
        speculation, self.speculation = self.speculation, None
        if speculation is not None and user.pcm is not None and speculation.matches(user.item_id, user.pcm, request):
            response = speculation.response  # already prepared (and maybe speaking) while the VAD made sure
        else:
            if speculation is not None:
                speculation.response.session.cancel()
            try:
                response.session = self.engine.open(request, lambda ev: self.from_engine(response, ev))
            except EngineBusy as exc:
                raise ClientError(str(exc), code="server_busy", kind="server_error") from None
        self.response = response
        self.turns.pause_idle()
        user.transcribed = user.transcribed or request.transcribe
        self.remember(response.item_id, ItemRecord("assistant", response=response))
        self.send({"type": "response.created",
                   "response": response.response_object(self.conversation_id, "in_progress", [])})
        item = response.item("in_progress", None)
        self.send({"type": "response.output_item.added", "response_id": response.id, "output_index": 0, "item": item})
        previous, self.last_item_id = self.last_item_id, response.item_id
        self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        self.send({"type": "response.content_part.added", **response.where(), "part": response.part("")})
        response.session.release()  # a held answer's events follow the events above

    def plan_response(self, user: UserInput, params: ResponseParams) -> tuple[AnswerRequest, Response]:
        """The engine request answering ``user`` as ``params`` ask, and the response that will carry it."""
        audio_out = params.output_modalities == ["audio"]
        limit = self.settings.max_tokens_limit if params.max_output_tokens is None else params.max_output_tokens
        if user.audio is not None:
            request = AnswerRequest(task="A1A2-batch" if audio_out else "A1T2", audio=user.audio,
                                    sample_rate=PROTOCOL_SAMPLE_RATE)
        else:
            request = AnswerRequest(task="T1A2" if audio_out else "T1T2", text=user.text)
        request.max_new_tokens = limit
        request.options = SamplingOptions()
        request.max_chunk = AUDIO_CHUNK_FRAMES
        # The transcript of a spoken turn committed by the VAD comes from a row beside its answer.
        request.transcribe = (self.config.transcription is not None and user.pcm is not None
                              and not user.transcribed and params.input_items is None)
        response = Response(new_id("resp"), new_id("item"), audio_out, limit, params.metadata)
        response.user_item_id = user.item_id
        return request, response

    def from_engine(self, response: Response, event: Any) -> None:
        """Called on an engine thread: hand the event to the loop."""
        try:
            self.loop.call_soon_threadsafe(self.on_engine_event, response, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            if response.session is not None:
                response.session.cancel()

    def on_engine_event(self, response: Response, event: Any) -> None:
        if isinstance(event, (TranscriptDelta, TranscriptDone, TranscriptFailed)):
            self.on_transcript(response.user_item_id, event)  # the user's words: wanted even after a barge-in
            return
        if response.finished or self.closing:
            return
        if isinstance(event, TextDelta):
            response.text.append(event.text)
            kind = "response.output_audio_transcript.delta" if response.audio_out else "response.output_text.delta"
            self.send({"type": kind, **response.where(), "delta": event.text})
        elif isinstance(event, AudioChunk):
            response.audio_samples += len(event.audio)
            audio = base64.b64encode(float_to_pcm16(event.audio)).decode("ascii")
            self.send({"type": "response.output_audio.delta", **response.where(), "delta": audio})
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
            response.session.cancel(keep_transcript=True)  # the engine drops it before its next step
        self.finish(response, "cancelled", details={"type": "cancelled", "reason": reason})

    def finish(self, response: Response, status: str, text: str | None = None, details: Any = None,
               usage: Any = None) -> None:
        if response.finished:
            return
        response.finished = True
        # The item record outlives the answer; the engine session (with the question's audio) need not.
        response.session = None
        if self.response is response:
            self.response = None
            self.turns.resume_idle(response.audio_samples)
        text = "".join(response.text) if text is None else text
        record = self.items.get(response.item_id)
        if record is not None:
            record.transcript = text
            record.audio_ms = response.audio_samples * 1000 // PROTOCOL_SAMPLE_RATE
        where = response.where()
        if response.audio_out:
            self.send({"type": "response.output_audio.done", **where})
            self.send({"type": "response.output_audio_transcript.done", **where, "transcript": text})
        else:
            self.send({"type": "response.output_text.done", **where, "text": text})
        self.send({"type": "response.content_part.done", **where, "part": response.part(text)})
        item = response.item("completed" if status == "completed" else "incomplete", text)
        self.send({"type": "response.output_item.done", "response_id": response.id, "output_index": 0, "item": item})
        self.send({"type": "conversation.item.done", "item": item})
        self.send({"type": "response.done",
                   "response": response.response_object(self.conversation_id, status, [item], details=details,
                                                        usage=usage)})


    # ------------------------------------------------------------------ interruptions

    async def on_item_truncate(self, event: dict[str, Any]) -> None:
        """The client played only ``audio_end_ms`` of an answer: its transcript is cut to match."""
        item_id, content_index, end = event.get("item_id"), event.get("content_index", 0), event.get("audio_end_ms")
        record = self.items.get(item_id) if isinstance(item_id, str) else None
        if record is None or record.role != "assistant":
            raise ClientError(f"item {item_id!r} is not an assistant message of this conversation",
                              code="item_truncate_invalid_item_id", param="item_id")
        if content_index != 0:
            raise ClientError("content_index must be 0 (an answer has one part)", param="content_index")
        running = record.response is not None and not record.response.finished
        audio_ms = record.response.audio_samples * 1000 // PROTOCOL_SAMPLE_RATE if record.response else 0
        if isinstance(end, bool) or not isinstance(end, int) or not 0 <= end <= max(audio_ms, record.audio_ms):
            raise ClientError(f"audio_end_ms must be an integer from 0 to {max(audio_ms, record.audio_ms)}, the audio "
                              "sent for this item", code="item_truncate_invalid_audio_end_ms", param="audio_end_ms")
        if running:
            self.cancel_response("client_cancelled")
        record.transcript = cut_transcript(record.transcript or "", end, max(record.audio_ms, 1))
        record.audio_ms = end
        self.send({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                   "audio_end_ms": end})


def add_realtime_routes(app: FastAPI, engine: Engine, settings: ServerSettings) -> None:
    connections: set[RealtimeConnection] = set()
    app.state.connections = connections

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        """OpenAI Realtime protocol (GA event names); see docs/server.md."""
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        reason = websocket_refusal(websocket.headers, settings, offered)
        code = 1008
        if reason is None and len(connections) >= settings.max_connections:
            reason, code = f"all {settings.max_connections} connections are in use; try again later", 1013
        if reason is None and getattr(app.state, "stopping", False):
            reason, code = "the server is shutting down", 1001
        await websocket.accept(subprotocol=choose_subprotocol(offered))
        if reason is not None:
            app.state.metrics.refused.labels(reason=str(code)).inc()
            await websocket.close(code=code, reason=reason.encode()[:123].decode(errors="ignore"))
            return
        model = websocket.query_params.get("model") or "mini-omni"
        connection = RealtimeConnection(websocket, engine, settings, model)
        connections.add(connection)
        app.state.metrics.connections.inc()
        try:
            await connection.run()
        finally:
            connections.discard(connection)
            app.state.metrics.connections.dec()
            trim_heap()


async def close_all(app: FastAPI, timeout: float = 3.0) -> None:
    """Shutting down: every connection's answer ends with an error event, and the connection with code 1001.

    Returns once every connection has sent its close frame (or after ``timeout`` seconds), so that the
    HTTP server, stopped after this, does not close them first with its own code.
    """
    app.state.stopping = True
    connections = list(getattr(app.state, "connections", ()))
    for connection in connections:
        connection.shut_down()
    running = [c.main_task for c in connections if c.main_task is not None and not c.main_task.done()]
    if running:
        await asyncio.wait(running, timeout=timeout)
