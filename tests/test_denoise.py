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
needs_rnnoise = pytest.mark.skipif(not denoise.available(), reason=f"RNNoise is not installed: {denoise.INSTALL_HINT}")
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


@needs_rnnoise
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
    out = np.frombuffer(whole, dtype="<i2").astype(np.float32)
    lag = int(np.argmax(np.correlate(out[: RATE * 2], speech[: RATE * 2], "full"))) - (RATE * 2 - 1)
    assert 0 <= lag <= RATE // 25  # the output trails by the frame and the resamplers: at most 40 ms
    # flush gives back the delayed end too: every input sample, lag later, and at most 30 ms more
    assert len(noisy) // 2 + lag <= len(whole) // 2 <= len(noisy) // 2 + RATE * 3 // 100
    before, after = snr_db(speech, np.frombuffer(noisy, dtype="<i2")), snr_db(speech[: len(out) - lag], out[lag:])
    print(f"SNR {before:.1f} -> {after:.1f} dB, lag {lag / RATE * 1000:.0f} ms")
    assert after > before + 3.0


def test_without_rnnoise_the_error_says_how_to_install_it(engine, monkeypatch):
    monkeypatch.setattr(denoise, "library_path", lambda: None)
    denoise._library.cache_clear()
    try:
        assert not denoise.available()
        with pytest.raises(denoise.DenoiserUnavailable, match="pip install --no-deps pyrnnoise"):
            denoise.Denoiser()

        async def talk() -> Recorder:
            session, out = await _session(engine, [
                {"audio": {"input": {"noise_reduction": {"type": "near_field"}}}},
                {"input_audio_noise_reduction": "far_field"},
                {"audio": {"input": {"noise_reduction": None}}},
            ])
            session.close()
            return out

        out = run(talk())
    finally:
        denoise._library.cache_clear()
    assert [e["type"] for e in out.events] == ["session.created", "error", "error", "session.updated"]
    first, second = (e["error"] for e in out.events if e["type"] == "error")
    assert first["code"] == second["code"] == "unsupported_noise_reduction"
    assert first["param"] == "session.audio.input.noise_reduction" and denoise.INSTALL_HINT in first["message"]
    assert second["param"] == "session.input_audio_noise_reduction" and "far_field" in second["message"]


async def _session(engine, updates: list[dict]) -> tuple[RealtimeSession, Recorder]:
    out = Recorder()
    session = RealtimeSession(engine, ServerSettings(), "mini-omni", out)
    session.start()
    for update in updates:
        await session.receive(json.dumps({"type": "session.update", "session": update}))
    return session, out


@needs_rnnoise
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


@needs_rnnoise
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

    silence = pcm(np.random.default_rng(2).standard_normal(RATE) * 1000)  # the same noise, no speech

    async def heard_by_the_vad() -> tuple[bytes, list[str]]:
        session, out = await talk({"type": "server_vad", "create_response": False, "silence_duration_ms": 150})
        await session.receive(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(silence).decode()}))
        await out.wait_for("input_audio_buffer.committed", timeout=30)
        turn = session.conversation.last_user.pcm
        session.close()
        return turn, [e["type"] for e in out.events]

    turn, types = run(heard_by_the_vad())
    assert types.count("input_audio_buffer.speech_started") == 1 and "error" not in types
    stream = denoise.Denoiser()
    heard = b"".join(stream.process(audio[start:start + 960]) for start in range(0, len(audio), 960))
    heard += stream.process(silence)
    assert len(turn) > RATE and turn[: len(turn) // 2 * 2] in heard  # the VAD's turn is a stretch of denoised audio
    assert turn not in audio + silence


@needs_rnnoise
def test_turning_it_off_mid_turn_and_a_commit_at_a_full_buffer_lose_nothing_and_raise_nothing(engine, speech):
    from miniomni.server.settings import ServerSettings as Settings

    audio = pcm(speech)
    half = len(audio) // 4 * 2

    async def talk() -> tuple[bytes, list[dict]]:
        out = Recorder()
        session = RealtimeSession(engine, Settings(max_audio_seconds=4.0), "mini-omni", out)
        session.start()
        await session.receive(json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "noise_reduction": {"type": "far_field"}, "turn_detection": None}}}}))
        await session.receive(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(audio[:half]).decode()}))
        await session.receive(json.dumps({"type": "session.update",
                                          "session": {"audio": {"input": {"noise_reduction": None}}}}))
        await session.receive(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(audio[half:]).decode()}))
        await session.receive(json.dumps({"type": "input_audio_buffer.commit"}))
        first = session.conversation.last_user.pcm
        # On again, filled until the buffer refuses a chunk, then committed.
        near = {"audio": {"input": {"noise_reduction": {"type": "near_field"}}}}
        await session.receive(json.dumps({"type": "session.update", "session": near}))
        chunk = base64.b64encode(audio[: RATE // 5 * 2]).decode()  # 200 ms
        for _ in range(25):  # 5 s
            await session.receive(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        await session.receive(json.dumps({"type": "input_audio_buffer.commit"}))
        session.close()
        return first, out.events

    first, events = run(talk())
    alone = denoise.Denoiser()
    assert first == alone.process(audio[:half]) + alone.flush() + audio[half:]  # what it held came first
    errors = [e["error"]["code"] for e in events if e["type"] == "error"]
    assert errors and set(errors) == {"input_audio_buffer_full"}  # the chunks past 4 s, and nothing else
    assert [e["type"] for e in events].count("input_audio_buffer.committed") == 2
