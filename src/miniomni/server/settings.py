"""What ``miniomni serve`` lets an operator set: access, limits, the end-of-turn model."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field


@dataclass
class ServerSettings:
    """Settings shared by the HTTP routes and the Realtime WebSocket."""

    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_audio_seconds: float = 30.0
    max_request_bytes: int = 64 * 1024 * 1024
    max_tokens_limit: int = 2048
    speculate: bool = True  # answer a spoken turn while the VAD makes sure it has ended (see turns.py)
    max_connections: int = 64  # open Realtime WebSocket connections, idle ones included
    max_message_bytes: int = 4 * 1024 * 1024  # the largest WebSocket message (30 s of PCM is under 2 MB)
    idle_timeout: float = 300.0  # seconds without a client event while no answer runs
    max_events_per_second: float = 200.0  # per connection, in bursts of up to twice that
    webrtc_playout: float = 0.2  # seconds a WebRTC answer waits on the track after its first audio (a jitter buffer)
    turn_model: str | None = None  # semantic VAD's end-of-turn model file (None: the pipecat-ai wheel's copy, if any)


def settings_from_args(args: argparse.Namespace, api_key: str | None, turn_model: str | None) -> ServerSettings:
    """The settings ``miniomni serve``'s flags ask for (the key and the model file resolved by the caller)."""
    return ServerSettings(api_key=api_key, cors_origins=args.cors_origin, max_audio_seconds=args.max_audio_seconds,
                          speculate=not args.no_speculation, max_connections=args.max_connections,
                          idle_timeout=args.idle_timeout, max_message_bytes=int(args.max_message_mb * 1024 * 1024),
                          max_request_bytes=int(args.max_request_mb * 1024 * 1024),
                          max_events_per_second=args.max_events_per_second, turn_model=turn_model,
                          webrtc_playout=args.webrtc_playout_ms / 1000)
