"""Short-lived client keys: ``POST /v1/realtime/client_secrets`` makes an ``ek_`` key a page may hold.

A backend (or the web page, once its user typed the server's key) asks for a key with the server's API
key; the ``ek_`` key then opens Realtime sessions (``POST /v1/realtime/calls``, ``WS /v1/realtime``)
instead of the server's key until it expires, any number of times, as OpenAI's keys do. Each session it
opens starts with the configuration the key was made with (``session.created`` shows it); the client
may change it afterwards with ``session.update``.

Keys live in memory only, at most :data:`MAX_LIVE` at once; they are looked up by their SHA-256 (so a
lookup's timing says nothing about a key's characters). Expired keys are purged as keys are made and
used; their digests are remembered a while longer, so that a late client is told its key expired
rather than that it is unknown.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from ..bodies import BodyTooLarge, ClientDisconnect, read_body
from ..settings import ServerSettings
from ..turns.vad import vad_available
from .protocol import (
    API_KEY_PROTOCOL,
    ClientError,
    SessionConfig,
    new_id,
    parse_json,
    parse_session_update,
    session_object,
)

log = logging.getLogger(__name__)

PREFIX = "ek_"
DEFAULT_SECONDS = 600  # OpenAI's default lifetime: 10 minutes
MIN_SECONDS, MAX_SECONDS = 10, 7200  # OpenAI's bounds
MAX_LIVE = 4096  # live keys at once; past this, a new one is refused (429) until some expire
REMEMBER_EXPIRED = 4096  # digests of expired keys kept to say "expired" (the oldest forgotten first)
MAX_BODY_BYTES = 256 * 1024
DEFAULT_MODEL = "mini-omni"


class KeyRefused(Exception):
    """An ``ek_`` key that opens nothing: unknown or expired (the message says which)."""


@dataclass(frozen=True)
class Grant:
    """What a live key grants: a session that starts with ``session`` (a ``session.update`` body)."""

    expires_at: int
    session: dict[str, Any]
    model: str | None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", errors="surrogateescape")).digest()


def _shown(value: str) -> str:
    """A key as a log or an error may show it: its first characters only."""
    return value[:7] + "…" if len(value) > 7 else value


class ClientSecrets:
    """The live ``ek_`` keys of one server (in memory, bounded); ``clock`` gives Unix seconds."""

    def __init__(self, max_live: int = MAX_LIVE, clock: Callable[[], float] = time.time) -> None:
        self.max_live = max_live
        self.clock = clock
        self.live: dict[bytes, Grant] = {}
        self.expiry: list[tuple[int, bytes]] = []  # a heap of (expires_at, digest) of the live keys
        self.expired: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    def purge(self) -> None:
        """Forget the keys whose time is up (remembering that they expired)."""
        now = self.clock()
        while self.expiry and self.expiry[0][0] <= now:
            expires_at, digest = heapq.heappop(self.expiry)
            if self.live.pop(digest, None) is not None:
                self.expired[digest] = expires_at
                while len(self.expired) > REMEMBER_EXPIRED:
                    self.expired.popitem(last=False)

    def create(self, body: Any, settings: ServerSettings) -> dict[str, Any]:
        """A new key for a client_secrets request body (parsed JSON, or None); the response body.

        Raises :class:`ClientError` for a bad body, :class:`OverflowError` when :attr:`max_live` keys live.
        """
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ClientError("the body must be a JSON object: {\"expires_after\": {...}, \"session\": {...}}")
        seconds = parse_expires_after(body.get("expires_after"))
        session = body.get("session")
        if session is None:
            session = {}
        if not isinstance(session, dict):
            raise ClientError("session must be an object (a session configuration, as session.update takes)",
                              param="session")
        config = parse_session_update(session, SessionConfig(), settings.max_tokens_limit)
        if config.turn_detection is not None and not vad_available():
            raise ClientError("turn detection needs the silero-vad package on the server; set "
                              "session.audio.input.turn_detection to null", code="vad_unavailable",
                              param="session.audio.input.turn_detection")
        model = session.get("model")
        if model is not None and not isinstance(model, str):
            raise ClientError("session.model must be a string", param="session.model")
        self.purge()
        if len(self.live) >= self.max_live:
            raise OverflowError(f"{self.max_live} client secrets are live; try again when some have expired")
        value = PREFIX + secrets.token_hex(24)
        expires_at = int(self.clock()) + seconds
        digest = _digest(value)
        self.live[digest] = Grant(expires_at, {key: item for key, item in session.items() if key != "model"}, model)
        heapq.heappush(self.expiry, (expires_at, digest))
        shown = session_object(new_id("sess"), model or DEFAULT_MODEL, config)
        return {"value": value, "expires_at": expires_at, "session": shown}

    def check(self, value: str) -> Grant:
        """The grant of a live key; :class:`KeyRefused` (saying why) for an expired or unknown one."""
        self.purge()
        digest = _digest(value)
        grant = self.live.get(digest)
        if grant is not None:
            return grant
        if digest in self.expired:
            raise KeyRefused(f"the client secret {_shown(value)} expired at {self.expired[digest]} (Unix time); "
                             "ask POST /v1/realtime/client_secrets for a new one")
        raise KeyRefused(f"unknown client secret {_shown(value)} (never made by this server, or forgotten "
                         "since it expired; a restarted server forgets them all)")

    def from_headers(self, headers: Headers, offered: Sequence[str] = ()) -> Grant | None:
        """The grant of the ``ek_`` key a request presents (``Authorization: Bearer ek_...``, or a WebSocket's
        ``openai-insecure-api-key.ek_...`` subprotocol), None when it presents none; :class:`KeyRefused`."""
        value = presented_client_secret(headers, offered)
        return None if value is None else self.check(value)


def presented_client_secret(headers: Headers, offered: Sequence[str] = ()) -> str | None:
    """The ``ek_`` key in the bearer header or an offered key subprotocol, if any."""
    header = headers.get("authorization", "")
    if header.startswith("Bearer " + PREFIX):
        return header[len("Bearer "):]
    for protocol in offered:
        if protocol.startswith(API_KEY_PROTOCOL + PREFIX):
            return protocol[len(API_KEY_PROTOCOL):]
    return None


def parse_expires_after(value: Any) -> int:
    """Seconds to live from ``{"anchor": "created_at", "seconds": N}`` (both optional; 600 by default)."""
    if value is None:
        return DEFAULT_SECONDS
    if not isinstance(value, dict):
        raise ClientError("expires_after must be an object: {\"anchor\": \"created_at\", \"seconds\": 600}",
                          param="expires_after")
    anchor = value.get("anchor", "created_at")
    if anchor != "created_at":
        raise ClientError(f"expires_after.anchor must be \"created_at\", got {anchor!r}", param="expires_after.anchor")
    seconds = value.get("seconds", DEFAULT_SECONDS)
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ClientError(f"expires_after.seconds must be an integer from {MIN_SECONDS} to {MAX_SECONDS}, "
                          f"got {seconds!r}", param="expires_after.seconds")
    return seconds


async def preconfigure(session: Any, updates: list[dict[str, Any] | None]) -> None:
    """Apply session configurations (``session.update`` bodies, None skipped) before ``session.created``,
    which then shows them: no ``session.updated`` is said. A bad one raises :class:`ClientError`."""
    for update in updates:
        if update is not None:
            await session.configure(update, announce=False)


def add_client_secret_routes(app: FastAPI, settings: ServerSettings) -> ClientSecrets:
    """``POST /v1/realtime/client_secrets`` (behind the API key, like every HTTP route); the key store,
    also kept as ``app.state.client_secrets`` for the Realtime routes."""
    store = ClientSecrets()
    app.state.client_secrets = store

    def refuse(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
               ) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)

    @app.post("/v1/realtime/client_secrets")
    async def client_secrets(request: Request) -> JSONResponse:
        """A short-lived ``ek_`` key for a Realtime session with this configuration (see docs/server.md).

        Body (optional): ``{"expires_after": {"anchor": "created_at", "seconds": 600}, "session": {...}}``.
        Answer: ``{"value": "ek_...", "expires_at": <Unix time>, "session": {...the session object...}}``.
        """
        if presented_client_secret(request.headers) is not None:
            return refuse(401, "a client secret cannot make client secrets: send the server's API key",
                          "authentication_error")
        try:
            body = await read_body(request, MAX_BODY_BYTES)
        except BodyTooLarge:
            return refuse(413, f"the body is over {MAX_BODY_BYTES} bytes")
        except ClientDisconnect:
            log.info("a client_secrets client went away during its upload")
            return JSONResponse({}, status_code=400)
        try:
            payload = parse_json(body, "the body") if body.strip() else None
            answer = store.create(payload, settings)
        except ClientError as exc:
            return refuse(400, exc.message, param=exc.param)
        except OverflowError as exc:
            return refuse(429, str(exc), "rate_limit_error")
        return JSONResponse(answer)

    return store
