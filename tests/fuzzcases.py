"""A seeded fuzzer for ``/v1/realtime`` and ``POST /chat``, shared by the test suite and benchmarks/fuzz.py.

Cases are mutations of valid client events and bodies: wrong and missing types and fields,
huge, negative and non-finite numbers, invalid and enormous base64, odd byte counts, NaN
audio, empty and over-long audio, non-UTF-8 and binary frames, deep nesting, events out of
order, floods, and disconnects in the middle of all of it. After each case the connection
is probed with an empty ``session.update``: it must answer, or have been closed with a
documented code. Meanwhile a control session asks the same spoken question again and
again; every answer must be byte for byte the answer it gets alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
import soundfile as sf
import websockets

RATE = 24000
# Close codes a server may use on a misbehaving client (never 1011, an internal error).
ALLOWED_CLOSES = {1000, 1001, 1008, 1009, 1013}
ERROR_CODES = {
    "invalid_json", "binary_frame", "invalid_event", "unknown_event_type", "unsupported_event", "invalid_value",
    "unsupported_audio_format", "invalid_audio", "input_audio_buffer_full", "input_audio_too_long",
    "input_audio_buffer_commit_empty", "response_no_input", "conversation_already_has_active_response",
    "response_cancel_not_active", "server_busy", "response_failed", "vad_unavailable", "input_text_too_long",
    "rate_limit_exceeded", "item_truncate_invalid_item_id", "item_truncate_invalid_audio_end_ms",
}


def pcm(seconds: float, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * 2000).clip(-32768, 32767).astype("<i2").tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def valid_events(rng: random.Random) -> list[dict]:
    audio = b64(pcm(0.2, rng.randrange(1000)))
    return [
        {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"],
                                               "audio": {"input": {"turn_detection": None}}}},
        {"type": "session.update", "session": {"modalities": ["text", "audio"], "turn_detection": {
            "type": "server_vad", "threshold": 0.5, "silence_duration_ms": 300}, "max_response_output_tokens": 8}},
        {"type": "input_audio_buffer.append", "audio": audio},
        {"type": "input_audio_buffer.commit"},
        {"type": "input_audio_buffer.clear"},
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "hello there"}]}},
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                      "content": [{"type": "input_audio", "audio": audio}]}},
        {"type": "response.create", "response": {"max_output_tokens": 6, "metadata": {"k": "v"}}},
        {"type": "response.create"},
        {"type": "response.cancel"},
        {"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 100},
        {"type": "session.update", "session": {"audio": {"input": {"transcription": {"model": "mini-omni"}}}}},
        {"type": "transcription_session.update", "session": {"input_audio_transcription": {"model": "m"},
                                                             "turn_detection": None}},
        {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"transcription": None}}}},
    ]


def _weird_value(rng: random.Random) -> object:
    return rng.choice([
        None, True, False, 0, -1, -(10**9), 10**6, 2**63, 1e308, -1e-308, float("nan"), float("inf"),
        float("-inf"), "", "x" * rng.choice([1, 1000, 50_000]), [], {}, [1, "a", None], {"type": 3},
        "%%%not base64%%%", "AAA", b64(b"\x01"), "\u0000\ud7ff\ue000", "inf",
    ])


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths(child, prefix + (index,))
    return out


def _set(value: object, path: tuple, new: object, delete: bool = False) -> object:
    if not path:
        return new
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return value


def mutate(event: dict, rng: random.Random) -> str | bytes:
    """One mutated event, as the text (or bytes) of a WebSocket frame."""
    kind = rng.randrange(12)
    event = json.loads(json.dumps(event))
    paths = [p for p in _paths(event) if p]
    if kind == 0 and paths:  # a missing field
        _set(event, rng.choice(paths), None, delete=True)
    elif kind in (1, 2, 3) and paths:  # a wrong value anywhere
        _set(event, rng.choice(paths), _weird_value(rng))
    elif kind == 4:  # a wrong or unknown type
        event["type"] = rng.choice(["", "response.create.", "conversation.item.truncate", "nope", 7, None,
                                    "transcription_session.update", "session.update"])
    elif kind == 5:  # deep nesting
        depth = rng.choice([20, 40, 900])
        event["extra"] = json.loads("[" * depth + "]" * depth)
    elif kind == 6:  # a number too long for Python's int parser
        return json.dumps(event)[:-1] + ', "n": ' + "7" * rng.choice([10, 5000]) + "}"
    elif kind == 7:  # not JSON, or not UTF-8, or binary
        return rng.choice([b"\x00\xff\xfe binary", "{not json", "", "[]", "null", "\"type\"", b"\x80" * 100])
    elif kind == 8:  # odd, empty or enormous audio
        event = {"type": "input_audio_buffer.append",
                 "audio": rng.choice([b64(b"\x01\x02\x03"), "", b64(pcm(rng.choice([0.0, 0.01, 3.0])))])}
    elif kind == 9:  # over the message limit
        event = {"type": "input_audio_buffer.append", "audio": "A" * (600 * 1024)}
    elif kind == 10:  # NaN and infinities as JSON numbers
        event.setdefault("session", {})
        if isinstance(event["session"], dict):
            event["session"]["max_output_tokens"] = rng.choice([float("nan"), float("inf"), -5, 3.5])
    return json.dumps(event)


SEQUENCES = [  # events in orders a protocol does not expect
    [{"type": "response.cancel"}, {"type": "response.create"}],
    [{"type": "input_audio_buffer.commit"}, {"type": "input_audio_buffer.commit"}],
    [{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}}, {"type": "response.create"}, {"type": "response.create"},
     {"type": "response.cancel"}, {"type": "response.cancel"}],
    [{"type": "session.update", "session": {"max_output_tokens": i}} for i in range(1, 60)],
    [{"type": "input_audio_buffer.append", "audio": b64(pcm(31.0))}, {"type": "input_audio_buffer.commit"}],
]


@dataclass
class Report:
    cases: int = 0
    errors: Counter = field(default_factory=Counter)  # error codes received
    closes: Counter = field(default_factory=Counter)  # close codes
    crashes: list[str] = field(default_factory=list)  # anything that shows a server bug
    disconnects: int = 0
    control_answers: int = 0
    control_differences: int = 0
    chat_statuses: Counter = field(default_factory=Counter)


async def _drain_until(ws, kind: str, report: Report, timeout: float, oversized: bool = False,
                       marker: str | None = None) -> bool:
    """Read events until ``kind`` (whose session carries ``marker``, if given); False if the connection closed first.

    After a message over the limit the server closes with 1009; a client that went on sending
    may see the connection drop (1006) before it reads that frame.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = await asyncio.wait_for(ws.recv(), timeout=max(0.05, deadline - time.monotonic()))
        except websockets.ConnectionClosed as closed:
            code = await _close_code(ws, closed)
            report.closes[code] += 1
            if code not in ALLOWED_CLOSES and not (oversized and code == 1006):
                report.crashes.append(f"connection closed with {code} {closed.rcvd.reason if closed.rcvd else ''}")
            return False
        except asyncio.TimeoutError:
            report.crashes.append(f"no {kind} within {timeout} s")
            return False
        event = json.loads(message)
        if event["type"] == "error":
            error = event["error"]
            report.errors[error.get("code")] += 1
            if error.get("code") not in ERROR_CODES or not error.get("message"):
                report.crashes.append(f"error event {error}")
        if event["type"] == kind and (marker is None or event.get("session", {}).get("instructions") == marker):
            return True


async def _connect(port: int):
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime", proxy=None, max_size=None)
    await ws.recv()  # session.created
    await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}))
    while json.loads(await ws.recv())["type"] != "session.updated":
        pass
    return ws


async def _close_code(ws, closed: websockets.ConnectionClosed) -> int | None:
    """The code the server closed with (1006: the connection dropped without a closing handshake)."""
    if closed.rcvd is not None:
        return closed.rcvd.code
    # A send can fail before the close frame that came in was read: wait for it.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(ws.wait_closed(), timeout=2)
    return ws.close_code


async def fuzz_realtime(port: int, cases: int, seed: int, report: Report, max_message_bytes: int) -> None:
    rng = random.Random(seed)
    ws = await _connect(port)
    try:
        for _ in range(cases):
            report.cases += 1
            if rng.random() < 0.1:
                frames = [json.dumps(e) for e in rng.choice(SEQUENCES)]
            else:
                frames = [mutate(rng.choice(valid_events(rng)), rng) for _ in range(rng.choice([1, 1, 2, 3]))]
            vanish = rng.random() < 0.05
            oversized = any(len(frame) > max_message_bytes for frame in frames)
            try:
                for frame in frames:
                    await ws.send(frame)
                if vanish:  # a client that just goes away, whatever it was doing
                    report.disconnects += 1
                    ws.transport.abort()
                    ws = await _connect(port)
                    continue
                # The probe carries a mark: earlier cases may have left replies of their own in flight.
                marker = f"probe {report.cases}"
                await ws.send(json.dumps({"type": "session.update", "session": {"instructions": marker}}))
                alive = await _drain_until(ws, "session.updated", report, timeout=30, oversized=oversized,
                                           marker=marker)
            except websockets.ConnectionClosed as closed:
                code = await _close_code(ws, closed)
                report.closes[code] += 1
                if code not in ALLOWED_CLOSES and not (oversized and code == 1006):
                    report.crashes.append(f"connection closed with {code} while sending")
                alive = False
            if not alive:
                await ws.close()
                ws = await _connect(port)
    finally:
        await ws.close()


async def spoken_answer(port: int, question: bytes, steps: int) -> bytes:
    """The audio of one answer to ``question`` (committed by hand, no VAD)."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime", proxy=None, max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {
            "max_output_tokens": steps, "audio": {"input": {"turn_detection": None}}}}))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(question)}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "response.create"}))
        audio = bytearray()
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=60))
            if event["type"] == "response.output_audio.delta":
                audio += base64.b64decode(event["delta"])
            elif event["type"] == "error" and event["error"]["code"] == "server_busy":
                await asyncio.sleep(0.05)
                await ws.send(json.dumps({"type": "response.create"}))
            elif event["type"] == "response.done":
                if event["response"]["status"] != "completed":
                    raise RuntimeError(f"the control answer ended {event['response']['status']}")
                return bytes(audio)


async def control(port: int, question: bytes, steps: int, expected: bytes, stop: asyncio.Event,
                  report: Report) -> None:
    while not stop.is_set():
        audio = await spoken_answer(port, question, steps)
        report.control_answers += 1
        report.control_differences += audio != expected


def chat_bodies(rng: random.Random) -> bytes | str:
    buffer = io.BytesIO()
    kind = rng.randrange(8)
    if kind == 0:  # float WAV with NaN, Inf or clipping
        samples = np.sin(np.arange(8000) / 10).astype(np.float32) * rng.choice([1.0, 40.0])
        samples[rng.randrange(8000)] = rng.choice([np.nan, np.inf, 5.0])
        sf.write(buffer, samples, 16000, format="WAV", subtype="FLOAT")
    elif kind == 1:  # a rate too low, or too long
        sf.write(buffer, np.zeros(rng.choice([100, 50_000]), np.float32), rng.choice([1000, 8000]), format="WAV")
    elif kind == 2:  # empty audio
        sf.write(buffer, np.zeros(0, np.float32), 16000, format="WAV")
    else:
        sf.write(buffer, (np.random.default_rng(kind).standard_normal(8000) * 0.1).astype(np.float32), 16000,
                 format="WAV", subtype="PCM_16")
    body: dict = {"audio": b64(buffer.getvalue()), "max_tokens": rng.choice([1, 4, 8])}
    roll = rng.random()
    if roll < 0.25:
        _set(body, rng.choice([p for p in _paths(body) if p]), _weird_value(rng))
    elif roll < 0.35:
        _set(body, rng.choice([p for p in _paths(body) if p]), None, delete=True)
    elif roll < 0.5:
        return rng.choice([b"\xff\xfe not utf-8", "{not json", "", "[" * 3000 + "]" * 3000,
                           '{"audio": "AAAA", "max_tokens": ' + "9" * 5000 + "}", "null", "[]"])
    return json.dumps(body)


def fuzz_chat(port: int, cases: int, seed: int, report: Report) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=60) as client:
        for _ in range(cases):
            report.cases += 1
            body = chat_bodies(rng)
            response = client.post(f"http://127.0.0.1:{port}/chat", content=body,
                                   headers={"content-type": "application/json"})
            report.chat_statuses[response.status_code] += 1
            if response.status_code >= 500 and response.status_code != 503:
                report.crashes.append(f"/chat answered {response.status_code}")
            elif 400 <= response.status_code < 500:
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = ""
                if not message:
                    report.crashes.append(f"/chat {response.status_code} without a message")


# ---------------------------------------------------------------------- WebRTC offers


async def good_offer() -> str:
    """A real browser-like offer (aiortc): an audio track and the oai-events data channel, loopback only."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    from miniomni.server.transports.webrtc import restrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    await pc.close()
    return offer


def mutate_offer(offer: str, rng: random.Random) -> str:
    """A damaged offer: lines dropped, swapped, cut, garbled, or candidates with impossible values."""
    lines = offer.strip().split("\r\n")
    kind = rng.randrange(6)
    if kind == 0:
        del lines[rng.randrange(len(lines))]
    elif kind == 1:
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == 2:
        cut = rng.randrange(len(lines))
        lines[cut] = lines[cut][: rng.randrange(len(lines[cut]) + 1)]
    elif kind == 3:
        port = rng.choice([0, 65536, 70000, -1, 99999999, "x"])
        lines.append(f"a=candidate:1 1 udp {rng.choice([1, -5, 'p'])} 127.0.0.1 {port} typ {rng.choice(['host', 'x'])}")
    elif kind == 4:
        line = rng.randrange(len(lines))
        lines[line] = "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(1, 80)))
    else:
        lines = lines[: rng.randrange(len(lines))]
    return "\r\n".join(lines) + "\r\n"
