"""Transcripts of a session's spoken user turns: the model's asr task on its own, or a row beside the answer."""

from __future__ import annotations

import contextlib
from typing import Any

from ...streaming import Done, TextDelta
from ..engine import (
    TRANSCRIPT_TOKENS,
    AnswerJob,
    AnswerRequest,
    EngineBusy,
    ErrorEvent,
    TranscriptDelta,
    TranscriptDone,
    TranscriptFailed,
)
from .context import SessionContext
from .conversation import Conversation, ItemRecord
from .protocol import PROTOCOL_SAMPLE_RATE, UserInput


class Transcripts:
    """The ``conversation.item.input_audio_transcription.*`` events of one session."""

    def __init__(self, session: SessionContext, conversation: Conversation) -> None:
        self.session = session
        self.conversation = conversation
        self.running: dict[str, AnswerJob] = {}  # user item id -> its standalone transcription

    def transcribe(self, user: UserInput) -> None:
        """Transcribe a spoken user turn on its own (the model's asr task); events carry its item id."""
        request = AnswerRequest(task="asr", audio=user.audio, sample_rate=PROTOCOL_SAMPLE_RATE,
                                max_new_tokens=TRANSCRIPT_TOKENS)
        item_id = user.item_id
        user.transcribed = True
        try:
            self.running[item_id] = self.session.engine.open(request, lambda ev: self.from_engine(item_id, ev))
        except EngineBusy as exc:
            self.on_transcript(item_id, TranscriptFailed(str(exc)))

    def from_engine(self, item_id: str, event: Any) -> None:
        """Called on the compute thread with a standalone transcription's events."""
        if isinstance(event, TextDelta):
            event = TranscriptDelta(event.text)
        elif isinstance(event, Done):
            event = TranscriptDone(event.text)
        elif isinstance(event, ErrorEvent):
            event = TranscriptFailed(event.message)
        with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down)
            self.session.loop.call_soon_threadsafe(self.on_transcript, item_id, event)

    def on_transcript(self, item_id: str, event: Any) -> None:
        """A transcript event of the user turn ``item_id`` (from its own transcription or its answer's row)."""
        session = self.session
        if session.closing:
            return
        where = {"item_id": item_id, "content_index": 0}
        if isinstance(event, TranscriptDelta):
            session.send({"type": "conversation.item.input_audio_transcription.delta", **where, "delta": event.text})
            return
        self.running.pop(item_id, None)
        if isinstance(event, TranscriptDone):
            record = self.conversation.items.get(item_id)
            if record is None:
                self.conversation.remember(item_id, ItemRecord("user", transcript=event.text))
            else:
                record.transcript = event.text
            session.send({"type": "conversation.item.input_audio_transcription.completed", **where,
                          "transcript": event.text})
        elif isinstance(event, TranscriptFailed):
            session.send({"type": "conversation.item.input_audio_transcription.failed", **where, "error": {
                "type": "transcription_error", "code": "transcription_failed", "message": event.message,
                "param": None}})

    def cancel(self) -> None:
        """Stop every standalone transcription (the session is closing)."""
        for job in self.running.values():
            job.cancel()
        self.running.clear()
