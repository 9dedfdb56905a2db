"""Typed events of a streamed answer, and incremental text detokenization."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np



@dataclass
class TextDelta:
    """New answer text since the previous delta."""

    text: str


@dataclass
class AudioChunk:
    """24 kHz mono float32 samples; ``start`` is the index of the first one in the whole answer."""

    audio: np.ndarray
    start: int
    sample_rate: int = 24000


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
