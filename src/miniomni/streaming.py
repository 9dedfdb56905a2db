"""A streamed answer: typed events, the token log of one answer, and the steps -> events conversion."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .audio import OUTPUT_SAMPLE_RATE
from .codec import Codec
from .generate import Step, answer_text_ids
from .snacstream import StreamingDecoder
from .tokens import NUM_AUDIO_LAYERS, Task, delayed_frame


@dataclass
class TextDelta:
    """New answer text since the previous delta."""

    text: str


@dataclass
class AudioChunk:
    """24 kHz mono float32 samples; ``start`` is the index of the first one in the whole answer."""

    audio: np.ndarray
    start: int
    sample_rate: int = OUTPUT_SAMPLE_RATE


@dataclass
class Timings:
    """Measured while streaming (milliseconds and ratios, wall clock)."""

    prepare_ms: float = 0.0  # audio load + log-mel + Whisper encoder (or text tokenization)
    first_token_ms: float = 0.0  # from the call to the first sampled step (prefill included)
    first_audio_ms: float | None = None  # from the call to the first audio sample handed out
    total_ms: float = 0.0
    steps: int = 0
    steps_per_second: float = 0.0  # decode steps after the first
    step_ms_median: float = 0.0
    audio_seconds: float = 0.0
    real_time_factor: float | None = None  # total compute time / audio duration
    codec_ms: float = 0.0  # time in the codec (SNAC decode), all chunks

    def as_dict(self) -> dict[str, float | int | None]:
        return dict(self.__dict__)


@dataclass
class Done:
    """The end of a streamed answer: the whole text, every sampled token, the timings."""

    text: str
    text_tokens: list[int]
    audio_tokens: list[list[int]]
    task: str
    prompt_length: int
    timings: Timings = field(default_factory=Timings)


StreamEvent = TextDelta | AudioChunk | Done


class TextStreamer:
    """Turns the growing list of answer text ids into deltas that add up to the final stripped text.

    Byte-level BPE pieces can end inside a multi-byte character; such a tail decodes to
    U+FFFD and is held back until the next piece completes it. Leading and trailing
    white space is held back too, so the deltas add up to ``decode(ids).strip()``.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.sent = ""

    def update(self, ids: list[int]) -> str:
        """The new text since the last call, given all answer ids so far."""
        self.ids = list(ids)
        text = self._decode(self.ids).strip()
        while text.endswith("\ufffd"):
            text = text[:-1]
        if not text.startswith(self.sent):
            return ""  # a later piece changed earlier characters; wait for the final flush
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        """Whatever is still held back once the text is complete."""
        text = self._decode(self.ids).strip()
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


class AnswerTokens:
    """Every token sampled for one answer, in ``--tokens-out`` order, and how the answer ended."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.text: list[int] = []
        self.audio: list[list[int]] = [[] for _ in range(NUM_AUDIO_LAYERS)] if task.audio_output else []
        self.ended_on_eoa = False

    def add(self, step: Step) -> None:
        self.text.append(step.text)
        self.ended_on_eoa = step.end == "eoa"
        if step.audio is not None:
            for layer, token in enumerate(step.audio):
                self.audio[layer].append(token)

    def answer_text_ids(self) -> list[int]:
        """The ids of the answer text so far (see :func:`generate.answer_text_ids`)."""
        return answer_text_ids(self.task, self.text, self.ended_on_eoa)

    def frame(self, k: int) -> list[int] | None:
        """Audio frame ``k`` once it is complete (None while incomplete or if it holds a special id)."""
        if len(self.text) < k + NUM_AUDIO_LAYERS + 1:
            return None
        return delayed_frame(self.audio, k)


class AnswerEvents:
    """Turns the sampled steps of one answer into stream events (text deltas, audio chunks, Done).

    Shared by :meth:`MiniOmni.stream` and the server, which calls it off the decode thread.
    ``detokenize`` turns text ids into text; times are measured from ``started`` (when the
    question was in hand).
    """

    def __init__(self, task: Task, prompt_length: int, codec: Codec, detokenize: Callable[[list[int]], str],
                 started: float, first_chunk: int = 1, max_chunk: int = 16) -> None:
        self.task = task
        self.prompt_length = prompt_length
        self.codec = codec
        self.detokenize = detokenize
        self.started = started
        self.timings = Timings(prepare_ms=(time.perf_counter() - started) * 1000)
        self.streamer = TextStreamer(detokenize)
        self.tokens = AnswerTokens(task)
        self.decoder = StreamingDecoder(codec, first_chunk=first_chunk, max_chunk=max_chunk)
        self.audio_done = False
        self.samples_out = 0
        self.step_times: list[float] = []
        self._last_step: float | None = None
        self._codec_seconds = 0.0

    def on_step(self, step: Step, when: float | None = None) -> list[StreamEvent]:
        """Events for one sampled step; ``when`` is when it was sampled (default: now)."""
        when = time.perf_counter() if when is None else when
        if step.index == 0:
            self.timings.first_token_ms = (when - self.started) * 1000
        elif self._last_step is not None:
            # Codec work done in between, on this thread, is not decode-step time.
            self.step_times.append(when - self._last_step - self._codec_seconds)
        self._last_step, self._codec_seconds = when, 0.0
        events: list[StreamEvent] = []
        self.tokens.add(step)
        delta = self.streamer.update(self.tokens.answer_text_ids())
        if delta:
            events.append(TextDelta(delta))
        if step.audio is None or self.audio_done:
            return events
        frame_index = step.index - NUM_AUDIO_LAYERS
        if frame_index >= 0:
            frame = self.tokens.frame(frame_index)
            if frame is None:
                self.audio_done = True
            else:
                self.decoder.push(frame)
                events += self._chunk(final=False)
        return events

    def _chunk(self, final: bool) -> list[StreamEvent]:
        began = time.perf_counter()
        chunk = self.decoder.pull(final=final)
        spent = time.perf_counter() - began
        self._codec_seconds += spent
        self.timings.codec_ms += spent * 1000
        if chunk is None or len(chunk) == 0:
            return []
        if self.timings.first_audio_ms is None:
            self.timings.first_audio_ms = (time.perf_counter() - self.started) * 1000
        event = AudioChunk(chunk, self.samples_out, self.codec.sample_rate)
        self.samples_out += len(chunk)
        return [event]

    def finish(self) -> list[StreamEvent]:
        """The last audio and text, then Done."""
        events: list[StreamEvent] = self._chunk(final=True) if self.task.audio_output else []
        tail = self.streamer.flush()
        if tail:
            events.append(TextDelta(tail))
        t = self.timings
        t.total_ms = (time.perf_counter() - self.started) * 1000
        t.steps = len(self.tokens.text)
        if self.step_times:
            t.step_ms_median = float(np.median(self.step_times) * 1000)
            t.steps_per_second = len(self.step_times) / max(sum(self.step_times), 1e-9)
        t.audio_seconds = self.samples_out / self.codec.sample_rate
        if self.samples_out:
            t.real_time_factor = t.total_ms / 1000 / t.audio_seconds
        events.append(Done(
            text=self.detokenize(self.tokens.answer_text_ids()).strip(),
            text_tokens=self.tokens.text,
            audio_tokens=self.tokens.audio,
            task=self.task.value,
            prompt_length=self.prompt_length,
            timings=t,
        ))
        return events
