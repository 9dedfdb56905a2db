"""Serving under abuse, case by case: each finding of a fuzz run, the limits a public server needs, shutdown."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import resource
import signal
import socket
import struct
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets
from conftest import engine_fixture, serve_process, serving, speech_like, wait_idle

from miniomni.server.app import create_app, shut_down
from miniomni.server.engine import AnswerRequest, Engine
from miniomni.server.settings import ServerSettings

LIMITS = ServerSettings(max_audio_seconds=5, max_request_bytes=1 << 20, max_message_bytes=256 * 1024,
                        max_connections=4, idle_timeout=1.5, max_events_per_second=50)


engine = engine_fixture(2)


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, LIMITS)


@pytest.fixture(scope="module")
def port(app):
    with serving(app) as port:
        yield port


def wav(samples: np.ndarray, rate: int) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def chat(port: int, body: bytes | str, **kwargs) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/chat", content=body, timeout=30,
                      headers={"content-type": "application/json"}, **kwargs)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------- /chat


def test_a_long_low_rate_file_is_refused_from_its_header_before_any_work(port):
    # 4000 samples at 1000 Hz: 4 s, a few kB (the limit is 5 s) ...
    assert chat(port, json.dumps({"audio": wav(np.zeros(4000, np.float32), 1000), "max_tokens": 1})).status_code \
        == 200
    before = peak_rss_mb()
    # ... 200 000 of them: 200 s, refused before decoding or resampling (which would take 200 s * 16 kHz floats).
    response = chat(port, json.dumps({"audio": wav(np.zeros(200_000, np.float32), 1000)}))
    assert response.status_code == 413 and "200.0 s long" in response.json()["error"]["message"]
    assert peak_rss_mb() - before < 50
    # Below 1000 Hz nothing is speech: a clear 400.
    response = chat(port, json.dumps({"audio": base64.b64encode(_wav_header_at(1)).decode()}))
    assert response.status_code == 400 and "sample rate" in response.json()["error"]["message"]


def _wav_header_at(rate: int, samples: int = 4000) -> bytes:
    """A WAV file whose header says ``rate`` Hz (soundfile refuses to write such rates)."""
    data = np.zeros(samples, dtype="<i2").tobytes()
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate,
            rate * 2, 2, 16) + b"data" + struct.pack("<I", len(data)) + data)


def test_a_chunked_upload_is_cut_off_at_the_limit(port):
    sent = {"bytes": 0}

    def body():
        for _ in range(64):  # 64 x 64 kB = 4 MB, four times the limit, without a Content-Length
            sent["bytes"] += 65536
            yield b"x" * 65536

    response = chat(port, body())
    assert response.status_code == 413 and "exceeds" in response.json()["error"]["message"]


@pytest.mark.parametrize("body, words", [
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ('{"audio": "AAAA", "max_tokens": ' + "9" * 5000 + "}", "JSON cannot be read"),
    ('{"audio": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}", "nested too deeply"),
    (b"\xff\xfe{not utf-8", "not valid JSON"),
])
def test_bad_json_is_a_400_that_says_why(port, body, words):
    response = chat(port, body)
    assert response.status_code == 400 and words in response.json()["error"]["message"]


def test_a_client_leaving_during_its_upload_is_not_an_application_error(port, caplog):
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n" + b'{"audio": "' + b"A" * 1000)
    time.sleep(0.5)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    assert "Exception in ASGI application" not in caplog.text


# ---------------------------------------------------------------------- /v1/realtime


async def events_until(ws, kind: str, timeout: float = 10.0) -> list[dict]:
    seen = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout=timeout))
        seen.append(event)
        if event["type"] == kind:
            return seen


async def ask_in_text(ws, steps: int = 1500) -> None:
    """A typed question and a long spoken answer to it."""
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}}))
    await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": steps}}))


def connect(port: int, **kwargs):
    return websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime", proxy=None, **kwargs)


def test_bad_events_get_errors_and_the_connection_stays_usable(port):
    async def run():
        async with connect(port) as ws:
            await events_until(ws, "session.created")
            cases = [
                ('{"type": "session.update", "session": {"max_output_tokens": ' + "9" * 5000 + "}}", "invalid_json"),
                ('{"type": "response.create", "response": {"metadata": ' + _nested(950) + "}}", "invalid_json"),
                (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                             "content": [{"type": "input_text", "text": "x" * 200_000}]}}), "input_text_too_long"),
                (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "invalid_audio"),
                (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
                (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
            ]
            for message, code in cases:
                await ws.send(message)
                errors = [e for e in await events_until(ws, "error") if e["type"] == "error"]
                assert errors[-1]["error"]["code"] == code and errors[-1]["error"]["message"]
                await ws.send(json.dumps({"type": "session.update", "session": {}}))
                await events_until(ws, "session.updated")  # still usable

    asyncio.run(run())


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def test_a_message_over_the_limit_closes_with_1009(port):
    async def run():
        async with connect(port, max_size=None) as ws:
            await events_until(ws, "session.created")
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(bytes(400_000)).decode()}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
            assert closed.value.rcvd.code == 1009

    asyncio.run(run())


def test_connections_over_the_limit_are_told_to_come_back(port, engine):
    async def run():
        held = [await connect(port).__aenter__() for _ in range(LIMITS.max_connections)]
        for ws in held:
            await events_until(ws, "session.created")
        async with connect(port) as extra:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(extra.recv(), timeout=10)
            assert closed.value.rcvd.code == 1013 and "try again later" in closed.value.rcvd.reason
        for ws in held:
            await ws.close()
        await asyncio.sleep(0.3)
        async with connect(port) as again:  # room again
            await events_until(again, "session.created")

    asyncio.run(run())


def test_an_idle_connection_is_closed_and_a_flood_is_stopped(port):
    async def run():
        async with connect(port) as ws:
            await events_until(ws, "session.created")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
            assert closed.value.rcvd.code == 1000 and "idle" in closed.value.rcvd.reason
        async with connect(port) as ws:
            await events_until(ws, "session.created")
            for _ in range(60):  # a burst within twice the rate: all served
                await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            codes = []
            for _ in range(400):
                await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            try:
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
                    if event["type"] == "error":
                        codes.append(event["error"]["code"])
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd.code == 1008 and "events per second" in closed.rcvd.reason
            assert codes and set(codes) == {"rate_limit_exceeded"}

    asyncio.run(run())


def test_metrics_have_histograms_connections_and_the_process(port, engine):
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    for name in ("miniomni_time_to_first_audio_seconds_bucket", "miniomni_decode_step_seconds_count",
                 "miniomni_open_connections", "miniomni_answers_total", "process_resident_memory_bytes",
                 "process_open_fds", "miniomni_free_slots"):
        assert name in text, name


# ---------------------------------------------------------------------- secrets and shutdown


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from miniomni.errors import MiniOmniError
    from miniomni.server.settings import api_key_from_args as _api_key

    args = argparse.Namespace(api_key=None, api_key_file=None)
    monkeypatch.delenv("MINIOMNI_API_KEY", raising=False)
    assert _api_key(args) is None
    monkeypatch.setenv("MINIOMNI_API_KEY", "from-env\n")
    assert _api_key(args) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\nsecond line ignored\n")
    assert _api_key(argparse.Namespace(api_key=None, api_key_file=str(key_file))) == "from-file"
    key_file.write_text("")
    with pytest.raises(MiniOmniError, match="empty"):
        _api_key(argparse.Namespace(api_key=None, api_key_file=str(key_file)))


def test_shutting_down_ends_answers_with_an_error_and_closes_with_1001(omni):
    engine = Engine(omni, max_answers=2)
    app = create_app(engine, ServerSettings())
    try:
        with serving(app) as port:
            async def run():
                async with connect(port) as ws:
                    await events_until(ws, "session.created")
                    await ask_in_text(ws)
                    await events_until(ws, "response.output_audio.delta")
                    shut_down(app)
                    seen = []
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        while True:
                            seen.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=10)))
                    assert closed.value.rcvd.code == 1001
                    errors = [e for e in seen if e["type"] == "error"]
                    assert errors and errors[0]["error"]["code"] == "server_shutting_down"
                    done = [e for e in seen if e["type"] == "response.done"]
                    assert done and done[0]["response"]["status"] == "failed"
                async with connect(port) as late:  # no new sessions once stopping
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        await asyncio.wait_for(late.recv(), timeout=10)
                    assert closed.value.rcvd.code == 1001

            asyncio.run(run())
            with pytest.raises(Exception, match="shutting down"):
                engine.open(AnswerRequest(task="T1T2", text="hi"), lambda e: None)
            assert wait_idle(engine)
    finally:
        engine.close()


@pytest.mark.slow
def test_sigterm_stops_the_server_cleanly_within_seconds(checkpoint_dir, tmp_path):
    with serve_process(checkpoint_dir, tmp_path / "serve.log") as (process, port):
        async def run():
            async with connect(port) as ws:
                await events_until(ws, "session.created")
                await ask_in_text(ws)
                await events_until(ws, "response.output_audio.delta", timeout=60)
                stopped = time.monotonic()
                process.send_signal(signal.SIGTERM)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(ws.recv(), timeout=10)
                assert closed.value.rcvd.code == 1001
                return stopped

        stopped = asyncio.run(run())
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - stopped < 8


def test_speech_is_heard_by_the_shared_vad_without_a_model_per_connection(port, engine):
    """Every connection shares one copy of the VAD weights: memory stays flat over many connections."""
    from miniomni.server.turns import vad

    async def run():
        for _ in range(20):
            async with connect(port) as ws:
                await events_until(ws, "session.created")
                pcm = (np.clip(speech_like(0.3, sample_rate=24000), -1, 1) * 32767).astype("<i2").tobytes()
                audio = base64.b64encode(pcm).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                await ws.send(json.dumps({"type": "session.update", "session": {}}))
                await events_until(ws, "session.updated")

    asyncio.run(run())
    assert vad._shared is not None and vad.shared_silero() is vad._shared


def test_a_text_frame_that_is_not_utf8_is_one_log_line_and_a_1007(port):
    import os

    records: list[logging.LogRecord] = []
    collect = logging.Handler()
    collect.emit = records.append  # uvicorn's loggers do not propagate to the root one
    logging.getLogger("uvicorn.error").addHandler(collect)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        key = base64.b64encode(os.urandom(16)).decode()
        raw.sendall(f"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 101")
        payload, mask = b"\xff\xfe not utf-8", os.urandom(4)
        raw.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        raw.settimeout(5)
        received = b""
        while b"\x88\x02\x03\xef" not in received:  # a close frame with code 1007
            chunk = raw.recv(4096)
            assert chunk, "the server closed without a 1007 close frame"
            received += chunk
    time.sleep(0.2)
    logging.getLogger("uvicorn.error").removeHandler(collect)
    said = [r for r in records if "not UTF-8" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None and "127.0.0.1:" in said[0].getMessage()
    assert not any(r.exc_info for r in records)  # no traceback for a client's fault
