"""G.711 at 8 kHz (audio/pcmu, audio/pcma): the companding against Python's own audioop, and a Realtime
session that hears and speaks it in both session shapes."""

from __future__ import annotations

import asyncio
import base64
import json
import warnings

import numpy as np
import pytest
import soxr
from conftest import engine_fixture, port_fixture, speech_like, wait_idle

from miniomni.server.realtime.formats import (
    PCMA,
    PCMU,
    InputConverter,
    OutputConverter,
    alaw_decode,
    alaw_encode,
    ulaw_decode,
    ulaw_encode,
)
from miniomni.server.realtime.session import RealtimeSession
from miniomni.server.settings import ServerSettings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    audioop = pytest.importorskip("audioop", reason="audioop (the reference) left Python in 3.13")

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)


@pytest.mark.parametrize(("encode", "decode", "lin2", "tolin"), [
    (ulaw_encode, ulaw_decode, "lin2ulaw", "ulaw2lin"),
    (alaw_encode, alaw_decode, "lin2alaw", "alaw2lin"),
])
def test_companding_is_g711_as_audioop_does_it(encode, decode, lin2, tolin):
    pcm = ALL_SAMPLES.astype("<i2").tobytes()
    assert encode(ALL_SAMPLES).tobytes() == getattr(audioop, lin2)(pcm, 2)
    assert decode(ALL_CODES).astype("<i2").tobytes() == getattr(audioop, tolin)(ALL_CODES.tobytes(), 2)


def test_converters_resample_in_chunks_without_clicks():
    rate = 24000
    t = np.arange(rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = OutputConverter(PCMU)
    coded = b"".join(out.encode(tone[i:i + 480]) for i in range(0, rate, 480)) + out.encode(np.zeros(0), last=True)
    assert abs(len(coded) - 8000) <= 2  # one byte per 8 kHz sample
    heard = ulaw_decode(np.frombuffer(coded, np.uint8)).astype(np.float32) / 32768
    reference = soxr.resample(tone, rate, 8000)
    assert np.corrcoef(heard[100:7900], reference[100:7900])[0, 1] > 0.999
    back = InputConverter(PCMA)
    codes = alaw_encode((reference * 32767).astype(np.int16))
    pcm = b"".join(back.to_pcm16(codes[i:i + 160].tobytes()) for i in range(0, len(codes), 160))
    restored = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    held = len(tone) - len(restored)  # what the streaming resampler still holds: about 20 ms
    assert 0 <= held < 960
    assert np.corrcoef(restored[200:20000], tone[200:20000])[0, 1] > 0.99


engine = engine_fixture(2)


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.arrived = asyncio.Event()

    def send_text(self, data: str) -> None:
        self.events.append(json.loads(data))
        self.arrived.set()

    def close(self, code: int, reason: str) -> None:
        pass

    async def wait_for(self, kind: str, timeout: float = 60.0) -> dict:
        async def seen() -> dict:
            while True:
                found = [e for e in self.events if e["type"] == kind]
                if found:
                    return found[0]
                self.arrived.clear()
                await self.arrived.wait()
        return await asyncio.wait_for(seen(), timeout)


@pytest.mark.parametrize(("update", "inbound", "outbound"), [
    ({"audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcma"}}}},
     PCMU, PCMA),
    ({"input_audio_format": "g711_alaw", "output_audio_format": "g711_ulaw"}, PCMA, PCMU),  # the beta shape
])
def test_a_session_hears_and_speaks_g711_at_8_khz(engine, update, inbound, outbound):
    assert wait_idle(engine)
    question = soxr.resample(speech_like(1.0, sample_rate=24000), 24000, 8000)
    encode = ulaw_encode if inbound is PCMU else alaw_encode
    codes = encode((np.clip(question, -1, 1) * 32767).astype(np.int16)).tobytes()

    async def talk() -> Recorder:
        out = Recorder()
        session = RealtimeSession(engine, ServerSettings(), "mini-omni", out)
        session.start()
        await session.receive(json.dumps({"type": "session.update", "session": {
            **update, "max_output_tokens": 24, "audio": {**update.get("audio", {}), "input": {
                **update.get("audio", {}).get("input", {}), "turn_detection": None}}}}))
        for start in range(0, len(codes), 160):  # 20 ms telephone frames
            chunk = base64.b64encode(codes[start:start + 160]).decode()
            await session.receive(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        await session.receive(json.dumps({"type": "input_audio_buffer.commit"}))
        await session.receive(json.dumps({"type": "response.create"}))
        await out.wait_for("response.done")
        await session.receive(json.dumps({"type": "session.update", "session": {
            "audio": {"input": {"format": {"type": "audio/pcmu", "rate": 16000}}}}}))
        session.close()
        return out

    out = asyncio.run(talk())
    updated = next(e for e in out.events if e["type"] == "session.updated")["session"]["audio"]
    assert updated["input"]["format"] == {"type": inbound.type}
    assert updated["output"]["format"] == {"type": outbound.type}
    done = next(e for e in out.events if e["type"] == "response.done")["response"]
    assert done["status"] == "completed" and done["audio"]["output"]["format"] == {"type": outbound.type}
    audio = b"".join(base64.b64decode(e["delta"]) for e in out.events if e["type"] == "response.output_audio.delta")
    assert len(audio) > 0
    decode = ulaw_decode if outbound is PCMU else alaw_decode
    assert np.abs(decode(np.frombuffer(audio, np.uint8)).astype(np.int32)).max() > 0
    errors = [e["error"] for e in out.events if e["type"] == "error"]
    assert [(e["code"], e["param"]) for e in errors] == [("unsupported_audio_format", "session.audio.input.format")]
    assert "8000 Hz" in errors[0]["message"]


port = port_fixture()


@pytest.mark.slow
def test_a_telephone_bridge_talks_mu_law_at_8_khz_through_the_server(port, engine):
    """A telephony-shaped client: 20 ms frames of μ-law at 8 kHz paced as a call sends them, server VAD
    ends the turn, the answer comes back as μ-law at 8 kHz."""
    import time

    import websockets
    from test_realtime import voiced_speech

    assert wait_idle(engine)
    rate = 8000
    call = np.concatenate([np.zeros(int(0.3 * rate)), voiced_speech(1.2, rate=rate, seed=3), np.zeros(rate)])
    frames = ulaw_encode((np.clip(call, -1, 1) * 32767).astype(np.int16)).tobytes()

    async def run() -> list[dict]:
        url = f"ws://127.0.0.1:{port}/v1/realtime?model=mini-omni"
        async with websockets.connect(url, proxy=None) as ws:
            async def send(event: dict) -> None:
                await ws.send(json.dumps(event))

            await send({"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 16, "audio": {
                "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {
                    "type": "server_vad", "silence_duration_ms": 400}},
                "output": {"format": {"type": "audio/pcmu"}}}}})
            began = time.monotonic()
            for index, start in enumerate(range(0, len(frames), 160)):
                await asyncio.sleep(max(0.0, began + index * 0.02 - time.monotonic()))  # a call's pace
                await send({"type": "input_audio_buffer.append",
                            "audio": base64.b64encode(frames[start:start + 160]).decode()})
            events = []
            while not events or events[-1]["type"] != "response.done":
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            return events

    events = asyncio.run(run())
    types = [e["type"] for e in events]
    assert "input_audio_buffer.speech_started" in types and "input_audio_buffer.committed" in types
    assert events[-1]["response"]["status"] == "completed"
    audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    seconds = len(audio) / rate  # one byte per sample
    deltas = sum(1 for e in events if e["type"] == "response.output_audio.delta")
    assert deltas > 0 and 0.5 < seconds < 20, seconds
    assert not [e for e in events if e["type"] == "error"]
    assert wait_idle(engine)
