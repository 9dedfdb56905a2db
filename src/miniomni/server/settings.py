"""What ``miniomni serve`` lets an operator set: access, limits."""

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
