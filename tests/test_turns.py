"""Turn-taking without a socket: the NumPy Silero network, VAD events, the turn state machine (server VAD,
semantic VAD with scripted end-of-turn probabilities, the idle timeout)."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from miniomni.server.realtime.protocol import TurnDetection
from miniomni.server.turns.taking import (
    EAGERNESS_CAP_MS,
    QUIET_MS,
    TURN_TAIL_MS,
    InputTurns,
    SpeechStarted,
    SpeechStopped,
    TimeoutTriggered,
    TurnCheck,
    TurnEnded,
    TurnMayEnd,
    TurnResumed,
    vad_settings,
)
from miniomni.server.turns.vad import WINDOW, StreamingVAD, VADEvent, shared_silero

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


def spoken_question(tmp_path, text: str) -> tuple[np.ndarray, int]:
    """espeak-ng's ``text`` at 16 kHz between stretches of quiet room noise; and the sample where it ends."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path / "q.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    speech, rate = sf.read(path, dtype="float32")
    speech = soxr.resample(speech, rate, 16000)
    loud = np.flatnonzero(np.abs(speech) > 0.01)
    speech = speech[: loud[-1] + 1]  # espeak-ng's own trailing silence is not speech
    rng = np.random.default_rng(1)
    room = [0.002 * rng.standard_normal(n).astype(np.float32) for n in (16000, 24000)]
    return np.concatenate([room[0], speech, room[1]]).astype(np.float32), 16000 + len(speech)


def test_the_silence_is_dated_where_the_voice_fell_to_the_rooms_level(tmp_path):
    audio, end = spoken_question(tmp_path, "Where is the nearest train station?")
    heard = {}
    for by_level in (True, False):
        vad = StreamingVAD(0.5, 500, input_rate=16000, date_by_level=by_level)
        events = [e for e in vad.process(audio) if e.sample >= end - 1600]  # the question's end, not its pauses
        heard[by_level] = events
        assert [e.kind for e in events] == ["silence_started", "speech_stopped"]
        assert events[1].sample - events[1].silence_start >= 500 * 16
    level, silero = heard[True], heard[False]
    assert abs(level[0].sample - end) <= 2 * WINDOW  # within a window or two of the last sound
    assert silero[0].sample - end >= 3 * WINDOW  # Silero's probability lags behind it
    assert level[1].sample < silero[1].sample  # so the turn ends sooner, after the same silence


def windows_of(script: list[tuple[float, float]], seed: int = 0) -> tuple[StreamingVAD, list[VADEvent]]:
    """(speech probability, noise amplitude) per window -> the events of a VAD with a scripted network."""
    rng = np.random.default_rng(seed)
    audio = np.concatenate([amplitude * rng.standard_normal(WINDOW) for _, amplitude in script]).astype(np.float32)
    vad = StreamingVAD(0.5, 500, input_rate=16000, model=Scripted([p for p, _ in script]))
    return vad, vad.process(audio)


ROOM, VOICE = 0.002, 0.1  # noise amplitudes: -54 dB and -20 dB


def test_a_quiet_stretch_is_withdrawn_when_the_sound_comes_back():
    script = [(0.0, ROOM)] * 10 + [(1.0, VOICE)] * 10 + [(1.0, ROOM)] * 3 + [(1.0, VOICE)] * 5 + [(1.0, ROOM)] * 4 \
        + [(0.1, ROOM)] * 20
    _, events = windows_of(script)
    kinds = [(e.kind, e.sample // WINDOW) for e in events]
    # Quiet from window 20 and from 28: each silence is dated from the second quiet window.
    assert kinds == [("speech_started", 10), ("silence_started", 21), ("speech_resumed", 23),
                     ("silence_started", 29), ("speech_stopped", 29 + 16)]


def test_soft_speech_that_silero_still_hears_is_not_taken_for_silence():
    script = [(0.0, ROOM)] * 10 + [(1.0, VOICE)] * 10 + [(1.0, ROOM)] * 14 + [(0.1, ROOM)] * 20
    vad, events = windows_of(script)
    kinds = [(e.kind, e.sample // WINDOW) for e in events]
    # Quiet from window 20 (the silence dated from 21); Silero still hears speech 10 windows later:
    # resumed at window 30, and from then on only Silero dates the silence (window 34).
    assert kinds == [("speech_started", 10), ("silence_started", 21), ("speech_resumed", 30),
                     ("silence_started", 34), ("speech_stopped", 34 + 16)]
    assert vad.room_db == pytest.approx(10 * np.log10(ROOM**2), abs=1.0)
    # Silero hearing speech again at the room's level, after it heard the silence: the same.
    flicker = [(0.0, ROOM)] * 10 + [(1.0, VOICE)] * 10 + [(0.1, ROOM)] * 3 + [(1.0, ROOM)] + [(0.1, ROOM)] * 20
    _, events = windows_of(flicker)
    assert [(e.kind, e.sample // WINDOW) for e in events] == [
        ("speech_started", 10), ("silence_started", 20), ("speech_resumed", 23), ("silence_started", 24),
        ("speech_stopped", 24 + 16)]


def test_without_a_quiet_room_to_measure_only_silero_dates_the_silence():
    noisy = [(0.0, 0.05)] * 10 + [(1.0, VOICE)] * 10 + [(1.0, 0.05)] * 3 + [(0.1, 0.05)] * 20  # 6 dB apart
    _, events = windows_of(noisy)
    assert [(e.kind, e.sample // WINDOW) for e in events][:2] == [("speech_started", 10), ("silence_started", 23)]
    at_once = [(1.0, VOICE)] * 10 + [(1.0, 0.0)] * 3 + [(0.1, 0.0)] * 20  # speech from the first window
    _, events = windows_of(at_once)
    assert [(e.kind, e.sample // WINDOW) for e in events][:2] == [("speech_started", 0), ("silence_started", 13)]


def pcm(seconds: float, value: int = 1000) -> bytes:
    return np.full(int(seconds * RATE), value, dtype="<i2").tobytes()


def vad_at(kind: str, seconds: float, silence_start: float | None = None) -> VADEvent:
    """A VAD event at ``seconds`` into the stream (the VAD counts 16 kHz samples)."""
    start = None if silence_start is None else int(silence_start * 16000)
    return VADEvent(kind, int(seconds * 16000), start)


class NoVAD:
    silence_heard = True  # the events are scripted: every silence is Silero's

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
    assert len(machine.buffer) == int(tail * RATE) * 2 and machine.buffer_start == int(3.5 * RATE)


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
    assert TURN_TAIL_MS > 20
    machine = turns(silence_ms=20)
    feed(machine, 1.0, [vad_at("speech_started", 0.0)])
    out = feed(machine, 0.2, [vad_at("silence_started", 1.0), vad_at("speech_stopped", 1.02, silence_start=1.0)])
    ended = [e for e in out if isinstance(e, TurnEnded)]
    assert len(ended[0].pcm) == int(1.02 * RATE) * 2


def test_a_monologue_is_cut_at_the_buffer_limit():
    machine = InputTurns(1.0, TurnDetection(prefix_padding_ms=0))
    machine.start_vad(NoVAD(), 0)
    feed(machine, 0.2, [vad_at("speech_started", 0.0)])
    out = feed(machine, 0.4, [])
    assert out == []
    out = feed(machine, 0.4, [])  # a second of talk: the limit
    assert [type(e) for e in out] == [SpeechStopped, TurnEnded]
    assert len(out[1].pcm) == RATE * 2


# ---------------------------------------------------------------------- semantic VAD and the idle timeout


class CountingVAD(NoVAD):
    def __init__(self) -> None:
        self.ended = 0

    def end_speech(self) -> None:
        self.ended += 1


def semantic(eagerness: str = "high") -> tuple[InputTurns, CountingVAD]:
    machine = InputTurns(30.0, TurnDetection(type="semantic_vad", eagerness=eagerness, prefix_padding_ms=0))
    vad = CountingVAD()
    machine.start_vad(vad, 0)
    return machine, vad


def test_the_vad_waits_for_the_eagerness_cap_under_semantic_vad():
    assert vad_settings(TurnDetection(silence_duration_ms=700)) == (0.5, 700)
    caps = {e: vad_settings(TurnDetection(type="semantic_vad", eagerness=e))[1] for e in EAGERNESS_CAP_MS}
    assert caps == {"low": 8000, "medium": 4000, "high": 2000, "auto": 4000}


def test_a_complete_turn_is_committed_as_soon_as_the_model_says_so():
    machine, vad = semantic()
    feed(machine, 1.0, [])
    assert isinstance(feed(machine, 2.0, [vad_at("speech_started", 1.0)], value=2000)[0], SpeechStarted)
    # The first quiet window: the turn is offered at once (no tail), the model not asked yet.
    out = feed(machine, 0.1, [vad_at("silence_started", 3.0)], value=5)
    assert [type(e) for e in out] == [TurnMayEnd]
    offered = out[0]
    assert len(offered.pcm) == 2 * RATE * 2
    out = feed(machine, QUIET_MS / 1000 - 0.1, [], value=5)
    assert [type(e) for e in out] == [TurnCheck]
    check = out[0]
    assert check.item_id == offered.item_id and check.silence_start == 3 * RATE
    assert len(check.pcm) == int((2.0 + QUIET_MS / 1000) * RATE) * 2  # the turn so far, pause included
    assert feed(machine, 0.05, [], value=5) == []  # one question per pause
    out = machine.on_end_of_turn(check, 0.9)
    assert [type(e) for e in out] == [SpeechStopped, TurnEnded]
    assert out[0].audio_end_ms == 3250 and out[1].item_id == offered.item_id
    assert out[1].pcm == offered.pcm and vad.ended == 1
    assert machine.on_end_of_turn(check, 0.9) == []  # that turn is over: a repeated answer changes nothing


def test_the_end_of_turn_model_hears_a_pause_only_once_silero_hears_it_too():
    td = TurnDetection(type="semantic_vad", eagerness="high", prefix_padding_ms=0)
    # Room, speech, then the room's level while Silero is unsure (0.4: neither speech nor silence) for
    # 9 windows (288 ms, past QUIET_MS), then silence it hears.
    script = [(0.0, ROOM)] * 10 + [(1.0, VOICE)] * 10 + [(0.4, ROOM)] * 9 + [(0.1, ROOM)] * 10
    vad = StreamingVAD(*vad_settings(td), input_rate=16000, model=Scripted([p for p, _ in script]))
    machine = InputTurns(30.0, td)
    machine.start_vad(vad, 0)
    rng = np.random.default_rng(0)
    seen = []
    for index, (_, amplitude) in enumerate(script):
        window = (amplitude * rng.standard_normal(WINDOW)).astype(np.float32)
        machine.append(pcm(WINDOW * 1.5 / RATE))  # the buffer counts 24 kHz samples: 1.5 per 16 kHz sample
        seen += [(index, type(e).__name__) for e in machine.on_vad(vad.process(window))]
    kinds = [kind for _, kind in seen]
    assert kinds[:2] == ["SpeechStarted", "TurnMayEnd"] and kinds.count("TurnCheck") == 1
    offered, checked = (next(i for i, kind in seen if kind == name) for name in ("TurnMayEnd", "TurnCheck"))
    assert offered == 21  # the level: the second window at the room's level
    assert checked == 29  # not at 28, QUIET_MS after the offer, but once Silero heard the silence


def test_an_incomplete_turn_waits_and_is_committed_at_the_cap():
    td = TurnDetection(type="semantic_vad", eagerness="high", prefix_padding_ms=0)
    script = [0.0] * 10 + [0.9] * 40 + [0.0] * 100  # 32 ms windows: speech from 0.32 s to 1.6 s, then quiet
    vad = StreamingVAD(*vad_settings(td), input_rate=RATE, model=Scripted(script))
    machine = InputTurns(30.0, td)
    machine.start_vad(vad, 0)
    events = []
    for _ in range(int(1.6 / 0.1) + 3):  # up to 1.9 s: the pause is 300 ms old
        machine.append(pcm(0.1))
        events += machine.on_vad(vad.process(np.zeros(int(0.1 * RATE), dtype=np.float32)))
    assert [type(e) for e in events] == [SpeechStarted, TurnMayEnd, TurnCheck]
    assert machine.on_end_of_turn(events[-1], 0.2) == []  # incomplete: keep listening
    assert machine.on_end_of_turn(events[-1], None) == []  # (a failed decision is no decision)
    later = []
    while not any(isinstance(e, TurnEnded) for e in later):
        machine.append(pcm(0.1))
        later += machine.on_vad(vad.process(np.zeros(int(0.1 * RATE), dtype=np.float32)))
        assert machine.stream_samples < 5 * RATE
    assert [type(e) for e in later] == [SpeechStopped, TurnEnded]
    silence = later[0].audio_end_ms - 1600
    assert 2000 <= silence < 2000 + 32 + 100  # the cap of "high", to a window and a chunk
    assert later[1].pcm == events[1].pcm  # the audio offered at the first quiet window


def test_an_incomplete_pause_then_a_complete_one_make_one_turn():
    machine, _ = semantic("low")
    feed(machine, 1.0, [vad_at("speech_started", 0.0)], value=2000)
    first = feed(machine, 0.3, [vad_at("silence_started", 1.0)])
    assert [type(e) for e in first] == [TurnMayEnd, TurnCheck]
    assert machine.on_end_of_turn(first[1], 0.1) == []
    out = feed(machine, 1.0, [vad_at("speech_resumed", 2.0)], value=2000)  # a 1 s pause mid-sentence, then more
    assert [type(e) for e in out] == [TurnResumed]
    second = feed(machine, 0.3, [vad_at("silence_started", 2.3)])
    assert [type(e) for e in second] == [TurnMayEnd, TurnCheck] and second[1].item_id == first[1].item_id
    ended = machine.on_end_of_turn(second[1], 0.97)
    assert [type(e) for e in ended] == [SpeechStopped, TurnEnded]
    assert len(ended[1].pcm) == round(2.3 * RATE) * 2 and ended[1].pcm == second[0].pcm  # both parts, one turn


def test_speech_resuming_during_the_decision_withdraws_the_offer_and_voids_the_answer():
    machine, vad = semantic()
    feed(machine, 1.0, [vad_at("speech_started", 0.0)], value=2000)
    offered, check = feed(machine, 0.25, [vad_at("silence_started", 1.0)])
    out = feed(machine, 0.2, [vad_at("speech_resumed", 1.22)], value=2000)  # while the model is thinking
    assert [type(e) for e in out] == [TurnResumed] and out[0].item_id == offered.item_id
    assert machine.on_end_of_turn(check, 0.99) == []  # too late: the speaker went on
    assert machine.speech_start == 0 and vad.ended == 0


def test_the_idle_timeout_commits_the_silence_once_the_answer_has_played():
    machine = InputTurns(30.0, TurnDetection(idle_timeout_ms=5000, prefix_padding_ms=0))
    machine.start_vad(NoVAD(), 0)
    assert feed(machine, 4.9, [], value=3) == []
    out = feed(machine, 0.2, [], value=3)
    assert [type(e) for e in out] == [TimeoutTriggered, TurnEnded]
    assert (out[0].audio_start_ms, out[0].audio_end_ms) == (0, 5100) and out[0].item_id == out[1].item_id
    assert len(out[1].pcm) == round(5.1 * RATE) * 2 and not machine.buffer
    machine.pause_idle()  # it is answered: no timeout while the answer runs
    assert feed(machine, 6.0, []) == []
    machine.resume_idle(answer_samples=10 * RATE)  # it began at 5.1 s and speaks for 10 s: played out at 15.1 s
    assert feed(machine, 8.9, []) == []  # 4.9 s after that
    out = feed(machine, 0.2, [])
    assert [type(e) for e in out] == [TimeoutTriggered, TurnEnded] and out[0].audio_start_ms == 15100
    # Speech restarts the count where it stops.
    feed(machine, 1.0, [vad_at("speech_started", 20.2)], value=2000)
    out = feed(machine, 1.0, [vad_at("speech_stopped", 21.5, silence_start=21.0)])
    assert [type(e) for e in out] == [SpeechStopped, TurnEnded]
    assert feed(machine, 4.0, []) == []  # 4.7 s after the speech stopped
    out = feed(machine, 0.5, [])
    assert [type(e) for e in out] == [TimeoutTriggered, TurnEnded] and out[0].audio_start_ms == 21500


def test_a_full_buffer_without_detection_refuses_an_append_but_a_microphone_keeps_its_latest_audio():
    from miniomni.server.realtime.protocol import ClientError

    turns = InputTurns(max_audio_seconds=1.0, turn_detection=None)
    second = 24000 * 2
    turns.append(b"\x01\x00" * 24000)
    with pytest.raises(ClientError) as refused:
        turns.append(b"\x02\x00" * 10)
    assert refused.value.code == "input_audio_buffer_full" and len(turns.buffer) == second
    turns.append(b"\x02\x00" * 4800, rolling=True)  # 0.2 s more: the oldest 0.2 s go
    assert len(turns.buffer) == second
    assert turns.buffer[-9600:] == b"\x02\x00" * 4800 and turns.buffer[:2] == b"\x01\x00"
    assert turns.stream_samples == 24000 + 4800
    turns.append(b"\x03\x00" * 30000, rolling=True)  # more than the buffer holds at once
    assert bytes(turns.buffer) == b"\x03\x00" * 24000
