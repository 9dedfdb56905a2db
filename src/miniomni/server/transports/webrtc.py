"""``POST /v1/realtime/calls``: one WebRTC peer connection carries one Realtime session (:mod:`..realtime.session`).

The client's SDP offer comes in, the SDP answer (ICE fully gathered, no trickle) goes back.
The ``oai-events`` data channel carries the same JSON events as the WebSocket; the microphone
arrives on the remote audio track (Opus 48 kHz, resampled here to 24 kHz for the session) and the
answer leaves on a local audio track, paced in 20 ms frames, silent when idle: the session hands
it samples through :class:`~..realtime.context.AudioOutput` instead of sending ``response.output_audio.delta``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.policy
import fractions
import logging
import os
import time
from collections.abc import Sequence
from email.parser import BytesParser
from typing import Any

import av
import numpy as np
import soxr
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ...audio import float_to_pcm16
from ..bodies import BodyTooLarge, ClientDisconnect, read_body
from ..engine import Engine
from ..realtime.ephemeral import KeyRefused, preconfigure
from ..realtime.protocol import PROTOCOL_SAMPLE_RATE, ClientError, new_id, parse_json
from ..realtime.session import RealtimeSession
from ..replies import error_response
from ..settings import ServerSettings
from .admission import STOPPING, closed, count_refused, opened, refusal
from .base import Transport

log = logging.getLogger(__name__)

TRACK_RATE = 48000
FRAME_SAMPLES = TRACK_RATE // 50  # 20 ms
CONNECT_TIMEOUT = 30.0  # seconds for a peer to connect after its answer, else it is dropped
MAX_OFFER_BYTES = 64 * 1024
ICE_SERVERS_ENV = "MINIOMNI_ICE_SERVERS"  # comma-separated STUN/TURN URLs; none by default (host candidates)


def ice_configuration() -> RTCConfiguration:
    """ICE servers from ``MINIOMNI_ICE_SERVERS``; an empty list, not aiortc's default public STUN server."""
    urls = [u.strip() for u in os.environ.get(ICE_SERVERS_ENV, "").split(",") if u.strip()]
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in urls])


def restrict_host_addresses(addresses: Sequence[str]) -> None:
    """Gather ICE host candidates on these addresses only, in this process (peers of both ends included).

    aioice gathers every address of the machine except loopback; a server that listens on loopback, and
    the tests and benchmarks, give ``["127.0.0.1"]`` so that no WebRTC traffic leaves the loopback.
    """
    import aioice.ice

    chosen = [str(a) for a in addresses]
    original = getattr(aioice.ice, "_every_host_address", aioice.ice.get_host_addresses)
    aioice.ice._every_host_address = original

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (use_ipv6 if ":" in a else use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


class AnswerTrack(MediaStreamTrack):
    """The answer's audio: 20 ms frames of 48 kHz mono s16, paced in real time, silence when idle."""

    kind = "audio"

    def __init__(self, call: WebRTCCall) -> None:
        super().__init__()
        self.call = call
        self.started_at: float | None = None
        self.timestamp = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.started_at is None:
            self.started_at = time.monotonic()
        else:
            self.timestamp += FRAME_SAMPLES
            wait = self.started_at + self.timestamp / TRACK_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        samples = self.call.next_samples(FRAME_SAMPLES)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = TRACK_RATE
        frame.pts = self.timestamp
        frame.time_base = fractions.Fraction(1, TRACK_RATE)
        return frame


class WebRTCCall(Transport):
    """One peer connection and its session; an :class:`~..realtime.context.AudioOutput`; runs on the event loop."""

    def __init__(self, engine: Engine, settings: ServerSettings, model: str) -> None:
        self.call_id = new_id("rtc")
        self.pc = RTCPeerConnection(ice_configuration())
        self.channel: Any = None
        self.pending: list[str] = []  # events said before the data channel opened
        self.inbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.ended = asyncio.Event()
        self.connected = asyncio.Event()
        self.main_task: asyncio.Task | None = None
        self.tasks: set[asyncio.Task] = set()
        # playback: chunks of 48 kHz int16 samples, each with the response it belongs to
        self.queue: collections.deque[tuple[str, np.ndarray]] = collections.deque()
        self.playing: str | None = None  # the response whose audio the track plays (or last played)
        self.played = 0  # its samples played, at 48 kHz
        self.stopped_sent = True
        self.arrived: dict[str, float] = {}  # response -> when its first audio reached the track (not started yet)
        self.track = AnswerTrack(self)
        self.playout = settings.webrtc_playout
        self.session = RealtimeSession(engine, settings, model, self, plays_audio=True)
        self.pc.on("datachannel", self.on_datachannel)
        self.pc.on("track", self.on_track)
        self.pc.on("connectionstatechange", self.on_state)

    # ------------------------------------------------------------------ what the session needs

    def send_text(self, data: str) -> None:
        if self.closing:
            return
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(data)
        else:
            self.pending.append(data)

    def play(self, response_id: str, item_id: str, audio: np.ndarray) -> None:
        """Queue 24 kHz float32 samples of an answer; the track takes them 20 ms at a time."""
        samples = soxr.resample(np.asarray(audio, dtype=np.float32), PROTOCOL_SAMPLE_RATE, TRACK_RATE)
        if not any(queued == response_id for queued, _ in self.queue) and response_id != self.playing:
            self.arrived[response_id] = time.monotonic()
        self.queue.append((response_id, np.frombuffer(float_to_pcm16(samples), dtype=np.int16)))

    def ready(self, response_id: str) -> bool:
        """Whether a new answer may start: held ``settings.webrtc_playout`` seconds after its first audio reached
        the track (the jitter buffer a WebSocket client keeps itself, so the codec's ramp-up plays without a
        gap), or complete."""
        running = self.session.response
        complete = running is None or running.id != response_id
        return complete or time.monotonic() >= self.arrived.get(response_id, 0.0) + self.playout

    def stop_playing(self) -> int:
        """Drop the queued audio; the milliseconds of the answer being played that were played."""
        self.queue.clear()
        self.arrived.clear()
        self.stopped_sent = True  # cleared, not stopped
        return self.played * 1000 // TRACK_RATE

    def next_samples(self, n: int) -> np.ndarray:
        """The track's next ``n`` samples: queued answer audio, then silence; says started and stopped."""
        out = np.zeros(n, dtype=np.int16)
        filled = 0
        while filled < n and self.queue:
            response_id, chunk = self.queue[0]
            if response_id != self.playing or self.stopped_sent:
                if not self.ready(response_id):
                    break
                self.arrived.pop(response_id, None)
                if not self.stopped_sent and self.playing is not None:
                    self.say({"type": "output_audio_buffer.stopped", "response_id": self.playing})
                self.playing, self.played, self.stopped_sent = response_id, 0, False
                self.say({"type": "output_audio_buffer.started", "response_id": response_id})
            take = min(n - filled, len(chunk))
            out[filled:filled + take] = chunk[:take]
            filled += take
            self.played += take
            if take == len(chunk):
                self.queue.popleft()
            else:
                self.queue[0] = (response_id, chunk[take:])
        if not self.queue and not self.stopped_sent and self.playing is not None:
            running = self.session.response
            if running is None or running.id != self.playing:  # its answer is over and all of it played
                self.stopped_sent = True
                self.say({"type": "output_audio_buffer.stopped", "response_id": self.playing})
        return out

    def say(self, event: dict[str, Any]) -> None:
        self.session.send(event)

    # ------------------------------------------------------------------ the peer

    def on_datachannel(self, channel: Any) -> None:
        if channel.label != "oai-events":
            log.info("webrtc call %s: ignoring data channel %r", self.call_id, channel.label)
            return
        self.channel = channel
        channel.on("message", lambda message: self.inbox.put_nowait(message if isinstance(message, str) else None))
        channel.on("open", self.flush_pending)
        channel.on("close", lambda: self.abort(1000, "the client closed its data channel"))
        if channel.readyState == "open":
            self.flush_pending()

    def flush_pending(self) -> None:
        pending, self.pending = self.pending, []
        for data in pending:
            self.channel.send(data)

    def on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self.spawn(self.listen(track))

    def on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self.connected.set()
        elif state in ("failed", "closed"):
            self.abort(1000, f"the peer connection is {state}")

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def listen(self, track: MediaStreamTrack) -> None:
        """The microphone: decoded frames, resampled to 24 kHz mono 16-bit, into the session's input buffer."""
        resampler: soxr.ResampleStream | None = None
        rate = 0
        while not self.closing:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            samples = frame.to_ndarray()
            channels = len(frame.layout.channels)
            if frame.format.is_planar:
                mono = samples.astype(np.float32).mean(axis=0)
            else:
                mono = samples.reshape(-1, channels).astype(np.float32).mean(axis=1)
            if samples.dtype == np.int16:
                mono /= 32768.0
            if resampler is None or frame.sample_rate != rate:
                rate = frame.sample_rate
                resampler = soxr.ResampleStream(rate, PROTOCOL_SAMPLE_RATE, 1, dtype="float32")
            pcm = float_to_pcm16(resampler.resample_chunk(mono))
            # A microphone track never stops: without turn detection the buffer keeps its latest audio.
            await self.session.append_audio(pcm, rolling=True)

    async def read_events(self) -> None:
        while not self.closing:
            message = await self.inbox.get()
            await self.session.receive(message)

    # ------------------------------------------------------------------ life and end

    async def answer(self, offer: str) -> str:
        """Take the offer; the SDP answer once ICE gathering is complete."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        self.pc.addTrack(self.track)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    def stopped(self) -> None:
        self.ended.set()  # run() cleans up

    def describe(self) -> str:
        return f"webrtc call {self.call_id}"

    async def run(self) -> None:
        """The call's life: connected within :data:`CONNECT_TIMEOUT`, then until it ends; then closed."""
        self.spawn(self.read_events())
        try:
            # A call hung up or failed before it connects ends at once: its connection slot is free again.
            waiting = [asyncio.ensure_future(self.connected.wait()), asyncio.ensure_future(self.ended.wait())]
            done, pending = await asyncio.wait(waiting, timeout=CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if not done:
                self.abort(1000, f"not connected within {CONNECT_TIMEOUT:g} s")
            await self.ended.wait()
        finally:
            self.closing = True
            self.session.close()
            channel = self.channel
            if channel is not None and channel.readyState == "open":  # the last words (the error) still go out
                deadline = time.monotonic() + 2
                while channel.bufferedAmount and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            for task in list(self.tasks):
                task.cancel()
            self.track.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), timeout=5)


def check_offer(offer: str) -> None:
    """A ClientError unless ``offer`` looks like an SDP offer whose ICE candidates can be used as given."""
    if "m=" not in offer or not offer.lstrip().startswith("v=0"):
        raise ClientError("the body is not an SDP offer (it must start with v=0 and have m= lines)")
    for line in offer.splitlines():
        if not line.startswith("a=candidate:"):
            continue
        fields = line[len("a=candidate:"):].split()
        # foundation component transport priority address port "typ" type ...
        numbers = fields[1:2] + fields[3:4] + fields[5:6]
        if (len(fields) < 8 or fields[6] != "typ" or not all(n.isdigit() for n in numbers)
                or not 0 <= int(fields[5]) <= 65535 or not 1 <= int(fields[1]) <= 256
                or not 0 <= int(fields[3]) < 2 ** 32):
            raise ClientError(f"the offer's ICE candidate {line.strip()[:200]!r} is malformed (a candidate is "
                              "foundation, component 1-256, transport, priority below 2^32, address, port 0-65535, "
                              "typ and a type)", param="sdp")


def form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The text fields of a ``multipart/form-data`` body (the standard library's MIME parser)."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", errors="replace") + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    if not message.is_multipart():
        raise ClientError("the multipart/form-data body could not be read (a boundary is missing?)")
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True) or b""
            fields[name] = payload.decode("utf-8", errors="replace")
    return fields


async def read_offer(request: Request, settings: ServerSettings) -> tuple[str, Any]:
    """The SDP offer and the optional session configuration, or a ClientError."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in ("application/sdp", "multipart/form-data"):
        raise ClientError(f"send the SDP offer as application/sdp (or multipart/form-data with \"sdp\" and "
                          f"\"session\"), not {kind or 'no content type'}", code="unsupported_media_type")
    try:
        body = await read_body(request, min(MAX_OFFER_BYTES, settings.max_request_bytes))
    except BodyTooLarge:
        raise ClientError(f"an offer is at most {MAX_OFFER_BYTES} bytes", code="offer_too_large") from None
    if kind == "application/sdp":
        return body.decode("utf-8", errors="replace"), None
    fields = form_fields(content_type, body)
    if "sdp" not in fields:
        raise ClientError("the form needs an \"sdp\" field with the SDP offer", param="sdp")
    session = fields.get("session")
    return fields["sdp"], None if session is None else parse_json(session, "the session field")


def _refusal(app: FastAPI, settings: ServerSettings) -> Response | None:
    """Why no call can start now (shutting down, every connection in use), as the 503 that says so; or None."""
    refused = refusal(app, settings)
    if refused is None:
        return None
    count_refused(app, 503)
    kind, message = refused
    return error_response(503, message, "server_error" if kind == STOPPING else "server_busy")


async def _answer_offer(app: FastAPI, engine: Engine, settings: ServerSettings, request: Request,
                        model: str) -> tuple[WebRTCCall, str] | Response:
    """A configured call and its SDP answer, or the error response that says why not."""
    try:  # an ek_ client secret instead of the API key (the middleware let it through): its configuration
        grant = app.state.client_secrets.from_headers(request.headers)
    except KeyRefused as exc:
        return error_response(401, str(exc), "authentication_error")
    try:
        offer, session = await read_offer(request, settings)
        check_offer(offer)
    except ClientError as exc:
        status = {"unsupported_media_type": 415, "offer_too_large": 413}.get(exc.code, 400)
        return error_response(status, exc.message)
    except ClientDisconnect:
        log.info("a WebRTC caller went away during its offer's upload")
        return Response(status_code=400)
    call = WebRTCCall(engine, settings, (grant.model if grant else None) or model)
    if session is not None or grant is not None:
        try:  # the key's configuration, then the form's; session.created, sent below, shows them
            await preconfigure(call.session, [grant.session if grant else None, session])
        except ClientError as exc:
            await call.pc.close()
            return error_response(400, f"session: {exc.message}")
    try:
        return call, await call.answer(offer)
    except Exception as exc:  # noqa: BLE001 - aiortc raises ValueError, AttributeError and others for a bad offer
        call.abort(None, None)
        try:
            await call.pc.close()
        except Exception as failure:  # noqa: BLE001 - a half-built peer connection may fail to close; it is dropped
            log.info("a refused offer's peer connection did not close cleanly (%s: %s)", type(failure).__name__,
                     failure)
        return error_response(400, f"the SDP offer was refused ({type(exc).__name__}: {exc})")


def add_webrtc_routes(app: FastAPI, engine: Engine, settings: ServerSettings) -> None:
    """``POST /v1/realtime/calls`` and the hang-up routes; calls share ``app.state.connections``."""
    calls: dict[str, WebRTCCall] = {}
    if settings.webrtc_addresses is not None:
        restrict_host_addresses(settings.webrtc_addresses)

    @app.post("/v1/realtime/calls", status_code=201, responses={201: {"content": {"application/sdp": {}}}})
    async def create_call(request: Request, model: str = "mini-omni") -> Response:
        """A WebRTC Realtime session: the body is the SDP offer, the answer the SDP answer (see docs/server.md)."""
        refused = _refusal(app, settings)
        if refused is not None:
            return refused
        made = await _answer_offer(app, engine, settings, request, model)
        if isinstance(made, Response):
            return made
        call, answer = made
        calls[call.call_id] = call
        opened(app, call)  # at once: the next offer already counts it
        call.session.start()

        async def lifetime() -> None:
            try:
                await call.run()
            finally:
                calls.pop(call.call_id, None)
                closed(app, call)

        call.main_task = asyncio.create_task(lifetime())
        return Response(answer, status_code=201, media_type="application/sdp",
                        headers={"Location": f"/v1/realtime/calls/{call.call_id}"})

    async def hang_up(call_id: str) -> Response:
        call = calls.pop(call_id, None)
        if call is None:
            return error_response(404, f"no call {call_id!r} (it has ended, or never was)")
        call.abort(1000, "the client hung up")
        return Response(status_code=200)

    @app.post("/v1/realtime/calls/{call_id}/hangup")
    async def hangup(call_id: str) -> Response:
        """End a call."""
        return await hang_up(call_id)

    @app.delete("/v1/realtime/calls/{call_id}")
    async def delete_call(call_id: str) -> Response:
        """End a call (the same as its hangup)."""
        return await hang_up(call_id)
