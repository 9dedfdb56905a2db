"""What the parts of a Realtime session share: the session's state and voice, and what a transport provides.

:class:`~.session.RealtimeSession` is a :class:`SessionContext`; its parts (:mod:`.conversation`,
:mod:`.transcripts`, :mod:`.answers`, :mod:`.listening`) are handed it and read or say nothing else.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import numpy as np

from ..engine import Engine
from ..settings import ServerSettings
from ..turns.taking import InputTurns
from .protocol import SessionConfig


class Output(Protocol):
    """What a transport does for its session."""

    def send_text(self, data: str) -> None:
        """Queue one server event (JSON text) for the client; never blocks."""

    def close(self, code: int, reason: str) -> None:
        """End the connection with this code and reason."""


class AudioOutput(Output, Protocol):
    """A transport that plays answers itself (a media track) instead of sending audio deltas."""

    def play(self, response_id: str, item_id: str, audio: np.ndarray) -> None:
        """Queue 24 kHz float32 samples of this answer for playback."""

    def stop_playing(self) -> int:
        """Drop what is queued; returns the milliseconds of the current answer played so far."""


class SessionContext(Protocol):
    """The session as its parts see it."""

    engine: Engine
    settings: ServerSettings
    config: SessionConfig
    turns: InputTurns
    loop: asyncio.AbstractEventLoop
    conversation_id: str
    closing: bool
    output: Any  # an Output; with plays_audio an AudioOutput
    plays_audio: bool

    def send(self, event: dict[str, Any]) -> None:
        """Say a server event; never blocks."""

    def error(self, message: str, code: str | None = None, param: str | None = None,
              kind: str = "invalid_request_error", event_id: str | None = None) -> None:
        """Say an ``error`` event."""
