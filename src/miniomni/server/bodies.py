"""Request bodies read within a limit: refused as soon as they pass it, never buffered whole first."""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect, Request

__all__ = ["BodyTooLarge", "ClientDisconnect", "read_body"]

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    """A request body over the limit (said before it is read whole)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes (chunked uploads included).

    Raises :class:`BodyTooLarge`, or starlette's ``ClientDisconnect`` when the client went away mid-upload.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"the request body of {length} bytes exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"the request body exceeds {limit} bytes")
    return bytes(body)
