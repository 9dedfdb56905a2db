"""What the conversation benchmarks' talkers share: the protocol's rate, quiet room noise, the turn
detection they ask for, and what they log of each answer (WebSocket talkers in conversation.py,
WebRTC ones in webrtc_talker.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np

RATE = 24000  # the Realtime protocol's PCM rate


def room_noise(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Quiet broadband noise (about -55 dBFS), below what a VAD calls speech."""
    white = rng.standard_normal(int(seconds * RATE)).astype(np.float32)
    return (0.0018 * np.convolve(white, np.ones(4, dtype=np.float32) / 2, mode="same")).astype(np.float32)


@dataclass
class Answer:
    speech_end: float  # when the chunk holding the question's last speech sample was sent
    response_id: str | None = None
    taken: float | None = None  # when the response was announced: the server took the turn
    first_audio: float | None = None
    deltas: list[tuple[float, float]] = field(default_factory=list)  # (arrival, seconds of audio)
    status: str | None = None
    gaps: tuple[int, float] | None = None  # measured by the transport itself (WebRTC): (dry-outs, seconds)


@dataclass
class TalkerLog:
    answers: list[Answer] = field(default_factory=list)
    cancelled: int = 0
    errors: list[str] = field(default_factory=list)


def turn_detection(args: argparse.Namespace) -> dict:
    """The talkers' turn detection: server VAD with --silence-ms, or semantic VAD (its model ends the turn)."""
    if getattr(args, "detection", "server_vad") == "semantic_vad":
        return {"type": "semantic_vad", "eagerness": "auto"}
    return {"type": "server_vad", "silence_duration_ms": args.silence_ms}
