"""What ``miniomni serve`` lets an operator set: access, limits, the end-of-turn model."""

from __future__ import annotations

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
    turn_model: str | None = None  # semantic VAD's end-of-turn model file (None: the pipecat-ai wheel's copy, if any)
