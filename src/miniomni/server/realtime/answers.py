"""A Realtime session's answers: responses, the engine's events turned into protocol events, cancel, truncate.

A response answers the latest user turn alone (Mini-Omni has no multi-turn context): spoken input
with task ``A1A2-batch`` (speech and transcript) or ``A1T2`` (text only), typed input with ``T1A2``
or ``T1T2``. At most one runs at a time; one more may be prepared (held in the engine) for a turn
the VAD may be about to end.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...generate import SamplingOptions
from ...streaming import AudioChunk, Done, TextDelta
from ..engine import (
    AnswerRequest,
    EngineBusy,
    ErrorEvent,
    TranscriptDelta,
    TranscriptDone,
    TranscriptFailed,
)
from ..turns.taking import TurnMayEnd
from .context import SessionContext
from .conversation import Conversation, ItemRecord, Response
from .formats import OutputConverter
from .protocol import (
    PROTOCOL_SAMPLE_RATE,
    ClientError,
    ResponseParams,
    UserInput,
    new_id,
    parse_response_create,
    pcm16_to_float,
)
from .transcripts import Transcripts


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


class Answers:
    """The responses of one session: at most one running, at most one prepared ahead of its turn's end."""

    def __init__(self, session: SessionContext, conversation: Conversation, transcripts: Transcripts) -> None:
        self.session = session
        self.conversation = conversation
        self.transcripts = transcripts
        self.response: Response | None = None
        self.speculation: Speculation | None = None

    # ------------------------------------------------------------------ starting

    async def on_response_create(self, event: dict[str, Any]) -> None:
        self.start_response(event.get("response"))

    def start_response(self, raw: Any) -> None:
        session, conversation = self.session, self.conversation
        if session.config.type == "transcription":
            raise ClientError("this is a transcription session: it transcribes spoken turns and does not answer; "
                              "update the session to type \"realtime\" for answers", code="invalid_value",
                              param="type")
        if self.response is not None:
            raise ClientError(f"response {self.response.id} is still running; cancel it or wait for response.done",
                              code="conversation_already_has_active_response")
        params = parse_response_create(raw, session.config, session.settings.max_tokens_limit)
        user = conversation.last_user
        if params.input_items is not None:
            user = None
            for index, item in enumerate(params.input_items):
                parsed = conversation.input_item(item, f"response.input[{index}]")
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
                response.job = session.engine.open(request, lambda ev: self.from_engine(response, ev))
            except EngineBusy as exc:
                raise ClientError(str(exc), code="server_busy", kind="server_error") from None
        self.response = response
        session.turns.pause_idle()
        user.transcribed = user.transcribed or request.transcribe
        self.announce(response)
        response.job.release()  # a held answer's events follow the events above

    def announce(self, response: Response) -> None:
        """The events that open a response (and its conversation item, unless it is out of band)."""
        send = self.session.send
        if response.in_conversation:
            self.conversation.remember(response.item_id, ItemRecord("assistant", response=response))
        send({"type": "response.created",
              "response": response.response_object(self.session.conversation_id, "in_progress", [])})
        item = response.item("in_progress", None)
        send({"type": "response.output_item.added", "response_id": response.id, "output_index": 0, "item": item})
        if response.in_conversation:  # an out-of-band answer is the client's alone
            self.conversation.announce_item(item, done=False)
        send({"type": "response.content_part.added", **response.where(), "part": response.part("")})

    def plan_response(self, user: UserInput, params: ResponseParams) -> tuple[AnswerRequest, Response]:
        """The engine request answering ``user`` as ``params`` ask, and the response that will carry it."""
        config, settings = self.session.config, self.session.settings
        audio_out = params.output_modalities == ["audio"]
        limit = settings.max_tokens_limit if params.max_output_tokens is None else params.max_output_tokens
        if user.audio is not None:
            request = AnswerRequest(task="A1A2-batch" if audio_out else "A1T2", audio=user.audio,
                                    sample_rate=PROTOCOL_SAMPLE_RATE)
        else:
            request = AnswerRequest(task="T1A2" if audio_out else "T1T2", text=user.text)
        request.max_new_tokens = limit
        request.options = SamplingOptions()
        request.max_chunk = AUDIO_CHUNK_FRAMES
        # The transcript of a spoken turn committed by the VAD comes from a row beside its answer.
        request.transcribe = (config.transcription is not None and user.pcm is not None
                              and not user.transcribed and params.input_items is None)
        response = Response(new_id("resp"), new_id("item"), audio_out, limit, params.metadata,
                            in_conversation=params.conversation != "none", output_format=config.output_format)
        response.encoder = OutputConverter(config.output_format)
        response.user_item_id = user.item_id
        return request, response

    def speculate(self, turn: TurnMayEnd) -> None:
        """Start answering the turn the VAD may be ending; its events wait until the turn is taken."""
        self.drop_speculation()
        session = self.session
        td = session.config.turn_detection
        if not session.settings.speculate or td is None or not td.create_response or self.response is not None \
                or session.config.type != "realtime":
            return
        user = UserInput(turn.item_id, audio=pcm16_to_float(turn.pcm), pcm=turn.pcm)
        params = parse_response_create({}, session.config, session.settings.max_tokens_limit)
        request, response = self.plan_response(user, params)
        try:
            response.job = session.engine.open(request, lambda ev: self.from_engine(response, ev), hold=True)
        except EngineBusy:
            return  # no room now: the turn is answered the usual way when it is taken
        self.speculation = Speculation(turn.item_id, turn.pcm, request, response)

    def drop_speculation(self) -> None:
        if self.speculation is not None:
            self.speculation.response.job.cancel()
            self.speculation = None

    # ------------------------------------------------------------------ the engine's events

    def from_engine(self, response: Response, event: Any) -> None:
        """Called on an engine thread: hand the event to the loop."""
        try:
            self.session.loop.call_soon_threadsafe(self.on_engine_event, response, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            if response.job is not None:
                response.job.cancel()

    def on_engine_event(self, response: Response, event: Any) -> None:
        session = self.session
        if isinstance(event, (TranscriptDelta, TranscriptDone, TranscriptFailed)):
            self.transcripts.on_transcript(response.user_item_id, event)  # wanted even after a barge-in
            return
        if response.finished or session.closing:
            return
        if isinstance(event, TextDelta):
            response.text.append(event.text)
            kind = "response.output_audio_transcript.delta" if response.audio_out else "response.output_text.delta"
            session.send({"type": kind, **response.where(), "delta": event.text})
        elif isinstance(event, AudioChunk):
            response.audio_samples += len(event.audio)
            if session.plays_audio:  # a media track plays it: no delta on the events channel
                session.output.play(response.id, response.item_id, event.audio)
                return
            self.send_audio(response, response.encoder.encode(event.audio))
        elif isinstance(event, Done):
            if response.audio_out and not session.plays_audio:
                self.send_audio(response, response.encoder.encode(np.zeros(0, np.float32), last=True))
            usage = {"total_tokens": event.prompt_length + len(event.text_tokens),
                     "input_tokens": event.prompt_length, "output_tokens": len(event.text_tokens)}
            self.finish(response, "completed", text=event.text, usage=usage)
        elif isinstance(event, ErrorEvent):
            kind = "server_error" if event.message.startswith("internal error") else "invalid_request_error"
            session.error(event.message, code="response_failed", kind=kind)
            self.finish(response, "failed", details={"type": "failed", "error": {"type": kind,
                                                                                 "code": "response_failed",
                                                                                 "message": event.message}})

    def send_audio(self, response: Response, data: bytes) -> None:
        """One ``response.output_audio.delta`` (none for no bytes)."""
        if data:
            delta = base64.b64encode(data).decode("ascii")
            self.session.send({"type": "response.output_audio.delta", **response.where(), "delta": delta})

    # ------------------------------------------------------------------ ending

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
        if self.session.plays_audio:
            self.clear_played_audio()
        self.finish(response, "cancelled", details={"type": "cancelled", "reason": reason})

    def clear_played_audio(self) -> None:
        """A media track stops playing at once: the running answer's audio counts what it really played."""
        played_ms = self.session.output.stop_playing()
        response = self.response
        if response is not None:
            response.audio_samples = min(response.audio_samples, played_ms * PROTOCOL_SAMPLE_RATE // 1000)
        self.session.send({"type": "output_audio_buffer.cleared",
                           **({"response_id": response.id} if response is not None else {})})

    def finish(self, response: Response, status: str, text: str | None = None, details: Any = None,
               usage: Any = None) -> None:
        if response.finished:
            return
        response.finished = True
        # The item record outlives the answer; the engine job (with the question's audio) need not.
        response.job = None
        if self.response is response:
            self.response = None
            self.session.turns.resume_idle(response.audio_samples)
        text = "".join(response.text) if text is None else text
        record = self.conversation.items.get(response.item_id)
        if record is not None:
            record.transcript = text
            record.audio_ms = response.audio_samples * 1000 // PROTOCOL_SAMPLE_RATE
        self.say_done(response, status, text, details, usage)

    def say_done(self, response: Response, status: str, text: str, details: Any, usage: Any) -> None:
        """The events that close a response, ``response.done`` last."""
        send, where = self.session.send, response.where()
        if response.audio_out:
            send({"type": "response.output_audio.done", **where})
            send({"type": "response.output_audio_transcript.done", **where, "transcript": text})
        else:
            send({"type": "response.output_text.done", **where, "text": text})
        send({"type": "response.content_part.done", **where, "part": response.part(text)})
        item = response.item("completed" if status == "completed" else "incomplete", text)
        send({"type": "response.output_item.done", "response_id": response.id, "output_index": 0, "item": item})
        if response.in_conversation:
            send({"type": "conversation.item.done", "item": item})
        send({"type": "response.done", "response": response.response_object(
            self.session.conversation_id, status, [item], details=details, usage=usage)})

    def stop(self) -> None:
        """The session is closing: the running and the prepared answer stop at once."""
        if self.response is not None and self.response.job is not None:
            self.response.job.cancel()
        self.drop_speculation()
        self.response = None

    # ------------------------------------------------------------------ interruptions

    async def on_item_truncate(self, event: dict[str, Any]) -> None:
        """The client played only ``audio_end_ms`` of an answer: its transcript is cut to match."""
        item_id, content_index, end = event.get("item_id"), event.get("content_index", 0), event.get("audio_end_ms")
        record = self.conversation.items.get(item_id) if isinstance(item_id, str) else None
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
        self.session.send({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                           "audio_end_ms": end})
