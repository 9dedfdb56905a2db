"""WS /v1/realtime on loopback: the official openai SDK, server VAD with barge-in, bad input, busy, API key."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
import websockets
from conftest import engine_fixture, port_fixture, serving, speech_like, wait_idle
from openai import AsyncOpenAI

from miniomni.audio import float_to_pcm16
from miniomni.server.app import create_app
from miniomni.server.engine import TRANSCRIPT_TOKENS, AnswerRequest
from miniomni.server.settings import ServerSettings
from miniomni.server.transports import websocket as connection
from miniomni.streaming import AudioChunk

MAX_ANSWERS = 2
RATE = 24000


engine = engine_fixture(MAX_ANSWERS)
port = port_fixture(ServerSettings(max_audio_seconds=30))
keyed_port = port_fixture(ServerSettings(api_key="sekret"))


def pcm16(audio: np.ndarray) -> bytes:
    return float_to_pcm16(audio)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chunks(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start : start + size]


def voiced_speech(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Syllables of formant-filtered glottal pulses with gaps: Silero VAD hears this as speech."""
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (660, 1720, 2410)]
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = 140 - 30 * t / seconds + 15 * np.sin(2 * np.pi * 1.5 * t)
    frac = np.cumsum(f0) / rate % 1.0
    source = np.diff(np.where(frac < 0.4, np.sin(np.pi * frac / 0.4) ** 2, 0.0), prepend=0.0)
    out = np.zeros(n)
    position = 0
    while position < n:
        length = int(rng.uniform(0.12, 0.25) * rate)
        gap = int(rng.uniform(0.03, 0.08) * rate)
        end = min(position + length, n)
        k = np.arange(end - position)
        envelope = np.clip(k / (0.02 * rate), 0, 1) * np.clip((end - position - k) / (0.04 * rate), 0, 1)
        segment = source[position:end] * envelope
        size = len(segment) + rate // 20  # room for the resonances to ring out
        z = np.exp(-1j * np.linspace(0, np.pi, size // 2 + 1))
        response = np.zeros_like(z)
        vowel = vowels[rng.integers(len(vowels))]
        for formant, bandwidth, gain in zip(vowel, (90, 110, 150), (1.0, 0.6, 0.3), strict=True):
            r = np.exp(-np.pi * bandwidth / rate)  # a two-pole resonator, applied in the frequency domain
            response += gain * (1 - r) / (1 - 2 * r * np.cos(2 * np.pi * formant / rate) * z + r * r * z * z)
        filtered = np.fft.irfft(np.fft.rfft(segment, size) * response, size)
        stop = min(position + size, n)
        out[position:stop] += filtered[: stop - position]
        position = end + gap
    out = 0.5 * out / np.abs(out).max() + 0.003 * rng.standard_normal(n)
    return out.astype(np.float32)


def espeak_speech(tmp_path) -> np.ndarray:
    path = tmp_path / "espeak.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Hello there. What is the weather like today?"], check=True)
    audio, rate = sf.read(path, dtype="float32")
    return soxr.resample(audio, rate, RATE).astype(np.float32)


def quiet(seconds: float, seed: int = 1) -> np.ndarray:
    return (0.002 * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)


async def next_of(conn, *types, timeout=60.0):
    """Events until one of ``types`` (SDK connection); returns (that event, everything before it)."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        event = await asyncio.wait_for(conn.recv(), timeout=max(0.1, deadline - time.monotonic()))
        if event.type in types:
            return event, seen
        seen.append(event)


class Raw:
    """A bare websockets client speaking JSON events."""

    def __init__(self, ws):
        self.ws = ws

    async def send(self, event):
        await self.ws.send(json.dumps(event) if isinstance(event, dict) else event)

    async def recv(self, timeout=30.0):
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout=timeout))

    async def until(self, *types, timeout=60.0):
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            event = await self.recv(timeout=max(0.1, deadline - time.monotonic()))
            if event["type"] in types:
                return event, seen
            seen.append(event)


def raw_connect(port, **kwargs):
    return websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime?model=mini-omni", proxy=None, **kwargs)


def sdk_client(port, key="x"):
    return AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1")


# ---------------------------------------------------------------------- the openai SDK


def test_sdk_text_turn_matches_local_generation(port, omni, engine):
    question, steps = "What is your name?", 24
    expected = omni.generate("T1T2", text=question, max_new_tokens=steps).text

    async def run():
        async with sdk_client(port).realtime.connect(model="mini-omni") as conn:
            created = await conn.recv()
            assert created.type == "session.created"
            session = created.session
            assert session.type == "realtime" and session.output_modalities == ["audio"]
            assert session.audio.input.format.type == "audio/pcm" and session.audio.input.format.rate == RATE
            assert session.audio.output.format.rate == RATE
            detection = session.audio.input.turn_detection
            assert detection.type == "server_vad" and detection.threshold == 0.5
            assert detection.silence_duration_ms == 500
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                               "max_output_tokens": steps})
            updated, _ = await next_of(conn, "session.updated")
            assert updated.session.output_modalities == ["text"] and updated.session.max_output_tokens == steps
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": question}]})
            added, _ = await next_of(conn, "conversation.item.added")
            assert added.item.role == "user" and added.item.content[0].text == question
            await conn.response.create()
            done, events = await next_of(conn, "response.done")
            return done, events, created, updated

    done, events, created, updated = asyncio.run(run())
    types = [e.type for e in events]
    types = types[types.index("response.created"):]
    order = ["response.created", "response.output_item.added", "conversation.item.added",
             "response.content_part.added", "response.output_text.done", "response.content_part.done",
             "response.output_item.done", "conversation.item.done"]
    assert [t for t in types if t in order] == order
    assert "response.output_audio.delta" not in types
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    text_done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas and deltas == text_done.text == expected
    assert done.response.status == "completed"
    assert done.response.output[0].content[0].text == expected
    ids = [e.event_id for e in [created, updated, done, *events]]
    assert len(set(ids)) == len(ids)
    assert wait_idle(engine)


def test_sdk_audio_turn_streams_pcm_and_transcript(port, omni, engine):
    steps = 20
    pcm = pcm16(speech_like(1.5, sample_rate=RATE))
    heard = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    local = list(omni.stream("A1A2-batch", audio=heard, sample_rate=RATE, max_new_tokens=steps, max_chunk=4))
    expected_pcm = b"".join(float_to_pcm16(e.audio) for e in local if isinstance(e, AudioChunk))

    async def run():
        async with sdk_client(port).realtime.connect(model="mini-omni") as conn:
            await next_of(conn, "session.created")
            await conn.session.update(session={"type": "realtime",
                                               "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                                                   "turn_detection": None}}})
            updated, _ = await next_of(conn, "session.updated")
            assert updated.session.audio.input.turn_detection is None
            for piece in chunks(pcm, 4800 * 2):  # 100 ms chunks
                await conn.input_audio_buffer.append(audio=b64(piece))
            await conn.input_audio_buffer.commit()
            committed, _ = await next_of(conn, "input_audio_buffer.committed")
            added, _ = await next_of(conn, "conversation.item.added")
            assert added.item.id == committed.item_id and added.item.content[0].type == "input_audio"
            await conn.response.create(response={"max_output_tokens": steps})
            return await next_of(conn, "response.done")

    done, events = asyncio.run(run())
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    assert len(audio) == (steps - 7) * 2048 * 2
    assert audio == expected_pcm
    transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    transcript_done = [e for e in events if e.type == "response.output_audio_transcript.done"]
    assert len(transcript_done) == 1 and transcript_done[0].transcript == transcript == local[-1].text
    assert [e.type for e in events].count("response.output_audio.done") == 1
    assert done.response.status == "completed" and done.response.output_modalities == ["audio"]
    assert done.response.usage.output_tokens == steps
    assert wait_idle(engine)


def test_sdk_cancel_stops_the_answer_within_a_step(port, engine):
    async def run():
        async with sdk_client(port).realtime.connect(model="mini-omni") as conn:
            await next_of(conn, "session.created")
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Tell me a story"}]})
            await conn.response.create(response={"max_output_tokens": "inf"})  # up to the server's 2048
            created, _ = await next_of(conn, "response.created")
            await next_of(conn, "response.output_audio.delta")
            assert engine.active_answers == 1
            await conn.response.cancel()
            done, events = await next_of(conn, "response.done")
            assert done.response.id == created.response.id
            assert done.response.status == "cancelled"
            assert done.response.status_details.reason == "client_cancelled"
            assert "response.output_audio_transcript.done" in [e.type for e in events]
            began = time.monotonic()
            while engine.active_answers and time.monotonic() - began < 2:
                await asyncio.sleep(0.02)
            assert engine.active_answers == 0
            # The connection goes on: nothing to cancel now, and a new short answer works.
            await conn.response.cancel()
            error, _ = await next_of(conn, "error")
            assert error.error.code == "response_cancel_not_active"
            await conn.response.create(response={"max_output_tokens": 10, "output_modalities": ["text"]})
            done, _ = await next_of(conn, "response.done")
            assert done.response.status == "completed"

    asyncio.run(run())
    assert wait_idle(engine)


# ---------------------------------------------------------------------- server VAD


@pytest.mark.parametrize("voice", ["synthetic", "espeak-ng"])
def test_server_vad_commits_answers_and_lets_speech_interrupt(port, engine, voice, tmp_path):
    if voice == "espeak-ng":
        if shutil.which("espeak-ng") is None:
            pytest.skip("espeak-ng is not installed")
        speech = espeak_speech(tmp_path)
    else:
        speech = voiced_speech(1.5)
    turn = pcm16(np.concatenate([quiet(0.5), speech, quiet(1.0)]))

    async def append(conn, data):
        for piece in chunks(data, 2400 * 2):  # 100 ms chunks, as a microphone sends them
            await conn.input_audio_buffer.append(audio=b64(piece))

    async def run():
        async with sdk_client(port).realtime.connect(model="mini-omni") as conn:
            await next_of(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 2048, "audio": {"input": {
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 400,
                                   "prefix_padding_ms": 200}}}})
            await next_of(conn, "session.updated")
            await append(conn, turn)
            started, _ = await next_of(conn, "input_audio_buffer.speech_started")
            stopped, _ = await next_of(conn, "input_audio_buffer.speech_stopped")
            committed, _ = await next_of(conn, "input_audio_buffer.committed")
            assert started.item_id == stopped.item_id == committed.item_id
            assert 200 <= started.audio_start_ms <= 700
            assert stopped.audio_end_ms > started.audio_start_ms + 1000
            created, _ = await next_of(conn, "response.created")
            await next_of(conn, "response.output_audio.delta")
            # Barge-in: the user talks over the answer.
            await append(conn, turn)
            await next_of(conn, "input_audio_buffer.speech_started")
            done, _ = await next_of(conn, "response.done")
            assert done.response.id == created.response.id and done.response.status == "cancelled"
            assert done.response.status_details.reason == "turn_detected"
            await next_of(conn, "input_audio_buffer.speech_stopped")
            second, _ = await next_of(conn, "response.created")
            assert second.response.id != created.response.id
            await conn.response.cancel()
            done, _ = await next_of(conn, "response.done")
            assert done.response.status == "cancelled"

    asyncio.run(run())
    assert wait_idle(engine)


def spoken_answer(port, turn: bytes, steps: int = 12) -> tuple[bytes, str, list[str]]:
    """Stream ``turn`` in 20 ms chunks with server VAD on; the answer's audio, transcript and event types."""

    async def run():
        async with raw_connect(port) as ws:
            conn = Raw(ws)
            await conn.until("session.created")
            await conn.send({"type": "session.update", "session": {"max_output_tokens": steps, "audio": {"input": {
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500, "prefix_padding_ms": 100}}}}})
            await conn.until("session.updated")
            for piece in chunks(turn, 480 * 2):
                await conn.send({"type": "input_audio_buffer.append", "audio": b64(piece)})
            done, seen = await conn.until("response.done")
            assert done["response"]["status"] == "completed"
            audio = b"".join(base64.b64decode(e["delta"]) for e in seen if e["type"] == "response.output_audio.delta")
            transcript = next(e["transcript"] for e in seen if e["type"] == "response.output_audio_transcript.done")
            return audio, transcript, [e["type"] for e in seen]

    return asyncio.run(run())


def test_an_answer_prepared_during_the_silence_is_the_answer_without_it(engine):
    """Speculation changes when the answer is ready, never what the model hears or says."""
    # A pause shorter than the VAD's silence: an answer is started, then dropped as the talk goes on.
    turn = pcm16(np.concatenate([quiet(0.3), voiced_speech(1.0), quiet(0.3), voiced_speech(0.8, seed=1), quiet(1.2)]))
    with serving(create_app(engine, ServerSettings(speculate=False))) as port:
        plain = spoken_answer(port, turn)
    stats = engine.stats
    started, used, dropped = stats.speculative_started, stats.speculative_used, stats.speculative_dropped
    with serving(create_app(engine, ServerSettings(speculate=True))) as port:
        speculative = spoken_answer(port, turn)
    assert speculative[0] == plain[0] and len(plain[0]) == (12 - 7) * 2048 * 2
    assert speculative[1] == plain[1]
    assert stats.speculative_used == used + 1  # the answer given was the one prepared in the silence
    assert stats.speculative_dropped >= dropped + 1 and stats.speculative_started >= started + 2
    order = [t for t in speculative[2] if t in ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                                                  "response.created", "response.output_audio.delta")]
    assert order[:3] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "response.created"]
    assert wait_idle(engine)


def test_vad_buffer_stays_bounded_in_silence_and_in_a_monologue(engine):
    threads = torch.get_num_threads()
    with serving(create_app(engine, ServerSettings(max_audio_seconds=1))) as port:
        async def run():
            async with raw_connect(port) as ws:
                conn = Raw(ws)
                await conn.until("session.created")
                await conn.send({"type": "session.update", "session": {"max_output_tokens": 8}})
                await conn.until("session.updated")
                # Silence: nothing happens, and the buffer is a rolling window, not an overflow.
                for piece in chunks(pcm16(quiet(3.0)), 2400 * 2):
                    await conn.send({"type": "input_audio_buffer.append", "audio": b64(piece)})
                await conn.send({"type": "input_audio_buffer.clear"})
                _, seen = await conn.until("input_audio_buffer.cleared")
                assert not seen
                # Speech longer than max_audio_seconds: the turn is taken at the limit.
                for piece in chunks(pcm16(np.concatenate([voiced_speech(1.6), quiet(1.0)])), 2400 * 2):
                    await conn.send({"type": "input_audio_buffer.append", "audio": b64(piece)})
                started, _ = await conn.until("input_audio_buffer.speech_started")
                stopped, seen = await conn.until("input_audio_buffer.speech_stopped")
                assert not seen
                # The buffer was cleared at 3 s: its one second is full at 4 s.
                assert started["audio_start_ms"] >= 2700 and 4000 <= stopped["audio_end_ms"] <= 4100
                await conn.until("input_audio_buffer.committed")
                # The talk goes on: a new turn, which interrupts the answer to the first second.
                done, seen = await conn.until("response.done")
                assert "input_audio_buffer.speech_started" in [e["type"] for e in seen]
                assert done["response"]["status_details"]["reason"] == "turn_detected"
                await conn.until("input_audio_buffer.speech_stopped")
                done, seen = await conn.until("response.done")
                assert done["response"]["status"] == "completed"

        asyncio.run(run())
        assert torch.get_num_threads() == threads  # loading Silero left the engine's threads alone


# ---------------------------------------------------------------------- bad input, busy


BAD_INPUT = [
    ("{not json", "invalid_json"),
    (b"\x00\x01binary", "binary_frame"),
    ("[1, 2]", "invalid_event"),
    ({"type": "no.such.event"}, "unknown_event_type"),
    ({"type": "conversation.item.delete", "item_id": "x"}, "item_delete_invalid_item_id"),
    ({"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": 0}, "item_truncate_invalid_item_id"),
    ({"type": "input_audio_buffer.append", "audio": "%%% not base64 %%%"}, "invalid_audio"),
    ({"type": "input_audio_buffer.append", "audio": b64(b"\x00\x01\x02")}, "invalid_audio"),
    ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty"),
    ({"type": "response.create"}, "response_no_input"),
    ({"type": "response.cancel"}, "response_cancel_not_active"),
    ({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16000}}}}}, "unsupported_audio_format"),
    ({"type": "session.update", "session": {"input_audio_format": "opus"}}, "unsupported_audio_format"),
    ({"type": "session.update", "session": {"output_modalities": ["video"]}}, "invalid_value"),
    ({"type": "session.update", "session": {"turn_detection": {"type": "semantic_vad", "eagerness": "eager"}}},
     "invalid_value"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": "data:"}]}}, "invalid_value"),
]


@pytest.mark.parametrize("message, code", BAD_INPUT, ids=[code + str(i) for i, (_, code) in enumerate(BAD_INPUT)])
def test_bad_input_is_an_error_event_and_the_connection_goes_on(port, engine, message, code):
    async def run():
        async with raw_connect(port) as ws:
            conn = Raw(ws)
            await conn.until("session.created")
            await conn.send(message if isinstance(message, (str, bytes)) else {**message, "event_id": "evt_client_1"})
            error = await conn.recv()
            assert error["type"] == "error" and error["event_id"].startswith("event_")
            assert error["error"]["code"] == code and error["error"]["message"]
            if isinstance(message, dict):
                assert error["error"]["event_id"] == "evt_client_1"
            await conn.send({"type": "input_audio_buffer.clear"})
            assert (await conn.recv())["type"] == "input_audio_buffer.cleared"

    asyncio.run(run())
    assert engine.active_answers == 0


def test_a_failing_answer_is_an_error_and_a_failed_response(port, engine):
    async def run():
        async with raw_connect(port) as ws:
            conn = Raw(ws)
            await conn.until("session.created")
            await conn.send({"type": "conversation.item.create", "item": {  # longer than the context
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello " * 3000}]}})
            await conn.send({"type": "response.create"})
            error, seen = await conn.until("error")
            assert seen[-1]["type"] == "response.content_part.added"
            assert error["error"]["code"] == "response_failed" and "tokens long" in error["error"]["message"]
            done, _ = await conn.until("response.done")
            assert done["response"]["status"] == "failed"
            assert "tokens long" in done["response"]["status_details"]["error"]["message"]

    asyncio.run(run())
    assert wait_idle(engine)


def test_beta_session_shape_is_accepted(port):
    async def run():
        async with raw_connect(port) as ws:
            conn = Raw(ws)
            await conn.until("session.created")
            await conn.send({"type": "session.update", "session": {
                "modalities": ["text", "audio"], "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                "turn_detection": None, "max_response_output_tokens": 4096, "voice": "alloy", "temperature": 0.8}})
            updated = await conn.recv()
            assert updated["type"] == "session.updated"
            session = updated["session"]
            assert session["output_modalities"] == ["audio"] and session["audio"]["input"]["turn_detection"] is None
            assert session["max_output_tokens"] == 2048  # capped at the server's max_tokens_limit
            await conn.send({"type": "session.update", "session": {"modalities": ["text"]}})
            assert (await conn.recv())["session"]["output_modalities"] == ["text"]

    asyncio.run(run())


def test_audio_buffer_is_capped_at_max_audio_seconds(engine):
    with serving(create_app(engine, ServerSettings(max_audio_seconds=1))) as port:
        async def run():
            async with raw_connect(port) as ws:
                conn = Raw(ws)
                await conn.until("session.created")
                await conn.send({"type": "session.update", "session": {"turn_detection": None}})
                await conn.until("session.updated")
                second = pcm16(speech_like(1.0, sample_rate=RATE))
                await conn.send({"type": "input_audio_buffer.append", "audio": b64(second)})
                await conn.send({"type": "input_audio_buffer.append", "audio": b64(second[:4800])})
                error = await conn.recv()
                assert error["type"] == "error" and error["error"]["code"] == "input_audio_buffer_full"
                await conn.send({"type": "input_audio_buffer.commit"})
                assert (await conn.recv())["type"] == "input_audio_buffer.committed"

        asyncio.run(run())


def test_busy_engine_gives_server_busy_and_the_connection_goes_on(port, engine):
    held = [engine.open(AnswerRequest(task="T1T2", text="hold the line", max_new_tokens=1500), lambda e: None)
            for _ in range(MAX_ANSWERS)]

    async def run():
        async with raw_connect(port) as ws:
            conn = Raw(ws)
            await conn.until("session.created")
            await conn.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}})
            await conn.until("conversation.item.done")
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 8}})
            error = await conn.recv()
            assert error["type"] == "error" and error["error"]["code"] == "server_busy"
            assert "busy" in error["error"]["message"]
            for session in held:
                session.cancel()
            assert await asyncio.to_thread(wait_idle, engine)
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 8}})
            done, seen = await conn.until("response.done")
            assert done["response"]["status"] == "completed"
            assert seen[0]["type"] == "response.created"

    try:
        asyncio.run(run())
    finally:
        for session in held:
            session.cancel()
    assert wait_idle(engine)


def test_client_that_disconnects_mid_answer_stops_it(port, engine):
    async def run():
        async with raw_connect(port) as ws:
            conn = Raw(ws)
            await conn.until("session.created")
            await conn.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}})
            await conn.send({"type": "response.create"})
            await conn.until("response.output_audio.delta")

    asyncio.run(run())
    assert wait_idle(engine, timeout=3)


def test_a_long_conversation_keeps_no_finished_answer_in_memory(port, engine, monkeypatch):
    """The connection remembers every item, but not the engine sessions (and question audio) behind them."""
    import gc
    import weakref

    opened = []
    open_session = engine.open

    def recording_open(*args, **kwargs):
        session = open_session(*args, **kwargs)
        opened.append(weakref.ref(session))
        return session

    monkeypatch.setattr(engine, "open", recording_open)

    async def run():
        async with raw_connect(port) as ws:
            conn = Raw(ws)
            await conn.until("session.created")
            await conn.send({"type": "session.update", "session": {
                "max_output_tokens": 10, "audio": {"input": {"turn_detection": None}}}})
            for seed in range(3):
                await conn.send({"type": "input_audio_buffer.append",
                                 "audio": b64(pcm16(voiced_speech(0.5, seed=seed)))})
                await conn.send({"type": "input_audio_buffer.commit"})
                await conn.send({"type": "response.create"})
                await conn.until("response.done")
            assert wait_idle(engine)
            gc.collect()
            return [ref() is None for ref in opened]  # while the connection is still open

    assert asyncio.run(run()) == [True, True, True]


@pytest.mark.slow
def test_client_that_stops_reading_is_cut_off_and_others_are_served(port, engine, monkeypatch):
    monkeypatch.setattr(connection, "MAX_PENDING_BYTES", 64 * 1024)

    async def run():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        async with raw_connect(port, sock=sock, max_queue=1, max_size=None) as ws:
            conn = Raw(ws)
            await conn.until("session.created")
            await conn.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}})
            finished = engine.stats.answers_finished
            started = engine.stats.answers_started
            await conn.send({"type": "response.create"})  # up to 2048 steps, never read
            began = time.monotonic()
            while time.monotonic() - began < 30 and (engine.stats.answers_started == started
                                                     or engine.active_answers):
                await asyncio.sleep(0.02)
            assert engine.stats.answers_started == started + 1
            assert engine.active_answers == 0  # cancelled, long before 2048 steps
            assert engine.stats.answers_finished == finished  # cut off, not finished
            # Another client is served meanwhile.
            async with raw_connect(port) as other_ws:
                other = Raw(other_ws)
                await other.until("session.created")
                await other.send({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
                await other.send({"type": "response.create", "response": {"max_output_tokens": 10}})
                done, _ = await other.until("response.done")
                assert done["response"]["status"] == "completed"
            types = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    types.append((await conn.recv(timeout=10))["type"])
            assert "response.done" not in types
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

    asyncio.run(run())
    assert wait_idle(engine)


# ---------------------------------------------------------------------- API key, origin


def test_api_key_header_or_subprotocol_is_required(keyed_port):
    async def refused(**kwargs):
        async with raw_connect(keyed_port, **kwargs) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1008 and "API key" in closed.value.rcvd.reason

    async def accepted(**kwargs):
        async with raw_connect(keyed_port, **kwargs) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            return ws.subprotocol

    async def run():
        await refused()
        await refused(additional_headers={"Authorization": "Bearer wrong"})
        await refused(subprotocols=["realtime", "openai-insecure-api-key.wrong"])
        assert await accepted(additional_headers={"Authorization": "Bearer sekret"}) is None
        assert await accepted(subprotocols=["realtime", "openai-insecure-api-key.sekret"]) == "realtime"
        async with sdk_client(keyed_port, key="sekret").realtime.connect(model="mini-omni") as conn:
            assert (await conn.recv()).type == "session.created"

    asyncio.run(run())


def test_browser_origin_must_be_this_server_or_allowed(port):
    async def run():
        async with raw_connect(port, origin=f"http://127.0.0.1:{port}") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with raw_connect(port, origin="https://elsewhere.example") as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1008 and "origin" in closed.value.rcvd.reason

    asyncio.run(run())


# ---------------------------------------------------------------------- both sides of the conversation


@pytest.mark.slow
def test_a_spoken_turn_gets_the_users_transcript_then_the_answer(port, engine, checkpoint_dir, tmp_path, capsys):
    """Transcription on: the user's words come from a row beside the answer, equal to `generate --task asr`."""
    from miniomni.cli import main

    speech = voiced_speech(1.2, seed=3)
    turn = pcm16(np.concatenate([quiet(0.3), speech, quiet(1.0)]))
    steps = 12

    async def run():
        async with sdk_client(port).realtime.connect(model="mini-omni") as conn:
            await next_of(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "max_output_tokens": steps, "audio": {"input": {
                "transcription": {"model": "mini-omni"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500, "prefix_padding_ms": 100}}}})
            updated, _ = await next_of(conn, "session.updated")
            assert updated.session.audio.input.transcription.model == "mini-omni"
            for piece in chunks(turn, 480 * 2):
                await conn.input_audio_buffer.append(audio=b64(piece))
            committed, _ = await next_of(conn, "input_audio_buffer.committed")
            seen, wanted = [], {"conversation.item.input_audio_transcription.completed", "response.done"}
            while wanted:  # the two interleave; with random weights the transcript runs longer than the answer
                event = await asyncio.wait_for(conn.recv(), timeout=60)
                seen.append(event)
                wanted.discard(event.type)
            completed = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
            done = next(e for e in seen if e.type == "response.done")
            return committed, completed, seen, done

    committed, completed, events, done = asyncio.run(run())
    assert completed.item_id == committed.item_id and completed.content_index == 0
    deltas = [e for e in events if e.type == "conversation.item.input_audio_transcription.delta"]
    assert all(e.item_id == committed.item_id for e in deltas)
    assert "".join(e.delta for e in deltas) == completed.transcript
    assert done.response.status == "completed"
    assert any(e.type == "response.output_audio.delta" for e in events)
    # What the model heard is the committed turn: transcribe that with the command line.
    heard_path = tmp_path / "heard.wav"
    sf.write(heard_path, np.frombuffer(engine_heard(turn), dtype="<i2").astype(np.float32) / 32768, RATE,
             subtype="FLOAT")
    capsys.readouterr()
    assert main(["-q", "generate", "--checkpoint", str(checkpoint_dir), "--task", "asr", "--audio",
                 str(heard_path), "--max-new-tokens", str(TRANSCRIPT_TOKENS)]) == 0
    assert completed.transcript == capsys.readouterr().out.strip()
    assert wait_idle(engine)


def engine_heard(turn: bytes) -> bytes:
    """The audio of the turn the server commits for ``turn`` (its VAD run here on the same chunks)."""
    from miniomni.server.realtime.protocol import TurnDetection
    from miniomni.server.turns.taking import InputTurns, TurnEnded
    from miniomni.server.turns.vad import StreamingVAD

    machine = InputTurns(30.0, TurnDetection(silence_duration_ms=500, prefix_padding_ms=100))
    machine.start_vad(StreamingVAD(0.5, 500, RATE), 0)
    for piece in chunks(turn, 480 * 2):
        machine.append(piece)
        for event in machine.on_vad(machine.vad.process(np.frombuffer(piece, "<i2").astype(np.float32) / 32768)):
            if isinstance(event, TurnEnded):
                return event.pcm
    raise AssertionError("no turn")


@pytest.mark.slow
def test_a_transcription_session_transcribes_turn_after_turn_and_never_answers(port, engine):
    async def run():
        async with raw_connect(port) as ws:
            conn = Raw(ws)
            await conn.until("session.created")
            await conn.send({"type": "transcription_session.update", "session": {
                "input_audio_transcription": {"model": "mini-omni"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 400}}})
            updated, _ = await conn.until("session.updated")
            assert updated["session"]["type"] == "transcription"
            transcripts = []
            for seed in (4, 5):
                turn = pcm16(np.concatenate([quiet(0.3), voiced_speech(1.0, seed=seed), quiet(0.9)]))
                for piece in chunks(turn, 480 * 2):
                    await conn.send({"type": "input_audio_buffer.append", "audio": b64(piece)})
                committed, _ = await conn.until("input_audio_buffer.committed")
                completed, seen = await conn.until("conversation.item.input_audio_transcription.completed")
                assert completed["item_id"] == committed["item_id"]
                assert not [e for e in seen if e["type"].startswith("response.")]
                transcripts.append(completed["transcript"])
            await conn.send({"type": "response.create"})
            error, _ = await conn.until("error")
            assert "transcription session" in error["error"]["message"]
            return transcripts

    transcripts = asyncio.run(run())
    assert len(transcripts) == 2
    assert wait_idle(engine)


def test_truncate_cuts_the_answers_transcript_to_what_was_played(port, engine):
    async def run():
        async with raw_connect(port) as ws:
            conn = Raw(ws)
            await conn.until("session.created")
            await conn.send({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
            await conn.until("session.updated")
            await conn.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}})
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 40}})
            done, seen = await conn.until("response.done")
            item = done["response"]["output"][0]
            full = item["content"][0]["transcript"]
            audio_ms = sum(len(base64.b64decode(e["delta"])) // 2 for e in seen
                           if e["type"] == "response.output_audio.delta") * 1000 // RATE
            await conn.send({"type": "conversation.item.truncate", "item_id": item["id"], "content_index": 0,
                             "audio_end_ms": audio_ms // 2})
            truncated, _ = await conn.until("conversation.item.truncated")
            assert truncated["item_id"] == item["id"] and truncated["audio_end_ms"] == audio_ms // 2
            await conn.send({"type": "conversation.item.truncate", "item_id": item["id"], "content_index": 0,
                             "audio_end_ms": audio_ms + 1000})
            error, _ = await conn.until("error")
            assert error["error"]["code"] == "item_truncate_invalid_audio_end_ms"
            await conn.send({"type": "conversation.item.truncate", "item_id": "item_nope", "audio_end_ms": 0})
            error, _ = await conn.until("error")
            assert error["error"]["code"] == "item_truncate_invalid_item_id"
            return full

    assert asyncio.run(run())  # the answer had a transcript to cut
    assert wait_idle(engine)


def test_cut_transcript_keeps_the_words_played():
    from miniomni.server.realtime.answers import cut_transcript

    text = "one two three four five six seven eight"
    assert cut_transcript(text, 1000, 1000) == text
    assert cut_transcript(text, 0, 1000) == ""
    half = cut_transcript(text, 500, 1000)
    assert text.startswith(half) and half.endswith("four") and len(half) < len(text)
