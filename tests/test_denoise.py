"""Noise reduction of a session's input (RNNoise from the pyrnnoise package): the denoiser itself and in a session."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import engine_fixture
from test_session import Recorder

from miniomni.server.realtime import denoise
from miniomni.server.realtime.session import RealtimeSession
from miniomni.server.settings import ServerSettings

RATE = 24000
pytestmark = pytest.mark.skipif(not denoise.available(), reason=f"RNNoise is not installed: {denoise.INSTALL_HINT}")
engine = engine_fixture(1)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """A spoken sentence between silences, 16-bit scale, 24 kHz."""
    path = tmp_path_factory.mktemp("denoise") / "q.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "What is the tallest mountain in the world?"], check=True)
    audio, rate = sf.read(path, dtype="float32")
    audio = soxr.resample(audio, rate, RATE)
    silence = np.zeros(RATE // 5, dtype=np.float32)
    return np.concatenate([silence, audio / np.abs(audio).max() * 0.5, silence]) * 32767


def pcm(samples: np.ndarray) -> bytes:
    return np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes()


def snr_db(clean: np.ndarray, other: np.ndarray) -> float:
    n = min(len(clean), len(other))
    clean, other = clean[:n].astype(np.float64), other[:n].astype(np.float64)
    return float(10 * np.log10((clean**2).sum() / ((other - clean) ** 2).sum()))


def test_rnnoise_takes_white_noise_out_of_speech_streamed_in_any_chunks(speech):
    noisy = pcm(speech + np.random.default_rng(0).standard_normal(len(speech)) * 1000)
    whole_denoiser = denoise.Denoiser()
    whole = whole_denoiser.process(noisy) + whole_denoiser.flush()
    streamed, start, sizes = denoise.Denoiser(), 0, [1, 37, 480, 1200, 4801]
    parts = []
    for count in range(10_000):
        if start >= len(noisy):
            break
        end = start + 2 * sizes[count % len(sizes)]
        parts.append(streamed.process(noisy[start:end]))
        start = end
    assert b"".join(parts) + streamed.flush() == whole  # chunk edges change nothing
    assert len(whole) == len(noisy)  # flush gives back every sample
    out = np.frombuffer(whole, dtype="<i2").astype(np.float32)
    lag = int(np.argmax(np.correlate(out[: RATE * 2], speech[: RATE * 2], "full"))) - (RATE * 2 - 1)
    assert 0 <= lag <= RATE // 25  # the output trails by the frame and the resamplers: at most 40 ms
    before, after = snr_db(speech, np.frombuffer(noisy, dtype="<i2")), snr_db(speech[: len(out) - lag], out[lag:])
    print(f"SNR {before:.1f} -> {after:.1f} dB, lag {lag / RATE * 1000:.0f} ms")
    assert after > before + 3.0


def test_without_rnnoise_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(denoise, "library_path", lambda: None)
    denoise._library.cache_clear()
    try:
        assert not denoise.available()
        with pytest.raises(denoise.DenoiserUnavailable, match="pip install --no-deps pyrnnoise"):
            denoise.Denoiser()
    finally:
        denoise._library.cache_clear()


async def _session(engine, updates: list[dict]) -> tuple[RealtimeSession, Recorder]:
    out = Recorder()
    session = RealtimeSession(engine, ServerSettings(), "mini-omni", out)
    session.start()
    for update in updates:
        await session.receive(json.dumps({"type": "session.update", "session": update}))
    return session, out


def test_near_and_far_field_are_kept_and_echoed_and_a_bad_value_is_refused(engine, monkeypatch):
    async def talk() -> Recorder:
        session, out = await _session(engine, [
            {"audio": {"input": {"noise_reduction": {"type": "near_field"}}}},
            {"input_audio_noise_reduction": {"type": "far_field"}},
            {"audio": {"input": {"noise_reduction": {"type": "studio"}}}},
            {"audio": {"input": {"noise_reduction": None}}},
        ])
        monkeypatch.setattr(denoise, "available", lambda: False)
        near = {"audio": {"input": {"noise_reduction": {"type": "near_field"}}}}
        await session.receive(json.dumps({"type": "session.update", "session": near}))
        session.close()
        return out

    out = run(talk())
    assert [e["type"] for e in out.events] == ["session.created", "session.updated", "session.updated", "error",
                                               "session.updated", "error"]
    echoed = [e["session"]["audio"]["input"]["noise_reduction"] for e in out.events if e["type"] == "session.updated"]
    assert echoed == [{"type": "near_field"}, {"type": "far_field"}, None]
    errors = [e["error"] for e in out.events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["unsupported_noise_reduction"] * 2
    assert errors[0]["param"] == "session.audio.input.noise_reduction" and "studio" in errors[0]["message"]
    assert denoise.INSTALL_HINT in errors[1]["message"] and "send null" in errors[1]["message"]


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_noisy_turn_is_denoised_before_the_vad_and_a_commit_keeps_every_sample(engine, speech):
    noisy = speech + np.random.default_rng(1).standard_normal(len(speech)) * 1000
    audio = pcm(noisy)

    async def talk(turn_detection) -> tuple[RealtimeSession, Recorder]:
        session, out = await _session(engine, [{"audio": {"input": {"noise_reduction": {"type": "near_field"},
                                                                    "turn_detection": turn_detection}}}])
        for start in range(0, len(audio), 2 * 480):  # 20 ms appends, as a microphone sends them
            await session.receive(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(audio[start:start + 960]).decode()}))
        return session, out

    async def committed_by_hand() -> tuple[bytes, list[str]]:
        session, out = await talk(None)
        await session.receive(json.dumps({"type": "input_audio_buffer.commit"}))
        heard = session.conversation.last_user.pcm
        session.close()
        return heard, [e["type"] for e in out.events]

    heard, types = run(committed_by_hand())
    assert "input_audio_buffer.committed" in types and "error" not in types
    alone = denoise.Denoiser()
    assert heard == alone.process(audio) + alone.flush()  # denoised, its last milliseconds included

    async def heard_by_the_vad() -> list[str]:
        session, out = await talk({"type": "server_vad", "create_response": False, "silence_duration_ms": 150})
        silence = pcm(np.random.default_rng(2).standard_normal(RATE) * 1000)  # the same noise, no speech
        await session.receive(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(silence).decode()}))
        await out.wait_for("input_audio_buffer.committed", timeout=30)
        session.close()
        return [e["type"] for e in out.events]

    types = run(heard_by_the_vad())
    assert types.count("input_audio_buffer.speech_started") == 1 and "error" not in types
