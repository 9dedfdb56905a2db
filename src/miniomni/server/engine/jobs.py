"""One answer as the engine runs it (:class:`AnswerJob`), and what goes in and out of it."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ...generate import AnswerState, SamplingOptions
from ...streaming import AnswerEvents, AudioChunk, StreamEvent


def _discard(event: object) -> None:
    """The emit of a job that has said all it will say."""


class JobOwner(Protocol):
    """What a job tells the one who runs it (the engine)."""

    def clock(self) -> float:
        """Now, in the owner's seconds."""

    def return_slot(self, job: AnswerJob) -> None:
        """The job's cache rows may be given to a new answer (idempotent)."""

    def wake(self) -> None:
        """Something changed that the compute loop should look at."""

    def job_released(self, job: AnswerJob) -> None:
        """A held (speculative) job went public."""


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


class AnswerJob:
    """A running answer. Events reach ``emit`` from the compute thread (held ones: from :meth:`release`)."""

    _ids = itertools.count(1)

    def __init__(self, owner: JobOwner, request: AnswerRequest, emit: Callable[[StreamEvent | ErrorEvent], None],
                 hold: bool = False) -> None:
        self.id = next(self._ids)
        self.owner = owner
        self.request = request
        self._emit = emit
        self.started = owner.clock()
        self.cancelled = threading.Event()
        self.closed = threading.Event()  # set once the last event has been emitted
        self.slot: int | None = None
        self.slot_free = False  # the slot went back to the engine (the rows stay valid until dropped)
        self.work: Generator | None = None  # its preparation, one block per step (compute thread)
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
        self.transcript: AnswerJob | None = None  # the row transcribing the question, beside this answer
        self.transcript_hidden: torch.Tensor | None = None
        self.is_transcript = False
        self.answer: AnswerJob | None = None  # for a transcript row: the answer it transcribes the question of

    def cancel(self, keep_transcript: bool = False) -> None:
        """Stop within one decode step (or one preparation block); the slot is free for a new answer at once.

        (Its rows are only written again by the compute thread once this job has been dropped.)
        The question's transcript row stops too, unless ``keep_transcript`` (an answer
        interrupted by its listener: what they said is still wanted) and it is already decoding.
        """
        self.cancelled.set()
        self.owner.return_slot(self)
        transcript = self.transcript
        if transcript is not None and not (keep_transcript and transcript.state is not None):
            transcript.cancel()
        self.owner.wake()

    def release(self) -> None:
        """A held job goes public: its waiting events are emitted, later ones flow as they come."""
        with self._lock:
            if not self.held:
                return
            self.held = False
            self.released_at = self.owner.clock()
            waiting, self._held_events = self._held_events, []
            for event in waiting:
                self._deliver(event)
        self.owner.job_released(self)
        if self.closed.is_set():
            self.unlink()

    def unlink(self) -> None:
        """Let go of what a finished job holds, and of its emit once nothing more will go through it.

        Callers' emit callbacks often point back at the job (a connection's response
        holds it): a reference cycle that Python's collector frees only now and then, with
        an answer's codec state, tokens and features in it (about 20 MB an answer, measured).
        """
        self.work = None
        self.transcript_hidden = None
        with self._lock:
            if self.held and not self.cancelled.is_set():
                return  # its waiting events need the emit until release
            if self.cancelled.is_set():
                self._held_events = []
            transcript = self.transcript
            if transcript is not None and not transcript.closed.is_set():
                return  # the transcript still speaks through this job's emit
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
                self.first_audio_at = self.owner.clock()
            self.audio_out += len(event.audio) / event.sample_rate
        self._emit(event)
