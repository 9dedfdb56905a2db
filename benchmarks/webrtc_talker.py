"""A talker of benchmarks/conversation.py over WebRTC: the microphone on an Opus track, the answer on the server's.

The question and the room noise leave on an audio track at 48 kHz, 20 ms a frame, in
real time; events travel on the ``oai-events`` data channel; the answer arrives on the
server's track, which the server paces in real time and fills with silence when it has
no audio. So the client keeps no player of its own: a gap is silence the server had to
send in the middle of an answer (between its first sound and
``output_audio_buffer.stopped``), whatever the client's buffer. Each run of silence
inside an answer counts as a dry-out (the same figure in both buffer columns).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import time
from collections import deque

import av
import httpx
import numpy as np
import soxr
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from talk import RATE, Answer, TalkerLog, room_noise, turn_detection

from miniomni.server.transports.webrtc import restrict_host_addresses

TRACK_RATE = 48000
FRAME = TRACK_RATE // 50  # 20 ms
SILENT = 8  # a decoded frame whose samples all stay within this (16-bit units) is silence


class Microphone(MediaStreamTrack):
    """Plays what is queued in real time, room noise when nothing is; notes when a marked sample left."""

    kind = "audio"

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__()
        self.rng = rng
        self.queue: deque[np.ndarray] = deque()
        self.sent = 0  # samples sent (48 kHz)
        self.queued_until = 0  # the sample count once everything queued has left
        self.marks: list[tuple[int, asyncio.Event, list[float]]] = []
        self.clock: float | None = None

    def play(self, audio_24k: np.ndarray) -> tuple[asyncio.Event, list[float]]:
        """Queue audio; the event is set (and the time noted) when its last sample has been sent."""
        audio = soxr.resample(audio_24k, RATE, TRACK_RATE).astype(np.float32)
        self.queue.append(audio)
        self.queued_until = max(self.queued_until, self.sent) + len(audio)
        mark = (self.queued_until, asyncio.Event(), [])
        self.marks.append(mark)
        return mark[1], mark[2]

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.clock is None:
            self.clock = time.perf_counter()
        wait = self.clock + (self.sent + FRAME) / TRACK_RATE - time.perf_counter()  # a frame leaves once "spoken"
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = np.zeros(0, dtype=np.float32)
        while len(chunk) < FRAME and self.queue:
            head = self.queue.popleft()
            take = FRAME - len(chunk)
            chunk = np.concatenate([chunk, head[:take]])
            if len(head) > take:
                self.queue.appendleft(head[take:])
        if len(chunk) < FRAME:
            noise = soxr.resample(room_noise((FRAME - len(chunk)) / TRACK_RATE + 0.01, self.rng), RATE, TRACK_RATE)
            chunk = np.concatenate([chunk, noise[: FRAME - len(chunk)]])
        pcm = (np.clip(chunk, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = TRACK_RATE, self.sent, fractions.Fraction(1, TRACK_RATE)
        self.sent += FRAME
        now = time.perf_counter()
        for mark in [m for m in self.marks if m[0] <= self.sent]:
            mark[2].append(now)
            mark[1].set()
            self.marks.remove(mark)
        return frame


async def talker(index: int, base_url: str, args: argparse.Namespace, question: np.ndarray, log: TalkerLog) -> None:
    """One talker over WebRTC: ``args.rounds`` questions, each answered before the next."""
    rng = np.random.default_rng(index)
    await asyncio.sleep(index * args.stagger)
    restrict_host_addresses(["127.0.0.1"])  # this benchmark's WebRTC traffic stays on loopback
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("oai-events")
    events: asyncio.Queue = asyncio.Queue()
    channel.on("message", lambda message: events.put_nowait(json.loads(message)))
    mic = Microphone(rng)
    pc.addTrack(mic)
    heard: list[tuple[float, int, bool]] = []  # (arrival, samples per channel at 48 kHz, silent)

    async def listen(track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            samples = frame.to_ndarray().ravel()  # (Opus decodes to stereo: both channels, interleaved)
            heard.append((time.perf_counter(), frame.samples, bool(np.abs(samples).max() <= SILENT)))

    listeners: list[asyncio.Task] = []
    pc.on("track", lambda track: listeners.append(asyncio.create_task(listen(track))))
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        reply = await http.post("/v1/realtime/calls", content=pc.localDescription.sdp,
                                headers={"Content-Type": "application/sdp"})
        if reply.status_code != 201:
            log.errors.append(f"offer refused: {reply.status_code} {reply.text[:200]}")
            await pc.close()
            return
        await pc.setRemoteDescription(RTCSessionDescription(sdp=reply.text, type="answer"))
        try:
            await until(events, "session.created", log, 30)
            channel.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "max_output_tokens": args.answer_steps,
                "audio": {"input": {"turn_detection": turn_detection(args)}},
            }}))
            for _ in range(args.rounds):
                mic.play(room_noise(args.lead_in, rng))
                spoken, when = mic.play(question)
                await spoken.wait()
                answer = Answer(speech_end=when[0])
                log.answers.append(answer)
                first = len(heard)
                answer.taken = (await until(events, "response.created", log, args.answer_timeout))["_at"]
                done = await until(events, "response.done", log, args.answer_timeout)
                answer.response_id, answer.status = done["response"]["id"], done["response"]["status"]
                stopped = await until(events, "output_audio_buffer.stopped", log, args.answer_timeout)
                answer.deltas, answer.gaps = answer_frames(heard[first:], answer.speech_end, stopped["_at"])
                answer.first_audio = answer.deltas[0][0] if answer.deltas else None
                mic.play(room_noise(0.3, rng))
        except TimeoutError as exc:
            log.errors.append(f"timed out: {exc}")
        finally:
            await http.post(reply.headers["location"] + "/hangup")
    await pc.close()
    for task in listeners:
        task.cancel()


async def until(events: asyncio.Queue, kind: str, log: TalkerLog, timeout: float) -> dict:
    """The next event of this type (its arrival time under ``_at``); errors on the way are logged."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=max(0.01, deadline - time.perf_counter()))
        except asyncio.TimeoutError:
            raise TimeoutError(f"no {kind}") from None
        event["_at"] = time.perf_counter()
        if event["type"] == "error":
            log.errors.append(event["error"]["message"])
        if event["type"] == kind:
            return event


def answer_frames(frames: list[tuple[float, int, bool]], after: float,
                  stopped: float) -> tuple[list[tuple[float, float]], tuple[int, float]]:
    """The answer's sound as (arrival, seconds) frames, and its gaps: (runs of silence between its first and last
    sound, their seconds in all)."""
    window = [f for f in frames if after <= f[0] <= stopped]
    loud = [i for i, (_, _, silent) in enumerate(window) if not silent]
    if not loud:
        return [], (0, 0.0)
    inside = window[loud[0] : loud[-1] + 1]
    runs, seconds, previous_silent = 0, 0.0, False
    for _, samples, silent in inside:
        if silent:
            seconds += samples / TRACK_RATE
            runs += not previous_silent
        previous_silent = silent
    return [(arrival, samples / TRACK_RATE) for arrival, samples, silent in inside if not silent], (runs, seconds)
