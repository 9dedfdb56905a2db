"""Who may use the server: the API key (HTTP and WebSocket), browser origins, public paths."""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from .realtime.protocol import API_KEY_PROTOCOL
from .settings import ServerSettings


def client_secret_route(method: str, path: str) -> bool:
    """Where an ``ek_`` client secret stands in for the API key over HTTP (the route checks it): a WebRTC call."""
    return method == "POST" and path == "/v1/realtime/calls"


def is_public(path: str) -> bool:
    """The page and its scripts hold no data, and a browser cannot send a bearer header when it
    loads a page: they stay public; the page sends the API key the user types with its WebSocket."""
    return path == "/" or path.startswith("/static/")


def key_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison, so response times do not tell how much of a key was right."""
    return hmac.compare_digest(presented.encode(), expected.encode())


def bearer_ok(headers: Headers, api_key: str) -> bool:
    """``Authorization: Bearer KEY`` with the right key."""
    header = headers.get("authorization", "")
    return header.startswith("Bearer ") and key_matches(header[len("Bearer "):], api_key)


def choose_subprotocol(offered: list[str]) -> str | None:
    """Browsers fail the handshake unless one offered subprotocol is selected; never echo the key."""
    if "realtime" in offered:
        return "realtime"
    for protocol in offered:
        if not protocol.startswith(API_KEY_PROTOCOL):
            return protocol
    return None


def websocket_refusal(headers: Headers, settings: ServerSettings, offered: list[str],
                      client_secret_ok: bool = False) -> str | None:
    """Why a WebSocket handshake is refused, or None. The HTTP middleware does not see WebSockets.
    ``client_secret_ok``: the client presented a live ``ek_`` key (:mod:`.realtime.ephemeral`) instead of
    the API key."""
    origin = headers.get("origin")
    if origin is not None:
        allowed = settings.cors_origins or []
        host = (headers.get("host") or "").lower()
        if "*" not in allowed and origin not in allowed and urlsplit(origin).netloc.lower() != host:
            return f"origin not allowed (add it with --cors-origin): {origin}"
    if settings.api_key and not client_secret_ok:
        if bearer_ok(headers, settings.api_key):
            return None
        for protocol in offered:
            if protocol.startswith(API_KEY_PROTOCOL) and key_matches(protocol[len(API_KEY_PROTOCOL):],
                                                                     settings.api_key):
                return None
        return ("missing or wrong API key (send Authorization: Bearer KEY, or subprotocol openai-insecure-api-key.KEY; "
                "KEY may be an ek_ client secret)")
    return None
