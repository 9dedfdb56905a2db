"""What every transport does the same way: whether a new one may open, and its registration for as long
as it runs (the app's registry of open transports, the connection metric, the heap trimmed after)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI

from ..heap import trim_heap
from ..settings import ServerSettings

STOPPING = "stopping"
FULL = "full"


def refusal(app: FastAPI, settings: ServerSettings) -> tuple[str, str] | None:
    """(kind, message) when no transport may open now: ``STOPPING`` (the server is shutting down) or ``FULL``
    (every connection is in use); None when one may. Each transport says it in its own words (close code, status)."""
    if getattr(app.state, "stopping", False):
        return STOPPING, "the server is shutting down"
    if len(app.state.connections) >= settings.max_connections:
        return FULL, f"all {settings.max_connections} connections are in use; try again later"
    return None


def count_refused(app: FastAPI, code: int) -> None:
    """One more refused connection, by the code or status it was refused with."""
    app.state.metrics.refused.labels(reason=str(code)).inc()


def opened(app: FastAPI, transport: Any) -> None:
    """``transport`` counts as open from now on (against the limit, for shutdown, in the metrics)."""
    app.state.connections.add(transport)
    app.state.metrics.connections.inc()


def closed(app: FastAPI, transport: Any) -> None:
    """``transport`` has ended: it no longer counts, and the memory its answers used goes back."""
    app.state.connections.discard(transport)
    app.state.metrics.connections.dec()
    trim_heap()


async def hold(app: FastAPI, transport: Any, run: Callable[[], Awaitable[None]]) -> None:
    """Run ``transport`` registered as open; unregistered when it ends, however it ends."""
    opened(app, transport)
    try:
        await run()
    finally:
        closed(app, transport)
