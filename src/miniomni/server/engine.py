"""Many answers on one loaded model: their decode steps run together in batched forward passes.

One decode thread owns the model and a KV cache of ``2 * max_sessions`` rows; session k
holds rows 2k and 2k+1 (a batch-parallel answer uses both, others one). Every step runs
one forward pass over the rows up to the highest busy slot (idle rows among them are fed
padding at position 0) with each row at its own position,
then each answer samples from its own rows. Sessions join (after their prefill) and leave
between steps; a cancelled session is dropped before the next step and its rows are free
again. Question preparation (audio decoding, Whisper) and answer post-processing (text
deltas, SNAC decoding) run on a helper thread so the decode thread only decodes.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MiniOmniError
from ..generate import MAX_POSITIONS, AnswerState, DecodeInput, SamplingOptions, prefill
from ..pipeline import MiniOmni
from ..streaming import AnswerEvents, Done, StreamEvent
from ..tokens import padding_ids

log = logging.getLogger(__name__)


class EngineBusy(MiniOmniError):
    """Every session slot is taken."""


@dataclass
class ErrorEvent:
    """The answer failed; ``message`` says why (for the client)."""

    message: str


@dataclass
class AnswerRequest:
    """One question: audio (16 kHz mono array) or text, and how to answer."""

    task: str | None = None
    audio: Any = None
    text: str | None = None
    sample_rate: int | None = None
    max_new_tokens: int | None = None
    options: SamplingOptions = field(default_factory=SamplingOptions)
    max_chunk: int = 16  # frames per audio chunk once streaming is under way


class Session:
    """A running answer. Events arrive through ``emit`` (called from the engine's threads)."""

    _ids = itertools.count(1)

    def __init__(self, engine: Engine, request: AnswerRequest, emit: Callable[[StreamEvent | ErrorEvent], None]) -> None:
        self.id = next(self._ids)
        self.engine = engine
        self.request = request
        self.emit = emit
        self.started = time.perf_counter()
        self.cancelled = threading.Event()
        self.closed = threading.Event()  # set once the last event has been emitted
        self.slot: int | None = None
        self.inputs: DecodeInput | None = None
        self.state: AnswerState | None = None
        self.events: AnswerEvents | None = None

    def cancel(self) -> None:
        """Stop within one decode step and free the rows."""
        self.cancelled.set()
        self.engine._wake()


@dataclass
class EngineStats:
    steps: int = 0
    step_seconds_total: float = 0.0
    last_step_ms: float = 0.0
    first_audio_ms_total: float = 0.0
    first_audio_count: int = 0
    answers_started: int = 0
    answers_finished: int = 0
    answers_failed: int = 0
    rejected_busy: int = 0


class Engine:
    """Owns the model while serving; ``open`` starts an answer and returns its :class:`Session`."""

    def __init__(self, omni: MiniOmni, max_sessions: int = 4) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.omni = omni
        self.max_sessions = max_sessions
        self.device = omni.device
        self.cache = omni.model.new_cache(2 * max_sessions, max_length=MAX_POSITIONS)
        self.free_slots = list(range(max_sessions))
        self.sessions: dict[int, Session] = {}  # every open session
        self.ready: queue.Queue[Session] = queue.Queue()  # prepared, waiting for prefill
        self.active: list[Session] = []  # decoding (decode thread only)
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="miniomni-helper")
        self._thread = threading.Thread(target=self._run, name="miniomni-decode", daemon=True)
        self._thread.start()
        self._idle_ids = padding_ids(self.device)

    # ------------------------------------------------------------------ public

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)

    @property
    def queued_sessions(self) -> int:
        return sum(1 for s in list(self.sessions.values()) if s.state is None)

    def open(self, request: AnswerRequest, emit: Callable[[StreamEvent | ErrorEvent], None]) -> Session:
        """Start answering; raises :class:`EngineBusy` when ``max_sessions`` answers are running."""
        with self._lock:
            if not self.free_slots:
                self.stats.rejected_busy += 1
                raise EngineBusy(
                    f"all {self.max_sessions} sessions are busy; try again when one has finished"
                )
            session = Session(self, request, emit)
            session.slot = self.free_slots.pop(0)
            self.sessions[session.id] = session
            self.stats.answers_started += 1
        self._helper.submit(self._prepare, session)
        return session

    def close(self) -> None:
        """Stop the threads; open sessions are cancelled."""
        for session in list(self.sessions.values()):
            session.cancel()
        self._stop.set()
        self._wake()
        self._thread.join(timeout=10)
        self._helper.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------- helper thread

    def _prepare(self, session: Session) -> None:
        request = session.request
        try:
            if session.cancelled.is_set():
                self._release(session)
                return
            inputs = self.omni.prepare(request.task, audio=request.audio, text=request.text,
                                       sample_rate=request.sample_rate)
            session.inputs = inputs
            session.events = self.omni.answer_events(inputs, session.started, max_chunk=request.max_chunk)
            self.ready.put(session)
            self._wake()
        except Exception as exc:  # noqa: BLE001 - every failure becomes the client's error event
            self._fail(session, exc)

    def _post(self, session: Session, step: Any, when: float, finished: bool) -> None:
        if session.cancelled.is_set():
            return
        try:
            events = session.events.on_step(step, when)
            if finished:
                events += session.events.finish()
            for event in events:
                session.emit(event)
                if isinstance(event, Done):
                    timings = session.events.timings
                    if timings.first_audio_ms is not None:
                        self.stats.first_audio_ms_total += timings.first_audio_ms
                        self.stats.first_audio_count += 1
            if finished:
                self.stats.answers_finished += 1
                session.closed.set()
        except Exception as exc:  # noqa: BLE001
            session.cancel()
            self._fail(session, exc)

    def _fail(self, session: Session, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, (MiniOmniError, ValueError)) else f"internal error: {exc!r}"
        if not isinstance(exc, (MiniOmniError, ValueError)):
            log.exception("session %d failed", session.id)
        self.stats.answers_failed += 1
        try:
            session.emit(ErrorEvent(message))
        finally:
            session.closed.set()
            if session.state is None:  # never reached the decode thread
                self._release(session)

    def _release(self, session: Session) -> None:
        with self._lock:
            if self.sessions.pop(session.id, None) is not None and session.slot is not None:
                self.free_slots.append(session.slot)
                self.free_slots.sort()
        session.closed.set()

    # ----------------------------------------------------------------- decode thread

    def _wake(self) -> None:
        self._wakeup.set()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._admit()
                self._drop_cancelled()
                if not self.active:
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                self._step()
            except Exception:  # noqa: BLE001 - keep serving; fail the sessions of this step
                log.exception("decode step failed")
                for session in list(self.active):
                    self.active.remove(session)
                    self._fail(session, RuntimeError("the decode step failed"))
                    self._release(session)

    def _rows(self, session: Session) -> slice:
        return slice(2 * session.slot, 2 * session.slot + session.state.rows)

    def _admit(self) -> None:
        while True:
            try:
                session = self.ready.get_nowait()
            except queue.Empty:
                return
            if session.cancelled.is_set():
                self._release(session)
                continue
            inputs = session.inputs
            try:
                with torch.inference_mode():
                    state = AnswerState(inputs, session.request.options, session.request.max_new_tokens, self.device)
                    rows = slice(2 * session.slot, 2 * session.slot + state.rows)
                    hidden = prefill(self.omni.model, inputs.prompts.to(self.device), inputs, self.cache.rows(rows))
                    session.state = state
                    self._sample([session], {session.id: hidden})
            except Exception as exc:  # noqa: BLE001
                session.state = None
                self._fail(session, exc)
                continue
            if session.state.finished:
                self._release_after_post(session)
            else:
                self.active.append(session)

    def _drop_cancelled(self) -> None:
        for session in list(self.active):
            if session.cancelled.is_set():
                self.active.remove(session)
                self._release(session)

    @torch.inference_mode()
    def _step(self) -> None:
        began = time.perf_counter()
        # Only the rows up to the highest busy slot take part (slots are handed out lowest
        # first): the int8 kernel's cost grows with the rows (0.14 ms per matrix at 2, 0.33 at 8).
        total_rows = 2 * (max(session.slot for session in self.active) + 1)
        ids = self._idle_ids.repeat(total_rows, 1)
        positions = torch.zeros(total_rows, 1, dtype=torch.long, device=self.device)
        for session in self.active:
            rows = self._rows(session)
            ids[rows] = session.state.next_ids()
            positions[rows] = session.state.position
        kv_len = int(positions.max()) + 1
        cache = self.cache.rows(slice(0, total_rows))
        hidden = self.omni.model.hidden_states(ids.unsqueeze(-1), positions, cache, kv_len=kv_len)
        self._sample(list(self.active), {s.id: hidden[self._rows(s)] for s in self.active})
        for session in list(self.active):
            if session.state.finished:
                self.active.remove(session)
                self._release_after_post(session)
        elapsed = time.perf_counter() - began
        self.stats.steps += 1
        self.stats.step_seconds_total += elapsed
        self.stats.last_step_ms = elapsed * 1000

    def _sample(self, sessions: list[Session], hidden: dict[int, torch.Tensor]) -> None:
        """One sampled step for each session, the head rows of all of them in one product each."""
        model = self.omni.model
        text = [s for s in sessions if s.state.needs_text_head]
        audio = [s for s in sessions if s.state.needs_audio_head]
        text_logits = model.text_logits(torch.cat([hidden[s.id][s.state.text_row, -1:] for s in text])) if text else None
        audio_logits = model.audio_logits(torch.cat([hidden[s.id][0, -1:] for s in audio])) if audio else None
        text_index = {s.id: i for i, s in enumerate(text)}
        audio_index = {s.id: i for i, s in enumerate(audio)}
        now = time.perf_counter()
        for session in sessions:
            t = text_index.get(session.id)
            a = audio_index.get(session.id)
            step = session.state.advance(
                None if t is None else text_logits[t : t + 1],
                None if a is None else audio_logits[a],
            )
            self._helper.submit(self._post, session, step, now, session.state.finished)

    def _release_after_post(self, session: Session) -> None:
        # Rows can be reused at once (post-processing holds no reference to the cache); the
        # session stays listed until its Done has been emitted.
        with self._lock:
            if session.slot is not None and session.slot not in self.free_slots and session.id in self.sessions:
                self.free_slots.append(session.slot)
                self.free_slots.sort()
                session.slot = None
        self._helper.submit(self._forget, session)

    def _forget(self, session: Session) -> None:
        with self._lock:
            self.sessions.pop(session.id, None)
