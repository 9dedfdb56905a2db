"""Server-side voice activity detection for ``/v1/realtime``: Silero VAD over streamed 24 kHz PCM.

The model is the TorchScript Silero VAD shipped inside the ``silero-vad`` package (no
download). It scores 512-sample windows of 16 kHz audio; incoming 24 kHz audio is
resampled with a streaming soxr resampler, so chunk boundaries leave no seams.
Speech starts when a window's probability reaches ``threshold`` and stops after
``silence_duration_ms`` of windows below ``threshold - 0.15`` (Silero's own hysteresis).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np
import soxr
import torch

VAD_SAMPLE_RATE = 16000
WINDOW = 512  # samples at 16 kHz: 32 ms
HYSTERESIS = 0.15  # speech goes on while the probability stays above threshold - 0.15

_import_lock = threading.Lock()


class VADUnavailable(RuntimeError):
    """The silero-vad package is not installed."""


def load_silero() -> torch.jit.ScriptModule:
    """A fresh Silero VAD model (it keeps state between windows: one per stream).

    Importing ``silero_vad`` calls ``torch.set_num_threads(1)`` for the whole process; the
    thread count is put back so the decode engine keeps its threads.
    """
    with _import_lock:
        threads = torch.get_num_threads()
        try:
            from silero_vad import load_silero_vad
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise VADUnavailable(
                "server VAD needs the silero-vad package: pip install 'miniomni[server]'"
            ) from exc
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    with warnings.catch_warnings():  # its loader uses APIs that importlib and torch now deprecate
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad()


def vad_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("silero_vad") is not None
    except (ImportError, ValueError):  # pragma: no cover
        return False


@dataclass
class VADEvent:
    """``kind`` is "speech_started" or "speech_stopped"; ``sample`` is a 16 kHz sample index
    from the start of the stream (speech start: the first speech window; stop: where the
    silence period ended)."""

    kind: str
    sample: int

    @property
    def ms(self) -> int:
        return self.sample * 1000 // VAD_SAMPLE_RATE


class StreamingVAD:
    """Feed float32 audio chunks at ``input_rate``; get speech start/stop events back.

    Not thread-safe: call :meth:`process` from one thread at a time (the server awaits each
    call before the next). ``model`` defaults to a freshly loaded Silero VAD.
    """

    def __init__(self, threshold: float = 0.5, silence_duration_ms: int = 500, input_rate: int = 24000,
                 model: torch.jit.ScriptModule | None = None) -> None:
        self.threshold = float(threshold)
        self.silence_samples = int(silence_duration_ms) * VAD_SAMPLE_RATE // 1000
        self.input_rate = input_rate
        self.model = model if model is not None else load_silero()
        self._resampler = self._new_resampler()
        self._pending = np.zeros(0, dtype=np.float32)
        self.position = 0  # 16 kHz samples scored so far
        self.speaking = False
        self._silence_start: int | None = None
        self.last_probability = 0.0

    def _new_resampler(self) -> soxr.ResampleStream | None:
        if self.input_rate == VAD_SAMPLE_RATE:
            return None
        return soxr.ResampleStream(self.input_rate, VAD_SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def configure(self, threshold: float, silence_duration_ms: int) -> None:
        self.threshold = float(threshold)
        self.silence_samples = int(silence_duration_ms) * VAD_SAMPLE_RATE // 1000

    def reset(self) -> None:
        """Forget the speech state (not the stream position): after a buffer clear or a commit."""
        self.model.reset_states()
        self.speaking = False
        self._silence_start = None

    def end_speech(self) -> None:
        """The turn was ended from outside (a manual commit, a full buffer)."""
        self.speaking = False
        self._silence_start = None

    @torch.inference_mode()
    def process(self, audio: np.ndarray) -> list[VADEvent]:
        """Score the new audio; events in order of their position in the stream."""
        audio = np.asarray(audio, dtype=np.float32)
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio)
        self._pending = np.concatenate([self._pending, audio]) if self._pending.size else audio
        events: list[VADEvent] = []
        offset = 0
        while self._pending.size - offset >= WINDOW:
            window = torch.from_numpy(np.ascontiguousarray(self._pending[offset : offset + WINDOW]))
            offset += WINDOW
            probability = float(self.model(window, VAD_SAMPLE_RATE).item())
            self.last_probability = probability
            start = self.position
            self.position += WINDOW
            if probability >= self.threshold:
                self._silence_start = None
                if not self.speaking:
                    self.speaking = True
                    events.append(VADEvent("speech_started", start))
            elif self.speaking and probability < self.threshold - HYSTERESIS:
                if self._silence_start is None:
                    self._silence_start = start
                if self.position - self._silence_start >= self.silence_samples:
                    self.speaking = False
                    self._silence_start = None
                    events.append(VADEvent("speech_stopped", self.position))
        self._pending = self._pending[offset:].copy() if offset else self._pending
        return events
