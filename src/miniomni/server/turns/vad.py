"""Server-side voice activity detection for ``/v1/realtime``: Silero VAD over streamed 24 kHz PCM.

The weights are those of the TorchScript Silero VAD shipped inside the ``silero-vad``
package (no download). The network is small (an STFT, four convolutions, an LSTM cell)
and runs here in NumPy, on the event loop: the compute thread is then the only one that
runs PyTorch, so nothing competes with it for PyTorch's worker threads. It scores
512-sample windows of 16 kHz audio, each seen with the 64 samples before it, and carries
a recurrent state from window to window; its probabilities equal the TorchScript model's
within 1e-5 (tested). The weights are loaded once per process and shared: each stream
keeps only its own state and context (a few kB). Incoming 24 kHz audio is resampled with a
streaming soxr resampler, so chunk boundaries leave no seams. Speech starts when a
window's probability reaches ``threshold`` and stops after ``silence_duration_ms`` of
windows below ``threshold - 0.15`` (Silero's own hysteresis).

Silero's probability stays high for 100 to 200 ms after the last word (its recurrent state
lags). Where the room is quiet enough to tell (the speech at least :data:`MIN_SNR_DB` above
the room's level, measured while nobody speaks), the silence is dated from the second of the
windows where the audio has fallen to the room's level instead. It is reported after
:data:`QUIET_WINDOWS` such windows and withdrawn if the sound comes back; if Silero has not
agreed within :data:`MAX_LAG_WINDOWS` windows, the speaker is taken to be speaking softly
(the level is not used again in that utterance). The turn still ends only once Silero hears
the silence. So ``silence_duration_ms`` counts silence as the listener hears it.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np
import soxr
import torch

from ...errors import install_hint

VAD_SAMPLE_RATE = 16000
WINDOW = 512  # samples at 16 kHz: 32 ms
CONTEXT = 64  # samples of the previous window the model sees with each window
STATE_SHAPE = (2, 1, 128)  # the model's recurrent state, per stream
HYSTERESIS = 0.15  # speech goes on while the probability stays above threshold - 0.15
QUIET_DB = 6.0  # a window at most this far above the room's level is quiet
MIN_SNR_DB = 15.0  # the level is used only for speech at least this far above the room's
QUIET_WINDOWS = 2  # quiet windows in a row that begin a silence before Silero hears it
MAX_LAG_WINDOWS = 10  # Silero agrees within this many windows, or the quiet was soft speech

_import_lock = threading.Lock()
_shared: SileroNetwork | None = None


class VADUnavailable(RuntimeError):
    """The silero-vad package is not installed."""


def level_db(window: np.ndarray) -> float:
    """A window's mean power in dB relative to full scale."""
    return 10.0 * float(np.log10(np.mean(np.square(window, dtype=np.float64)) + 1e-12))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SileroNetwork:
    """Silero VAD's 16 kHz network.

    ``(windows with their context (B, 576), state (2, B, 128)) -> (probabilities (B,), state)``.
    """

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.stft = weights["stft.forward_basis_buffer"][:, 0, :].T.copy()  # (256, 258): real, then imaginary rows
        self.convs = []
        for index, stride in enumerate((1, 2, 2, 1)):
            weight = weights[f"encoder.{index}.reparam_conv.weight"]
            out_channels, in_channels, kernel = weight.shape
            # (out, in, k) -> (out, k * in), to multiply with the k shifted copies of the input stacked
            self.convs.append((weight.transpose(0, 2, 1).reshape(out_channels, kernel * in_channels),
                               weights[f"encoder.{index}.reparam_conv.bias"][:, None], kernel, stride))
        self.w_ih, self.w_hh = weights["decoder.rnn.weight_ih"].T.copy(), weights["decoder.rnn.weight_hh"].T.copy()
        self.b_lstm = weights["decoder.rnn.bias_ih"] + weights["decoder.rnn.bias_hh"]
        self.w_out = weights["decoder.decoder.2.weight"][:, :, 0].T.copy()
        self.b_out = weights["decoder.decoder.2.bias"]

    def __call__(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.pad(x, ((0, 0), (0, 64)), mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(x, 256, axis=1)[:, ::128]  # (B, 4, 256)
        spectrum = frames @ self.stft
        h = np.sqrt(spectrum[..., :129] ** 2 + spectrum[..., 129:] ** 2).transpose(0, 2, 1)  # (B, 129, 4)
        for weight, bias, kernel, stride in self.convs:
            pad, length = kernel // 2, h.shape[-1]
            padded = np.pad(h, ((0, 0), (0, 0), (pad, pad)))
            shifted = np.concatenate([padded[:, :, j : j + length : stride] for j in range(kernel)], axis=1)
            h = np.maximum(weight @ shifted + bias, 0.0)
        h = h[:, :, 0]  # (B, 128): one step in time left
        hx, cx = state[0], state[1]
        gates = h @ self.w_ih + hx @ self.w_hh + self.b_lstm
        i, f, g, o = np.split(gates, 4, axis=1)
        c = _sigmoid(f) * cx + _sigmoid(i) * np.tanh(g)
        hx = _sigmoid(o) * np.tanh(c)
        probability = _sigmoid(np.maximum(hx, 0.0) @ self.w_out + self.b_out)[:, 0]
        return probability, np.stack([hx, c])


def shared_silero() -> SileroNetwork:
    """The process's Silero VAD network, loaded once from the silero-vad package.

    Importing ``silero_vad`` calls ``torch.set_num_threads(1)``; the thread count is put back.
    """
    global _shared
    with _import_lock:
        if _shared is None:
            threads = torch.get_num_threads()
            try:
                from silero_vad import load_silero_vad
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise VADUnavailable(
                    f"server VAD needs the silero-vad package: {install_hint('server')}"
                ) from exc
            finally:
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
            with warnings.catch_warnings():  # its loader uses APIs that importlib and torch now deprecate
                warnings.simplefilter("ignore", DeprecationWarning)
                network = load_silero_vad()._model  # the 16 kHz network inside the stateful wrapper
            _shared = SileroNetwork({k: v.detach().numpy().astype(np.float32) for k, v in network.state_dict().items()})
        return _shared


def vad_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("silero_vad") is not None
    except (ImportError, ValueError):  # pragma: no cover
        return False


@dataclass
class VADEvent:
    """What the VAD heard, at ``sample`` (a 16 kHz sample index from the start of the stream).

    ``speech_started``: the first speech window. ``silence_started``: the first quiet window
    after speech, or the second of the windows at the room's level (the turn may be
    ending). ``speech_resumed``: speech again before the silence was long enough (sound
    back above the room's level, or soft speech that Silero still hears).
    ``speech_stopped``: the silence lasted ``silence_duration_ms``; ``sample`` is where it
    ended and ``silence_start`` where it began.
    """

    kind: str
    sample: int
    silence_start: int | None = None

    @property
    def ms(self) -> int:
        return self.sample * 1000 // VAD_SAMPLE_RATE


class StreamingVAD:
    """Feed float32 audio chunks at ``input_rate``; get speech start/stop events back.

    Not thread-safe: call :meth:`process` from one thread at a time (the server awaits each
    call before the next). ``model`` defaults to the process's shared Silero network.
    ``date_by_level=False`` dates every silence where Silero hears it (for comparison).
    """

    def __init__(self, threshold: float = 0.5, silence_duration_ms: int = 500, input_rate: int = VAD_SAMPLE_RATE,
                 model: SileroNetwork | None = None, date_by_level: bool = True) -> None:
        self.threshold = float(threshold)
        self.silence_samples = int(silence_duration_ms) * VAD_SAMPLE_RATE // 1000
        self.input_rate = input_rate
        self.model = model if model is not None else shared_silero()
        self._resampler = self._new_resampler()
        self._pending = np.zeros(0, dtype=np.float32)
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros((1, CONTEXT), dtype=np.float32)
        self.position = 0  # 16 kHz samples scored so far
        self.speaking = False
        self._silence_start: int | None = None
        self.last_probability = 0.0
        self.date_by_level = date_by_level
        self.room_db: float | None = None  # the room's level, from windows while nobody speaks
        self._forget_utterance()

    def _forget_utterance(self) -> None:
        self._silence_start = None
        self._heard = False  # Silero has heard the current silence (not only the level)
        self._peak_db = -120.0  # the loudest window of the utterance
        self._quiet_from: int | None = None  # where the current run of quiet windows began
        self._use_level = self.date_by_level  # cleared when a quiet stretch turned out to be soft speech

    def _new_resampler(self) -> soxr.ResampleStream | None:
        if self.input_rate == VAD_SAMPLE_RATE:
            return None
        return soxr.ResampleStream(self.input_rate, VAD_SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def configure(self, threshold: float, silence_duration_ms: int) -> None:
        self.threshold = float(threshold)
        self.silence_samples = int(silence_duration_ms) * VAD_SAMPLE_RATE // 1000

    def reset(self) -> None:
        """Forget the speech state (not the stream position): after a buffer clear or a commit."""
        self._state[:] = 0.0
        self._context[:] = 0.0
        self.speaking = False
        self._forget_utterance()

    def end_speech(self) -> None:
        """The turn was ended from outside (a manual commit, a full buffer)."""
        self.speaking = False
        self._forget_utterance()

    @property
    def silence_heard(self) -> bool:
        """Whether Silero hears the current silence (False while only the level says so)."""
        return self._silence_start is None or self._heard

    def probability(self, window: np.ndarray) -> float:
        """Speech probability of the next 512-sample window (16 kHz), advancing the stream's state."""
        samples = np.concatenate([self._context, np.asarray(window, dtype=np.float32).reshape(1, WINDOW)], axis=1)
        out, self._state = self.model(samples, self._state)
        self._context = samples[:, -CONTEXT:]
        return float(out[0])

    def process(self, audio: np.ndarray) -> list[VADEvent]:
        """Score the new audio; events in order of their position in the stream."""
        audio = np.asarray(audio, dtype=np.float32)
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio)
        self._pending = np.concatenate([self._pending, audio]) if self._pending.size else audio
        events: list[VADEvent] = []
        offset = 0
        while self._pending.size - offset >= WINDOW:
            window = self._pending[offset : offset + WINDOW]
            probability = self.probability(window)
            offset += WINDOW
            self.last_probability = probability
            start = self.position
            self.position += WINDOW
            self._window(start, probability, level_db(window), events)
        self._pending = self._pending[offset:].copy() if offset else self._pending
        return events

    def _window(self, start: int, probability: float, level: float, events: list[VADEvent]) -> None:
        """One window's probability and level -> the events it causes."""
        if not self.speaking:
            # Quiet windows only: a word's onset (before Silero hears it) or a bang is not the room.
            if probability < self.threshold - HYSTERESIS and (self.room_db is None or level <= self.room_db + QUIET_DB):
                self.room_db = level if self.room_db is None else 0.95 * self.room_db + 0.05 * level
            if probability >= self.threshold:
                self.speaking = True
                self._forget_utterance()
                self._peak_db = level
                events.append(VADEvent("speech_started", start))
            return
        self._peak_db = max(self._peak_db, level)
        quiet = self._use_level and self.room_db is not None and self._peak_db - self.room_db >= MIN_SNR_DB \
            and level <= self.room_db + QUIET_DB
        self._quiet_from = (start if self._quiet_from is None else self._quiet_from) if quiet else None
        silent = probability < self.threshold - HYSTERESIS  # Silero hears silence
        if self._silence_start is not None and not self._heard:  # a silence begun by the level alone
            if not quiet:
                self._resume(start, events)
            elif silent:
                self._heard = True
            elif self.position - self._silence_start >= MAX_LAG_WINDOWS * WINDOW:
                self._use_level, self._quiet_from = False, None  # Silero still hears speech: soft, not silence
                self._resume(start, events)
        elif self._silence_start is not None and probability >= self.threshold:
            if quiet:  # Silero hears speech at the room's level: soft speech, the level cannot tell
                self._use_level, self._quiet_from = False, None
            self._resume(start, events)
        if self._silence_start is None:
            lagging = self._quiet_from is not None and start - self._quiet_from <= MAX_LAG_WINDOWS * WINDOW
            if silent or (lagging and self.position - self._quiet_from >= QUIET_WINDOWS * WINDOW):
                # From the second quiet window: the turn's audio keeps the first, where a soft ending may fade.
                self._silence_start = min(self._quiet_from + WINDOW, start) if lagging else start
                self._heard = silent
                events.append(VADEvent("silence_started", self._silence_start))
        if self._heard and silent and self.position - self._silence_start >= self.silence_samples:
            events.append(VADEvent("speech_stopped", self.position, self._silence_start))
            self.speaking = False
            self._forget_utterance()

    def _resume(self, start: int, events: list[VADEvent]) -> None:
        events.append(VADEvent("speech_resumed", start))
        self._silence_start, self._heard = None, False
