"""Many answers on one loaded model, scheduled on one compute thread.

Every piece of model work runs on a single compute thread that uses all of the machine's
cores for each operation, so no two computations ever fight over the cores. It interleaves:

* **decode steps**: one forward pass over the rows of every decoding answer (the KV cache
  has ``2 * max_answers`` rows; answer k holds rows 2k and 2k + 1, a batch-parallel
  answer uses both), each row at its own position; then each answer samples from its own
  rows and turns the step into events (text deltas, audio: SNAC runs here too);
* **preparation jobs**: reading a question's audio, the Whisper encoder and the prompt's
  prefill, one encoder or decoder block at a time (prefill fills a separate staging cache
  whose rows are copied into the answer's slot when it is done).

What runs next follows from how far each answer is ahead of its listener (:mod:`.policy`):
a newcomer's preparation only in the time the playing answers have to spare, and only
while one more answer keeps a step within real time, so a running answer never stutters
for it. Answers join between steps; a cancelled job is dropped before the next one and
its rows are free again.

A job opened with ``hold=True`` is speculative: it is prepared and decoded like any
other, but its events wait until :meth:`AnswerJob.release`; :meth:`AnswerJob.cancel` drops it
without a word. The server uses this to answer while the voice activity detector is
still making sure the user has finished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import torch

from ...audio import WHISPER_SAMPLE_RATE
from ...cooperative import within
from ...errors import MiniOmniError
from ...generate import MAX_POSITIONS, AnswerState, DecodeInput, Step, prefill_steps
from ...pipeline import MiniOmni
from ...streaming import Done, StreamEvent, TextDelta, Timings
from ...tokens import Task, audio_prompt, padding_ids
from .jobs import AnswerJob, AnswerRequest, ErrorEvent, TranscriptDelta, TranscriptDone, TranscriptFailed
from .policy import LEAD_FLOOR, MAX_WAIT, StepCosts, block_may_run
from .stats import EngineStats

log = logging.getLogger(__name__)

# A transcript of a spoken question ends at _eot; 448 tokens (Whisper's own limit for its
# 30 s window) bound one that does not.
TRANSCRIPT_TOKENS = 448


class EngineBusy(MiniOmniError):
    """Every job slot is taken."""


class Engine:
    """Owns the model while serving; ``open`` starts an answer and returns its :class:`AnswerJob`.

    With ``start=True`` the compute thread starts at once; with ``start=False`` the caller runs
    :meth:`run_forever` on a thread of its own (``miniomni serve`` uses the main thread, where
    PyTorch's many small operations run measurably faster than on other threads) or drives
    it with :meth:`run_once` (tests, with a scripted ``clock``).
    """

    def __init__(self, omni: MiniOmni, max_answers: int = 4, lead_floor: float = LEAD_FLOOR,
                 max_wait: float = MAX_WAIT, clock: Callable[[], float] = time.perf_counter,
                 start: bool = True, text_end: float | None = None) -> None:
        if max_answers < 1:
            raise ValueError("max_answers must be >= 1")
        if text_end is not None and not 0 < text_end <= 1:
            raise ValueError(f"text_end is a fraction of the answer's steps, in (0, 1]; got {text_end}")
        self.omni = omni
        self.max_answers = max_answers
        self.lead_floor = lead_floor
        self.max_wait = max_wait
        self.clock = clock
        # Benchmarks on random weights: every speech answer's text ends after this fraction of its steps.
        self.text_end = text_end
        self.device = omni.device
        self.cache = omni.model.new_cache(2 * max_answers, max_length=MAX_POSITIONS)
        self.staging = omni.model.new_cache(2, max_length=MAX_POSITIONS)  # prefill runs here
        self.free_slots = list(range(max_answers))
        self.jobs: dict[int, AnswerJob] = {}  # every open job
        self.preparing: deque[AnswerJob] = deque()  # waiting for or in preparation (compute thread)
        self.active: list[AnswerJob] = []  # decoding (compute thread)
        self.stats = EngineStats()
        self.unit_cost = 0.05  # expected seconds of a preparation block (a running average)
        self.step_costs = StepCosts()
        self.observers: list[Any] = []  # told of every step's duration and every answer's time to first audio
        self._incoming: deque[AnswerJob] = deque()
        self._shutdown: str | None = None  # set by request_shutdown: the message every open answer ends with
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._idle_ids = padding_ids(self.device)
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self.run_forever, name="miniomni-compute", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ public

    @property
    def active_answers(self) -> int:
        return len(self.jobs)

    @property
    def queued_answers(self) -> int:
        return sum(1 for s in list(self.jobs.values()) if s.state is None)

    def open(self, request: AnswerRequest, emit: Callable[[StreamEvent | ErrorEvent], None],
             hold: bool = False) -> AnswerJob:
        """Start answering; raises :class:`EngineBusy` when ``max_answers`` answers are running."""
        with self._lock:
            if self._shutdown is not None:
                raise EngineBusy(self._shutdown)
            if not self.free_slots:
                if not hold:
                    self.stats.rejected_busy += 1
                raise EngineBusy(f"all {self.max_answers} answer slots are busy; try again when one has finished")
            job = AnswerJob(self, request, emit, hold=hold)
            job.slot = self.free_slots.pop(0)
            self.jobs[job.id] = job
            refused = None
            if request.transcribe and request.audio is not None:
                if not self.free_slots:
                    refused = "every slot is busy: the question is answered but not transcribed"
                else:
                    job.transcript = self._transcript_job(job)
            if hold:
                self.stats.speculative_started += 1
            else:
                self.stats.answers_started += 1
            self._incoming.append(job)
        if refused is not None:
            job.emit(TranscriptFailed(refused))
        self.wake()
        return job

    def _transcript_job(self, answer: AnswerJob) -> AnswerJob:
        """The row that transcribes ``answer``'s question (task asr): prepared with it, its events go through it."""

        def forward(event: StreamEvent | ErrorEvent) -> None:
            if isinstance(event, TextDelta):
                answer.emit(TranscriptDelta(event.text))
            elif isinstance(event, Done):
                answer.emit(TranscriptDone(event.text))
            elif isinstance(event, ErrorEvent):
                answer.emit(TranscriptFailed(event.message))

        # Not capped by the answer's token limit: the transcript has its own.
        companion = AnswerJob(self, AnswerRequest(task="asr", max_new_tokens=TRANSCRIPT_TOKENS,
                                                options=answer.request.options), forward)
        companion.is_transcript = True
        companion.answer = answer
        companion.slot = self.free_slots.pop(0)
        self.jobs[companion.id] = companion
        return companion

    def close(self) -> None:
        """Stop computing (:meth:`run_forever` returns); open jobs are cancelled."""
        for job in list(self.jobs.values()):
            job.cancel()
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def warm_up(self, seconds: float = 1.0, steps: int = 40) -> Timings:
        """Answer a short silent question on this thread (``start=False`` only) and return its timings.

        The first answer pays for one-time set-up in PyTorch's kernels; this one takes that cost
        and measures what a step and the codec cost on this machine. Then two answers at once, so
        the engine knows what a step for one and for two costs before a talker comes. The counters
        start afresh.
        """
        if self._thread is not None:
            raise RuntimeError("warm_up runs the engine on the calling thread: create the engine with start=False")
        events: list[StreamEvent | ErrorEvent] = []
        silence = np.zeros(int(seconds * WHISPER_SAMPLE_RATE), dtype=np.float32)
        self.open(AnswerRequest(task="A1A2-batch", audio=silence, sample_rate=WHISPER_SAMPLE_RATE,
                                max_new_tokens=steps, max_chunk=4), events.append)
        while self.run_once():
            pass
        if not events or not isinstance(events[-1], Done):
            raise MiniOmniError(f"the warm-up answer failed: {events[-1] if events else 'no event'}")
        if self.max_answers > 1:  # two answers at once: what a step for two costs, before any talker needs it
            for _ in range(2):
                self.open(AnswerRequest(task="A1A2-batch", audio=silence, sample_rate=WHISPER_SAMPLE_RATE,
                                        max_new_tokens=steps, max_chunk=4), lambda event: None)
            self._admit()
            while self.preparing:  # both prepared first, so that every step takes both
                self._advance(self.preparing[0])
            while self.run_once():
                pass
        self.stats = EngineStats()
        return events[-1].timings

    def run_forever(self) -> None:
        """Compute until :meth:`close`: decode steps and preparation blocks, or wait for work."""
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if not self.run_once():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()

    # ------------------------------------------------------------------ the compute thread

    def wake(self) -> None:
        self._wakeup.set()

    def request_shutdown(self, message: str) -> None:
        """Every open answer ends with an :class:`ErrorEvent` saying ``message`` (safe from a signal handler)."""
        self._shutdown = message
        self.wake()

    def run_once(self) -> bool:
        """One scheduling decision: a decode step, a preparation block, or nothing (returns False)."""
        if self._shutdown is not None:
            self._admit()
            for job in list(self.jobs.values()):
                if not job.closed.is_set() and not job.cancelled.is_set():
                    job.cancel()
                    self._fail(job, MiniOmniError(self._shutdown))
        try:
            self._admit()
            self._drop_cancelled()
            job = self.preparing[0] if self.preparing else None
            if self.active and (job is None or not self._job_may_run()):
                self._step()
            elif job is not None:
                self._advance(job)
            else:
                return False
        except Exception:
            log.exception("decode step failed")
            for job in list(self.active):
                self.active.remove(job)
                self._fail(job, RuntimeError("the decode step failed"))
        return True

    def _job_may_run(self) -> bool:
        """Whether a preparation block runs now rather than a decode step (:func:`.policy.block_may_run`)."""
        now = self.clock()
        waiting = self.preparing[0]
        if self.active and not self.step_costs.room_for_one_more(len(self.active)):
            return False  # one more answer would slow every step past real time: wait for one to end
        return block_may_run(self.active, now, now - waiting.queued_at, self.unit_cost, self.lead_floor,
                             self.max_wait)

    def _admit(self) -> None:
        with self._lock:
            while self._incoming:
                job = self._incoming.popleft()
                job.work = within(torch.inference_mode, self._prepare(job))
                job.queued_at = self.clock()
                self.preparing.append(job)

    def _drop_cancelled(self) -> None:
        for job in [s for s in self.preparing if s.cancelled.is_set()]:
            self.preparing.remove(job)
            self.return_slot(job)
            self._forget(job)
            self._settle_transcript(job)
        for job in [s for s in self.active if s.cancelled.is_set()]:
            self.active.remove(job)
            self.return_slot(job)
            self._forget(job)

    def _settle_transcript(self, answer: AnswerJob) -> None:
        """A transcript row that will never decode (its answer stopped before it started) is let go."""
        companion = answer.transcript
        if companion is not None and companion not in self.active:
            companion.cancel()
            self.return_slot(companion)
            self._forget(companion)

    def _prepare(self, job: AnswerJob) -> Generator[None, None, torch.Tensor]:
        """The preparation job: the prompt (Whisper included), then its prefill into the staging cache."""
        request = job.request
        inputs = yield from self.omni.prepare_steps(request.task, audio=request.audio, text=request.text,
                                                    sample_rate=request.sample_rate)
        job.state = AnswerState(inputs, request.options, request.max_new_tokens, self.device)
        if self.text_end is not None and job.state.audio_out:
            job.state.text_end_step = max(1, round(self.text_end * job.state.budget))
        job.events = self.omni.answer_events(inputs, job.started, max_chunk=request.max_chunk)
        rows = job.state.rows
        hidden = yield from prefill_steps(self.omni.model, inputs.prompts.to(self.device), inputs,
                                          self.staging.rows(slice(0, rows)))
        length = inputs.prompt_length
        self._copy_staging(job.slot, rows, length)
        if job.transcript is not None and not job.transcript.cancelled.is_set():
            yield
            job.transcript_hidden = self._prepare_transcript(job.transcript, inputs)
        return hidden

    def _copy_staging(self, slot: int, rows: int, length: int, start_row: int = 0) -> None:
        """Staging rows [start_row, start_row + rows) -> the rows of ``slot``, positions [0, length)."""
        target = self.cache.rows(slice(2 * slot, 2 * slot + rows))
        for source, destination in zip(self.staging.keys + self.staging.values, target.keys + target.values,
                                       strict=True):
            destination[:, :, :length] = source[start_row : start_row + rows, :, :length]

    def _prepare_transcript(self, companion: AnswerJob, answer_inputs: DecodeInput) -> torch.Tensor:
        """The transcript row shares the question's Whisper features and prompt: all but the last position.

        Spoken prompts differ only in their last position, so the answer's prefill (in
        staging row 0) already holds the keys and values of the rest; only that one
        position is computed for the ``asr`` prompt.
        """
        frames = answer_inputs.audio_lengths[0]
        prompt = audio_prompt(frames, Task.ASR).unsqueeze(0).to(self.device)
        inputs = DecodeInput(Task.ASR, prompt, answer_inputs.audio_features[:1], [frames])
        companion.state = AnswerState(inputs, companion.request.options, companion.request.max_new_tokens,
                                      self.device)
        companion.events = self.omni.answer_events(inputs, companion.started)
        last = inputs.prompt_length - 1
        self._copy_staging(companion.slot, 1, last)
        position = torch.tensor([last], device=self.device)
        hidden = self.omni.model.hidden_states(prompt[:, :, last:], position, self.cache.rows(
            slice(2 * companion.slot, 2 * companion.slot + 1)), kv_len=last + 1)
        return hidden

    def _advance(self, job: AnswerJob) -> None:
        began = self.clock()
        try:
            next(job.work)
            done, hidden = False, None
        except StopIteration as finished:
            done, hidden = True, finished.value
        except Exception as exc:  # noqa: BLE001 - a bad question fails its own job only
            self.preparing.remove(job)
            self._fail(job, exc)
            self._settle_transcript(job)
            return
        finally:
            cost = self.clock() - began
            self.stats.job_seconds_total += cost
            self.unit_cost = 0.8 * self.unit_cost + 0.2 * cost
        if not done:
            return
        self.preparing.popleft()
        ready = [(job, hidden)]
        companion = job.transcript
        if companion is not None and companion.state is not None and not companion.cancelled.is_set():
            ready.append((companion, job.transcript_hidden))
        with torch.inference_mode():
            self._sample([s for s, _ in ready], {s.id: h for s, h in ready})
        for started, _ in ready:
            if started.state.finished:
                self._finish(started)
            else:
                self.active.append(started)
        self._settle_transcript(job)

    @torch.inference_mode()
    def _step(self) -> None:
        began = self.clock()
        # Only the rows up to the highest busy slot take part (the int8 kernel's cost grows with
        # the rows); idle rows among them are fed padding at position 0 of their own slot.
        total_rows = 2 * (max(job.slot for job in self.active) + 1)
        ids = self._idle_ids.repeat(total_rows, 1)
        positions = torch.zeros(total_rows, 1, dtype=torch.long, device=self.device)
        for job in self.active:
            rows = self._rows(job)
            ids[rows] = job.state.next_ids()
            positions[rows] = job.state.position
        # Each answer's rows read their own cache length: a row's arithmetic is then the same whatever
        # else is in the batch (with one cache length for all, attention rounds differently).
        segments = [(self._rows(job), job.state.position + 1) for job in self.active]
        hidden = self.omni.model.hidden_states(ids.unsqueeze(-1), positions, self.cache.rows(slice(0, total_rows)),
                                               kv_len=segments)
        answers = len(self.active)
        self._sample(list(self.active), {s.id: hidden[self._rows(s)] for s in self.active})
        for job in [s for s in self.active if s.state.finished]:
            self.active.remove(job)
            self._finish(job)
        elapsed = self.clock() - began
        self.step_costs.add(answers, elapsed)
        self.stats.steps += 1
        self.stats.step_seconds_total += elapsed
        self.stats.last_step_ms = elapsed * 1000
        for observer in self.observers:
            observer.step(elapsed)

    def _rows(self, job: AnswerJob) -> slice:
        return slice(2 * job.slot, 2 * job.slot + job.state.rows)

    def _sample(self, jobs: list[AnswerJob], hidden: dict[int, torch.Tensor]) -> None:
        """One sampled step for each job (the head rows of all of them in one product each), then its events."""
        model = self.omni.model
        text = [s for s in jobs if s.state.needs_text_head]
        audio = [s for s in jobs if s.state.needs_audio_head]
        text_logits = None
        if text:
            text_logits = model.text_logits(torch.cat([hidden[s.id][s.state.text_row, -1:] for s in text]))
        audio_logits = model.audio_logits(torch.cat([hidden[s.id][0, -1:] for s in audio])) if audio else None
        text_index = {s.id: i for i, s in enumerate(text)}
        audio_index = {s.id: i for i, s in enumerate(audio)}
        now = self.clock()
        for job in jobs:
            t = text_index.get(job.id)
            a = audio_index.get(job.id)
            step = job.state.advance(
                None if t is None else text_logits[t : t + 1],
                None if a is None else audio_logits[a],
            )
            self._post(job, step, now)

    def _post(self, job: AnswerJob, step: Step, when: float) -> None:
        """The step's events (text delta, audio once frames complete), and the end of the answer."""
        if job.cancelled.is_set():
            return
        try:
            events = job.events.on_step(step, when)
            if job.state.finished:
                events += job.events.finish()
                self._count_finished(job)  # before Done goes out: a client may stop the job on it
            for event in events:
                job.emit(event)
        except Exception as exc:  # noqa: BLE001 - e.g. an emit that fails: this job only
            job.cancel()
            self._fail(job, exc)

    def _count_finished(self, job: AnswerJob) -> None:
        if job.is_transcript:
            return
        with job._lock:
            if job.held:  # counted if it is released (see job_released)
                job.finished_while_held = True
                return
        self.stats.answers_finished += 1
        timings = job.events.timings
        if timings.first_audio_ms is not None:
            # From the answer's start, or from its release for one prepared in advance (then often 0).
            released = job.released_at if job.released_at is not None else self.clock()
            waited = max(0.0, timings.first_audio_ms / 1000 - (released - job.started))
            self._count_first_audio(waited)

    def _count_first_audio(self, seconds: float) -> None:
        self.stats.first_audio_ms_total += seconds * 1000
        self.stats.first_audio_count += 1
        for observer in self.observers:
            observer.first_audio(seconds)

    def _finish(self, job: AnswerJob) -> None:
        job.closed.set()
        self.return_slot(job)
        self._forget(job)

    def job_released(self, job: AnswerJob) -> None:
        with self._lock:
            self.stats.speculative_used += 1
            self.stats.answers_started += 1
            if job.finished_while_held:
                self.stats.answers_finished += 1
                self._count_first_audio(0.0)  # its audio was all there at release

    def _fail(self, job: AnswerJob, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, (MiniOmniError, ValueError)) else f"internal error: {exc!r}"
        if not isinstance(exc, (MiniOmniError, ValueError)):
            log.error("job %d failed: %r", job.id, exc, exc_info=exc)
        if job.transcript is not None and not job.transcript.closed.is_set():
            job.transcript.cancel()
            job.emit(TranscriptFailed(f"the question could not be answered: {message}"))
        if not job.is_transcript:
            self.stats.answers_failed += 1
        try:
            job.emit(ErrorEvent(message))
        finally:
            job.closed.set()
            self.return_slot(job)
            self._forget(job)

    def return_slot(self, job: AnswerJob) -> None:
        with self._lock:
            if job.slot is not None and not job.slot_free:
                job.slot_free = True
                self.free_slots.append(job.slot)
                self.free_slots.sort()

    def _forget(self, job: AnswerJob) -> None:
        with self._lock:
            if self.jobs.pop(job.id, None) is not None and job.held and job.cancelled.is_set():
                self.stats.speculative_dropped += 1
        job.closed.set()
        job.unlink()

