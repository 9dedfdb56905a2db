"""A Realtime session's answers: responses, their events, transcripts of the user's turns, truncation.

:class:`Answering` is the half of :class:`~.realtime.RealtimeSession` that turns engine
events into protocol events; the session provides the attributes annotated below.
"""

from __future__ import annotations

import base64
import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...generate import SamplingOptions
from ...streaming import AudioChunk, Done, TextDelta
from ..engine import (
    TRANSCRIPT_TOKENS,
    AnswerJob,
    AnswerRequest,
    Engine,
    EngineBusy,
    ErrorEvent,
    TranscriptDelta,
    TranscriptDone,
    TranscriptFailed,
)
from ..settings import ServerSettings
from ..turns.taking import InputTurns
from .formats import InputConverter, OutputConverter
from .protocol import (
    PROTOCOL_SAMPLE_RATE,
    ClientError,
    ResponseIds,
    ResponseParams,
    SessionConfig,
    UserInput,
    decode_pcm16,
    new_id,
    parse_message,
    parse_response_create,
    user_audio_item,
)


def cut_transcript(text: str, played_ms: int, total_ms: int) -> str:
    """The part of an answer's transcript heard in its first ``played_ms`` of ``total_ms`` of speech.

    The words are taken in proportion to the time played, cut at a word boundary (the text
    and the speech are not aligned word by word).
    """
    if total_ms <= 0 or played_ms >= total_ms:
        return text
    cut = int(len(text) * played_ms / total_ms)
    if cut < len(text) and not text[cut].isspace():
        space = text.rfind(" ", 0, cut + 1)
        cut = space if space >= 0 else 0
    return text[:cut].rstrip()


# ---------------------------------------------------------------------- server event shapes


AUDIO_CHUNK_FRAMES = 4  # frames (85 ms each) per audio delta once streaming is under way


@dataclass
class Response(ResponseIds):
    """A running response: its ids, the engine job answering it, the text so far."""

    job: AnswerJob | None = None
    encoder: OutputConverter | None = None  # its audio in the session's output format
    text: list[str] = field(default_factory=list)
    finished: bool = False
    user_item_id: str | None = None  # the user's turn it answers (and transcribes, when asked)
    audio_samples: int = 0  # audio sent so far


@dataclass
class ItemRecord:
    """What the session remembers of a conversation item (for transcripts, truncation and retrieval)."""

    role: str
    transcript: str | None = None
    audio_ms: int = 0  # an assistant item's audio
    response: Response | None = None
    item: dict[str, Any] | None = None  # a user item as it was announced

    def as_item(self, item_id: str) -> dict[str, Any]:
        """The item as ``conversation.item.retrieve`` gives it back now."""
        if self.response is not None:
            return self.response.item("completed" if self.response.finished else "in_progress", self.transcript)
        if self.item is not None and self.item["content"][0].get("type") != "input_audio":
            return self.item
        return user_audio_item(item_id, self.transcript)


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


class Answering:
    """Responses and transcripts of one session (mixed into :class:`~.realtime.RealtimeSession`)."""

    engine: Engine
    settings: ServerSettings
    config: SessionConfig
    turns: InputTurns
    conversation_id: str
    last_user: UserInput | None
    last_item_id: str | None
    response: Response | None
    speculation: Speculation | None
    items: OrderedDict[str, ItemRecord]
    transcriptions: dict[str, AnswerJob]
    closing: bool
    output: Any  # an Output; with plays_audio an AudioOutput (WebRTC), which gets the answer's samples itself
    plays_audio: bool

    def send(self, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def error(self, message: str, code: str | None = None, param: str | None = None,
              kind: str = "invalid_request_error", event_id: str | None = None) -> None:
        raise NotImplementedError

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
            record = self.items.get(item_id)
            if record is None:
                self.remember(item_id, ItemRecord("user", transcript=event.text))
            else:
                record.transcript = event.text
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


    def parse_message(self, item: Any, param: str) -> tuple[UserInput | None, dict[str, Any]]:
        return parse_message(item, param, self.turns.max_buffer_bytes, self.settings.max_audio_seconds,
                             self.item_audio)

    def item_audio(self, data: Any, param: str) -> bytes:
        """An item's ``input_audio`` (base64, in the session's input format) as 24 kHz PCM."""
        return InputConverter(self.config.input_format).to_pcm16(decode_pcm16(data, param, self.config.input_format))

    def input_item(self, item: Any, param: str) -> UserInput | None:
        """One item of ``response.input``: a message, or an ``item_reference`` to the latest user turn."""
        if isinstance(item, dict) and item.get("type") == "item_reference":
            wanted = item.get("id")
            if self.last_user is not None and wanted == self.last_user.item_id:
                return self.last_user
            known = "no user turn yet" if self.last_user is None else f"the latest is {self.last_user.item_id!r}"
            raise ClientError(f"{param}: an item_reference can name the latest user turn only ({known}); got "
                              f"{wanted!r}. Send other turns as message items", param=f"{param}.id")
        return self.parse_message(item, param)[0]


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
                parsed = self.input_item(item, f"response.input[{index}]")
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
                speculation.response.job.cancel()
            try:
                response.job = self.engine.open(request, lambda ev: self.from_engine(response, ev))
            except EngineBusy as exc:
                raise ClientError(str(exc), code="server_busy", kind="server_error") from None
        self.response = response
        self.turns.pause_idle()
        user.transcribed = user.transcribed or request.transcribe
        if response.in_conversation:
            self.remember(response.item_id, ItemRecord("assistant", response=response))
        self.send({"type": "response.created",
                   "response": response.response_object(self.conversation_id, "in_progress", [])})
        item = response.item("in_progress", None)
        self.send({"type": "response.output_item.added", "response_id": response.id, "output_index": 0, "item": item})
        if response.in_conversation:  # an out-of-band answer is the client's alone
            previous, self.last_item_id = self.last_item_id, response.item_id
            self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        self.send({"type": "response.content_part.added", **response.where(), "part": response.part("")})
        response.job.release()  # a held answer's events follow the events above

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
        response = Response(new_id("resp"), new_id("item"), audio_out, limit, params.metadata,
                            in_conversation=params.conversation != "none", output_format=self.config.output_format)
        response.encoder = OutputConverter(self.config.output_format)
        response.user_item_id = user.item_id
        return request, response

    def from_engine(self, response: Response, event: Any) -> None:
        """Called on an engine thread: hand the event to the loop."""
        try:
            self.loop.call_soon_threadsafe(self.on_engine_event, response, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            if response.job is not None:
                response.job.cancel()

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
            if self.plays_audio:  # a media track plays it: no delta on the events channel
                self.output.play(response.id, response.item_id, event.audio)
                return
            self.send_audio(response, response.encoder.encode(event.audio))
        elif isinstance(event, Done):
            if response.audio_out and not self.plays_audio:
                self.send_audio(response, response.encoder.encode(np.zeros(0, np.float32), last=True))
            usage = {"total_tokens": event.prompt_length + len(event.text_tokens),
                     "input_tokens": event.prompt_length, "output_tokens": len(event.text_tokens)}
            self.finish(response, "completed", text=event.text, usage=usage)
        elif isinstance(event, ErrorEvent):
            kind = "server_error" if event.message.startswith("internal error") else "invalid_request_error"
            self.error(event.message, code="response_failed", kind=kind)
            self.finish(response, "failed", details={"type": "failed", "error": {"type": kind,
                                                                                 "code": "response_failed",
                                                                                 "message": event.message}})

    def send_audio(self, response: Response, data: bytes) -> None:
        """One ``response.output_audio.delta`` (none for no bytes)."""
        if data:
            delta = base64.b64encode(data).decode("ascii")
            self.send({"type": "response.output_audio.delta", **response.where(), "delta": delta})

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
        if response.job is not None:
            response.job.cancel(keep_transcript=True)  # the engine drops it before its next step
        if self.plays_audio:
            self.clear_played_audio()
        self.finish(response, "cancelled", details={"type": "cancelled", "reason": reason})

    def clear_played_audio(self) -> None:
        """A media track stops playing at once: the running answer's audio counts what it really played."""
        played_ms = self.output.stop_playing()
        response = self.response
        if response is not None:
            response.audio_samples = min(response.audio_samples, played_ms * PROTOCOL_SAMPLE_RATE // 1000)
        self.send({"type": "output_audio_buffer.cleared",
                   **({"response_id": response.id} if response is not None else {})})

    def finish(self, response: Response, status: str, text: str | None = None, details: Any = None,
               usage: Any = None) -> None:
        if response.finished:
            return
        response.finished = True
        # The item record outlives the answer; the engine session (with the question's audio) need not.
        response.job = None
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
        if response.in_conversation:
            self.send({"type": "conversation.item.done", "item": item})
        self.send({"type": "response.done",
                   "response": response.response_object(self.conversation_id, status, [item], details=details,
                                                        usage=usage)})


    async def on_item_retrieve(self, event: dict[str, Any]) -> None:
        """The item as the server has it now (a user turn with its transcript, once there is one)."""
        item_id = event.get("item_id")
        record = self.items.get(item_id) if isinstance(item_id, str) else None
        if record is None:
            raise ClientError(f"item {item_id!r} is not in this conversation (or is one of the oldest, no longer "
                              f"kept: the last {MAX_ITEMS} are)", code="item_retrieve_invalid_item_id",
                              param="item_id")
        self.send({"type": "conversation.item.retrieved", "item": record.as_item(item_id)})

    async def on_item_delete(self, event: dict[str, Any]) -> None:
        """Forget an item (an application editing its history); a turn being answered is refused, not cut."""
        item_id = event.get("item_id")
        record = self.items.get(item_id) if isinstance(item_id, str) else None
        if record is None:
            raise ClientError(f"item {item_id!r} is not in this conversation (or is one of the oldest, no longer "
                              f"kept: the last {MAX_ITEMS} are)", code="item_delete_invalid_item_id", param="item_id")
        running = self.response if self.response is not None and not self.response.finished else None
        if running is not None and item_id in (running.item_id, running.user_item_id):
            raise ClientError(f"item {item_id!r} is being answered now; send response.cancel first, then delete it",
                              code="item_delete_in_progress", param="item_id")
        del self.items[item_id]
        if self.last_user is not None and self.last_user.item_id == item_id:
            self.last_user = None  # a deleted turn is not answered by a later response.create
        if self.last_item_id == item_id:
            self.last_item_id = next(reversed(self.items), None)
        self.send({"type": "conversation.item.deleted", "item_id": item_id})

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

