"""Server VAD and turn-taking without a socket: the NumPy Silero network, VAD events, the turn state machine."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from miniomni.server.protocol import TurnDetection
from miniomni.server.turns import (
    TURN_TAIL_MS,
    InputTurns,
    SpeechStarted,
    SpeechStopped,
    TurnEnded,
    TurnMayEnd,
    TurnResumed,
)
from miniomni.server.vad import WINDOW, StreamingVAD, VADEvent, shared_silero

RATE = 24000


def test_numpy_silero_equals_the_packaged_torchscript_model(tmp_path):
    silero_vad = pytest.importorskip("silero_vad")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path / "q.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Is the museum open on Sunday mornings?"], check=True)
    speech, rate = sf.read(path, dtype="float32")
    rng = np.random.default_rng(0)
    audio = np.concatenate([0.003 * rng.standard_normal(8000), soxr.resample(speech, rate, 16000),
                            0.003 * rng.standard_normal(8000)]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        reference = silero_vad.load_silero_vad()
    ours = StreamingVAD(input_rate=16000)
    windows = range(0, len(audio) - WINDOW + 1, WINDOW)
    with torch.inference_mode():
        expected = [float(reference(torch.from_numpy(audio[i : i + WINDOW]), 16000)) for i in windows]
    got = [ours.probability(audio[i : i + WINDOW]) for i in windows]
    # Both are float32 networks whose sums run in a kernel-chosen order (AVX2 and AVX-512 block
    # differently) and whose LSTM state carries rounding from window to window: about 1e-5 apart
    # on some CPUs. 1e-4 (some 800 float32 steps at 1.0) still catches any wrong weight or layer.
    assert max(abs(a - b) for a, b in zip(expected, got, strict=True)) < 1e-4
    assert max(got) > 0.9 and min(got) < 0.1  # it heard speech and silence
    assert shared_silero() is shared_silero()  # one network per process


class Scripted:
    """A stand-in network that returns scripted speech probabilities, one per window."""

    def __init__(self, probabilities: list[float]) -> None:
        self.probabilities = list(probabilities)

    def __call__(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.array([self.probabilities.pop(0)], dtype=np.float32), state


def events_for(probabilities: list[float], silence_ms: int = 500) -> list[VADEvent]:
    vad = StreamingVAD(0.5, silence_ms, input_rate=16000, model=Scripted(probabilities))
    return vad.process(np.zeros(WINDOW * len(probabilities), dtype=np.float32))


def test_vad_reports_silence_starting_speech_resuming_and_stopping():
    windows_500ms = -(-500 * 16 // WINDOW)  # windows of 32 ms in 500 ms, rounded up
    script = [0.0] * 3 + [0.9] * 10 + [0.1] * 5 + [0.9] * 5 + [0.1] * windows_500ms + [0.0] * 2
    events = events_for(script)
    kinds = [(e.kind, e.sample // WINDOW) for e in events]
    assert kinds == [("speech_started", 3), ("silence_started", 13), ("speech_resumed", 18),
                     ("silence_started", 23), ("speech_stopped", 23 + windows_500ms)]
    assert events[-1].silence_start == 23 * WINDOW
    # Between threshold - 0.15 and threshold is neither speech nor silence (Silero's hysteresis).
    assert [e.kind for e in events_for([0.9] * 3 + [0.4] * 40)] == ["speech_started"]


def pcm(seconds: float, value: int = 1000) -> bytes:
    return np.full(int(seconds * RATE), value, dtype="<i2").tobytes()


def vad_at(kind: str, seconds: float, silence_start: float | None = None) -> VADEvent:
    """A VAD event at ``seconds`` into the stream (the VAD counts 16 kHz samples)."""
    start = None if silence_start is None else int(silence_start * 16000)
    return VADEvent(kind, int(seconds * 16000), start)


class NoVAD:
    def end_speech(self) -> None:
        pass


def turns(silence_ms: int = 500) -> InputTurns:
    machine = InputTurns(30.0, TurnDetection(silence_duration_ms=silence_ms, prefix_padding_ms=0))
    machine.start_vad(NoVAD(), 0)
    return machine


def feed(machine: InputTurns, seconds: float, events: list[VADEvent], value: int = 1000) -> list:
    machine.append(pcm(seconds, value))
    return machine.on_vad(events)


def test_a_turn_is_offered_once_the_tail_has_arrived_and_ends_with_exactly_that_audio():
    machine = turns()
    assert feed(machine, 1.0, []) == []
    out = feed(machine, 2.0, [vad_at("speech_started", 1.0)], value=2000)
    assert isinstance(out[0], SpeechStarted) and out[0].audio_start_ms == 1000
    tail = TURN_TAIL_MS / 1000
    out = feed(machine, tail / 2, [vad_at("silence_started", 3.0)], value=5)
    assert out == []  # the tail has not all arrived yet
    out = feed(machine, tail / 2, [])
    assert len(out) == 1 and isinstance(out[0], TurnMayEnd)
    offered = out[0]
    assert len(offered.pcm) == int((2.0 + tail) * RATE) * 2
    out = feed(machine, 0.5, [vad_at("speech_stopped", 3.5, silence_start=3.0)], value=7)
    assert [type(e) for e in out] == [SpeechStopped, TurnEnded]
    assert out[0].audio_end_ms == 3500 and out[1].item_id == offered.item_id == out[0].item_id
    assert out[1].pcm == offered.pcm  # the model hears exactly what was offered
    # The silence up to the stop went with the turn; what came after it stays buffered.
    assert len(machine.buffer) == int(0.1 * RATE) * 2 and machine.buffer_start == int(3.5 * RATE)


def test_speech_resuming_withdraws_the_offer_and_the_turn_grows():
    machine = turns()
    feed(machine, 1.0, [vad_at("speech_started", 0.0)], value=2000)
    offered = [e for e in feed(machine, 0.3, [vad_at("silence_started", 1.0)]) if isinstance(e, TurnMayEnd)]
    assert len(offered) == 1
    out = feed(machine, 0.7, [vad_at("speech_resumed", 1.3)], value=2000)
    assert [type(e) for e in out] == [TurnResumed] and out[0].item_id == offered[0].item_id
    out = feed(machine, 0.6, [vad_at("silence_started", 2.0), vad_at("speech_stopped", 2.5, silence_start=2.0)])
    ended = [e for e in out if isinstance(e, TurnEnded)]
    assert len(ended) == 1 and len(ended[0].pcm) == int((2.0 + TURN_TAIL_MS / 1000) * RATE) * 2
    assert ended[0].pcm != offered[0].pcm


def test_a_short_silence_setting_keeps_at_most_that_much_tail():
    machine = turns(silence_ms=40)
    feed(machine, 1.0, [vad_at("speech_started", 0.0)])
    out = feed(machine, 0.2, [vad_at("silence_started", 1.0), vad_at("speech_stopped", 1.04, silence_start=1.0)])
    ended = [e for e in out if isinstance(e, TurnEnded)]
    assert len(ended[0].pcm) == int(1.04 * RATE) * 2


def test_a_monologue_is_cut_at_the_buffer_limit():
    machine = InputTurns(1.0, TurnDetection(prefix_padding_ms=0))
    machine.start_vad(NoVAD(), 0)
    feed(machine, 0.2, [vad_at("speech_started", 0.0)])
    out = feed(machine, 0.4, [])
    assert out == []
    out = feed(machine, 0.4, [])  # a second of talk: the limit
    assert [type(e) for e in out] == [SpeechStopped, TurnEnded]
    assert len(out[1].pcm) == RATE * 2
