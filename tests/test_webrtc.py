"""POST /v1/realtime/calls on loopback: an aiortc client speaks on its track, hears the answer on the server's,
and talks the Realtime protocol over the oai-events data channel; hang-up, a wrong key, a bad offer."""

from __future__ import annotations

import asyncio
import fractions
import json
import time

import httpx
import numpy as np
import pytest
from conftest import engine_fixture, port_fixture, serving, speech_like, wait_idle

from miniomni.server.app import create_app
from miniomni.server.settings import ServerSettings

aiortc = pytest.importorskip("aiortc", reason="the WebRTC transport needs aiortc (pip install -e '.[server]')")
av = pytest.importorskip("av", reason="aiortc needs PyAV")

from aiortc import (  # noqa: E402 - after the skip
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError  # noqa: E402

pytestmark = pytest.mark.slow

RATE = 48000
FRAME = RATE // 50


engine = engine_fixture(2)
port = port_fixture(ServerSettings())
keyed_port = port_fixture(ServerSettings(api_key="sekret"))


class Microphone(MediaStreamTrack):
    """A 48 kHz mono track that plays ``audio`` once in real time, then silence; ``done`` once it has played."""

    kind = "audio"

    def __init__(self, audio: np.ndarray) -> None:
        super().__init__()
        self.pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        self.position = 0
        self.started: float | None = None
        self.done = asyncio.Event()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.started is None:
            self.started = time.monotonic()
        wait = self.started + self.position / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = np.zeros(FRAME, dtype=np.int16)
        piece = self.pcm[self.position:self.position + FRAME]
        chunk[:len(piece)] = piece
        if self.position >= len(self.pcm):
            self.done.set()
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self.position
        frame.time_base = fractions.Fraction(1, RATE)
        self.position += FRAME
        return frame


async def audio_offer() -> str:
    """An aiortc offer with the events channel and a microphone track, its peer closed again."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("oai-events")
    pc.addTrack(Microphone(np.zeros(RATE // 10, dtype=np.float32)))
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def next_event(events: asyncio.Queue, kind: str, seen: list[dict], timeout: float = 60) -> dict:
    """The next event of this type (every event on the way goes into ``seen``)."""
    deadline = time.monotonic() + timeout
    while True:
        event = await asyncio.wait_for(events.get(), timeout=max(0.01, deadline - time.monotonic()))
        seen.append(event)
        if event["type"] == kind:
            return event


def test_call_answers_on_the_track(port, engine):
    async def run() -> tuple[list[dict], list[np.ndarray], int]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        channel = pc.createDataChannel("oai-events")
        events: asyncio.Queue = asyncio.Queue()
        channel.on("message", lambda message: events.put_nowait(json.loads(message)))
        mic = Microphone(speech_like(1.5, sample_rate=RATE))
        pc.addTrack(mic)
        heard: list[np.ndarray] = []

        async def listen(track: MediaStreamTrack) -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                heard.append(frame.to_ndarray().ravel())

        listeners = []
        pc.on("track", lambda track: listeners.append(asyncio.create_task(listen(track))))
        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            reply = await http.post("/v1/realtime/calls", content=pc.localDescription.sdp,
                                    headers={"Content-Type": "application/sdp"})
            assert reply.status_code == 201, reply.text
            assert reply.headers["content-type"].startswith("application/sdp")
            location = reply.headers["location"]
            assert location.startswith("/v1/realtime/calls/")
            await pc.setRemoteDescription(RTCSessionDescription(sdp=reply.text, type="answer"))
            seen: list[dict] = []
            await next_event(events, "session.created", seen, timeout=30)
            channel.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "audio": {"input": {"turn_detection": None}}}}))
            updated = await next_event(events, "session.updated", seen)
            assert updated["session"]["audio"]["input"]["turn_detection"] is None
            await asyncio.wait_for(mic.done.wait(), timeout=30)
            await asyncio.sleep(0.5)  # the last frames on their way
            channel.send(json.dumps({"type": "input_audio_buffer.commit"}))
            committed = await next_event(events, "input_audio_buffer.committed", seen)
            assert committed["item_id"]
            # a short answer (about 4 s of speech), so that the track plays it out soon
            channel.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 48}}))
            done = await next_event(events, "response.done", seen, timeout=120)
            assert done["response"]["status"] == "completed", done
            try:
                await next_event(events, "output_audio_buffer.stopped", seen, timeout=60)
            except TimeoutError:
                raise AssertionError(f"no output_audio_buffer.stopped after {[e['type'] for e in seen]}") from None
            hangup = await http.post(f"{location}/hangup")
            assert 200 <= hangup.status_code < 300, hangup.text
            gone = await http.post(f"{location}/hangup")
            assert gone.status_code == 404
        await pc.close()
        for task in listeners:
            task.cancel()
        return seen, heard, len(mic.pcm)

    seen, heard, _ = asyncio.run(run())
    types = [event["type"] for event in seen]
    assert "error" not in types, [e for e in seen if e["type"] == "error"]
    assert "response.output_audio.delta" not in types
    started = types.index("output_audio_buffer.started")
    assert started < types.index("output_audio_buffer.stopped")
    response_id = seen[types.index("response.done")]["response"]["id"]
    assert seen[started]["response_id"] == response_id
    assert heard, "no frame arrived on the answer track"
    samples = np.concatenate(heard)
    assert np.abs(samples).max() > 100, "the answer track carried only silence"
    assert wait_idle(engine)


def test_multipart_offer_with_session(port, engine):
    async def run() -> list[dict]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        channel = pc.createDataChannel("oai-events")
        events: asyncio.Queue = asyncio.Queue()
        channel.on("message", lambda message: events.put_nowait(json.loads(message)))
        pc.addTrack(Microphone(np.zeros(RATE // 10, dtype=np.float32)))
        await pc.setLocalDescription(await pc.createOffer())
        session = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        seen: list[dict] = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            refused = await http.post("/v1/realtime/calls", files={"sdp": (None, pc.localDescription.sdp),
                                                                  "session": (None, "{not json")})
            assert refused.status_code == 400, refused.text
            reply = await http.post("/v1/realtime/calls", files={"sdp": (None, pc.localDescription.sdp),
                                                                "session": (None, json.dumps(session))})
            assert reply.status_code == 201, reply.text
            await pc.setRemoteDescription(RTCSessionDescription(sdp=reply.text, type="answer"))
            created = await next_event(events, "session.created", seen, timeout=30)
            assert created["session"]["audio"]["input"]["turn_detection"] is None
            channel.send(json.dumps({"type": "output_audio_buffer.clear"}))
            await next_event(events, "output_audio_buffer.cleared", seen)
            ended = await http.delete(reply.headers["location"])
            assert ended.status_code == 200, ended.text
        await pc.close()
        return seen

    seen = asyncio.run(run())
    assert "error" not in [event["type"] for event in seen], seen
    assert "session.updated" not in [event["type"] for event in seen]  # session.created already shows it
    assert wait_idle(engine)


def test_bad_offers_and_keys(port, keyed_port):
    with httpx.Client(timeout=30) as http:
        url = f"http://127.0.0.1:{port}/v1/realtime/calls"
        bad = http.post(url, content="hello", headers={"Content-Type": "application/sdp"})
        assert bad.status_code == 400 and "SDP" in bad.json()["error"]["message"]
        garbled = http.post(url, content="v=0\r\nm=audio nonsense\r\n", headers={"Content-Type": "application/sdp"})
        assert garbled.status_code == 400, garbled.text
        wrong_type = http.post(url, content="v=0", headers={"Content-Type": "text/plain"})
        assert wrong_type.status_code == 415, wrong_type.text
        unknown = http.delete(f"{url}/rtc_nope")
        assert unknown.status_code == 404
        keyed = f"http://127.0.0.1:{keyed_port}/v1/realtime/calls"
        refused = http.post(keyed, content="v=0", headers={"Content-Type": "application/sdp",
                                                          "Authorization": "Bearer wrong"})
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]


def test_calls_hung_up_before_they_connect_free_their_slot_at_once(engine):
    """Offer then hang up, again and again: every call gets a slot, and none is held afterwards."""
    app = create_app(engine, ServerSettings(max_connections=2))

    async def run(port: int) -> list[int]:
        statuses = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for _ in range(5):
                reply = await http.post("/v1/realtime/calls", content=await audio_offer(),
                                        headers={"Content-Type": "application/sdp"})
                statuses.append(reply.status_code)
                if reply.status_code == 201:
                    assert (await http.delete(reply.headers["location"])).status_code == 200
                    deadline = time.monotonic() + 5
                    while app.state.connections and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
        return statuses

    with serving(app) as port:
        statuses = asyncio.run(run(port))
        assert statuses == [201] * 5, statuses  # with the 30 s connect watchdog holding them: 201, 201, 503, ...
        assert not app.state.connections


def raw_request(port: int, head: str, body: bytes, timeout: float = 10) -> bytes:
    """Send a request's head and part of its body on a plain socket; what the server answered (or b"")."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + body)
        try:
            return sock.recv(4096)
        except TimeoutError:
            return b""


def test_a_cut_upload_is_one_log_line_and_an_oversized_one_is_refused_unread(port, keyed_port, capfd, caplog):
    import logging
    import socket

    caplog.set_level(logging.INFO, logger="miniomni")
    for target, headers in ((port, "Content-Type: application/sdp\r\n"),
                            (keyed_port, "Content-Type: application/json\r\nAuthorization: Bearer sekret\r\n")):
        path = "/v1/realtime/calls" if target == port else "/v1/realtime/client_secrets"
        with socket.create_connection(("127.0.0.1", target), timeout=10) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 5000\r\n\r\nv=0\r\n".encode())
        # Declared far over the limit, a few bytes sent: the answer comes at once, nothing is buffered.
        answer = raw_request(target, f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 300000000\r\n\r\n",
                             b"v=0\r\n")
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    time.sleep(0.5)
    logged = capfd.readouterr().err
    assert "Traceback" not in logged and "Exception in ASGI application" not in logged, logged[-2000:]
    said = caplog.text
    assert "went away during its offer's upload" in said and "client_secrets client went away" in said, said


def test_a_chunked_offer_over_the_limit_is_refused(port):
    def chunks():
        for _ in range(64):
            yield b"a=x" + b"y" * 16 * 1024 + b"\r\n"

    with httpx.Client(timeout=30) as http:
        reply = http.post(f"http://127.0.0.1:{port}/v1/realtime/calls", content=chunks(),
                          headers={"Content-Type": "application/sdp"})
    assert reply.status_code == 413, reply.text


def test_a_malformed_candidate_is_a_400_naming_it(port):
    sdp = asyncio.run(audio_offer())
    bad = sdp.replace("a=mid:0\r\n", "a=mid:0\r\na=candidate:1 1 udp 1 127.0.0.1 70000 typ host\r\n", 1)
    assert bad != sdp
    with httpx.Client(timeout=30) as http:
        reply = http.post(f"http://127.0.0.1:{port}/v1/realtime/calls", content=bad,
                          headers={"Content-Type": "application/sdp"})
    assert reply.status_code == 400, reply.text
    assert "70000" in reply.json()["error"]["message"] and "candidate" in reply.json()["error"]["message"]


def test_answers_announce_only_the_chosen_addresses(port):
    from miniomni.server.settings import webrtc_addresses

    with httpx.Client(timeout=30) as http:
        reply = http.post(f"http://127.0.0.1:{port}/v1/realtime/calls", content=asyncio.run(audio_offer()),
                          headers={"Content-Type": "application/sdp"})
        assert reply.status_code == 201, reply.text
        assert http.delete(f"http://127.0.0.1:{port}{reply.headers['location']}").status_code == 200
    candidates = [line.split()[4] for line in reply.text.splitlines() if line.startswith("a=candidate:")]
    assert candidates and set(candidates) == {"127.0.0.1"}, candidates
    import argparse

    assert webrtc_addresses(argparse.Namespace(webrtc_address=None, host="127.0.0.1")) == ("127.0.0.1",)
    assert webrtc_addresses(argparse.Namespace(webrtc_address=None, host="0.0.0.0")) is None
    assert webrtc_addresses(argparse.Namespace(webrtc_address=["10.1.2.3"], host="127.0.0.1")) == ("10.1.2.3",)


def test_damaged_offers_are_refused_and_never_a_server_error(port):
    """Seeded damage to a real offer (lines dropped, swapped, cut, garbled; impossible candidates): each is a
    201 or a 4xx that says why, never a 500 (aiortc fails on some half-built connections as it closes them)."""
    import random
    from collections import Counter

    from fuzzcases import good_offer, mutate_offer

    offer = asyncio.run(good_offer())
    rng = random.Random(0)
    statuses: Counter = Counter()
    with httpx.Client(timeout=30) as client:
        for _ in range(60):
            response = client.post(f"http://127.0.0.1:{port}/v1/realtime/calls", content=mutate_offer(offer, rng),
                                   headers={"content-type": "application/sdp"})
            statuses[response.status_code] += 1
            if response.status_code == 201:
                client.delete(f"http://127.0.0.1:{port}" + response.headers["location"])
            else:
                assert response.json()["error"]["message"]
    assert set(statuses) <= {201, 400}, statuses
    assert statuses[400] > 0
