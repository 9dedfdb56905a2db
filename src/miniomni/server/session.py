"""One answer as the engine runs it (:class:`Session`), and what goes in and out of it."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..generate import AnswerState, SamplingOptions
from ..streaming import AnswerEvents, AudioChunk, StreamEvent

if TYPE_CHECKING:
    from .engine import Engine


def _discard(event: object) -> None:
    """The emit of a session that has said all it will say."""


@dataclass
class ErrorEvent:
    """The answer failed; ``message`` says why (for the client)."""

    message: str


@dataclass
class AnswerRequest:
    """One question: audio (an array at ``sample_rate``, bytes or a file) or text, and how to answer."""

    task: str | None = None
    audio: Any = None
    text: str | None = None
    sample_rate: int | None = None
    max_new_tokens: int | None = None
    options: SamplingOptions = field(default_factory=SamplingOptions)
    max_chunk: int = 16  # frames per audio chunk once streaming is under way
    transcribe: bool = False  # also transcribe the spoken question, in a row beside the answer


@dataclass
class TranscriptDelta:
    """New text of the question's transcript (asked for with ``AnswerRequest.transcribe``)."""

    text: str


@dataclass
class TranscriptDone:
    """The question's whole transcript."""

    text: str


@dataclass
class TranscriptFailed:
    """The question could not be transcribed; ``message`` says why."""

    message: str


class Session:
    """A running answer. Events reach ``emit`` from the compute thread (held ones: from :meth:`release`)."""

    _ids = itertools.count(1)

    def __init__(self, engine: Engine, request: AnswerRequest, emit: Callable[[StreamEvent | ErrorEvent], None],
                 hold: bool = False) -> None:
        self.id = next(self._ids)
        self.engine = engine
        self.request = request
        self._emit = emit
        self.started = engine.clock()
        self.cancelled = threading.Event()
        self.closed = threading.Event()  # set once the last event has been emitted
        self.slot: int | None = None
        self.slot_free = False  # the slot went back to the engine (the rows stay valid until dropped)
        self.job: Generator | None = None
        self.state: AnswerState | None = None
        self.events: AnswerEvents | None = None
        self.held = hold
        self._held_events: list[StreamEvent | ErrorEvent] = []
        self._lock = threading.Lock()
        self.released_at: float | None = None if hold else self.started
        self.finished_while_held = False
        self.queued_at = self.started  # when its preparation could have begun
        self.first_audio_at: float | None = None  # when the first audio reached emit
        self.audio_out = 0.0  # seconds of audio that reached emit
        self.transcript: Session | None = None  # the row transcribing the question, beside this answer
        self.transcript_hidden: torch.Tensor | None = None
        self.is_transcript = False
        self.answer: Session | None = None  # for a transcript row: the answer it transcribes the question of

    def cancel(self, keep_transcript: bool = False) -> None:
        """Stop within one decode step (or one preparation block); the slot is free for a new answer at once.

        (Its rows are only written again by the compute thread once this session has been dropped.)
        The question's transcript row stops too, unless ``keep_transcript`` (an answer
        interrupted by its listener: what they said is still wanted) and it is already decoding.
        """
        self.cancelled.set()
        self.engine._release_slot(self)
        transcript = self.transcript
        if transcript is not None and not (keep_transcript and transcript.state is not None):
            transcript.cancel()
        self.engine._wake()

    def release(self) -> None:
        """A held session goes public: its waiting events are emitted, later ones flow as they come."""
        with self._lock:
            if not self.held:
                return
            self.held = False
            self.released_at = self.engine.clock()
            waiting, self._held_events = self._held_events, []
            for event in waiting:
                self._deliver(event)
        self.engine._on_release(self)
        if self.closed.is_set():
            self.unlink()

    def unlink(self) -> None:
        """Let go of what a finished session holds, and of its emit once nothing more will go through it.

        Callers' emit callbacks often point back at the session (a connection's response
        holds it): a reference cycle that Python's collector frees only now and then, with
        an answer's codec state, tokens and features in it (about 20 MB an answer, measured).
        """
        self.job = None
        self.transcript_hidden = None
        with self._lock:
            if self.held and not self.cancelled.is_set():
                return  # its waiting events need the emit until release
            if self.cancelled.is_set():
                self._held_events = []
            transcript = self.transcript
            if transcript is not None and not transcript.closed.is_set():
                return  # the transcript still speaks through this session's emit
            self._emit = _discard
            self.events = None
        if self.answer is not None:  # a transcript row: its answer may have been waiting for it
            answer, self.answer = self.answer, None
            answer.transcript = None
            if answer.closed.is_set():
                answer.unlink()

    def lead(self, now: float) -> float:
        """Seconds of audio the listener has beyond real time (inf before the first audio)."""
        if self.first_audio_at is None:
            return float("inf")
        return self.audio_out - (now - self.first_audio_at)

    def emit(self, event: StreamEvent | ErrorEvent) -> None:
        with self._lock:
            if self.held:
                self._held_events.append(event)
            else:
                self._deliver(event)

    def _deliver(self, event: StreamEvent | ErrorEvent) -> None:
        if isinstance(event, AudioChunk):
            if self.first_audio_at is None:
                self.first_audio_at = self.engine.clock()
            self.audio_out += len(event.audio) / event.sample_rate
        self._emit(event)


@dataclass
class EngineStats:
    """What the engine counts of its steps and sessions (the server's metrics read them)."""

    steps: int = 0
    step_seconds_total: float = 0.0
    last_step_ms: float = 0.0
    job_seconds_total: float = 0.0
    first_audio_ms_total: float = 0.0
    first_audio_count: int = 0
    answers_started: int = 0
    answers_finished: int = 0
    answers_failed: int = 0
    rejected_busy: int = 0
    speculative_started: int = 0
    speculative_used: int = 0
    speculative_dropped: int = 0
