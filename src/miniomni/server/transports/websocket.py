"""``WS /v1/realtime``: one WebSocket carries one Realtime session (:mod:`..realtime.session`).

Here is only the transport: the socket's receive loop, a send queue with back-pressure,
idle and close handling, and the route with its admission checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..access import choose_subprotocol, websocket_refusal
from ..engine import Engine
from ..realtime.ephemeral import KeyRefused, preconfigure
from ..realtime.protocol import ClientError
from ..realtime.session import RealtimeSession
from ..settings import ServerSettings
from .admission import STOPPING, count_refused, hold, refusal
from .base import Transport

log = logging.getLogger(__name__)

# Queued outgoing events of one connection, in bytes of JSON. A client that stops reading
# lets it fill (the socket blocks first); past this its answer is stopped and it is closed.
# (It holds several of the largest messages: items are echoed back, some twice.)
MAX_PENDING_BYTES = 16 * 1024 * 1024


class RealtimeConnection(Transport):
    """One WebSocket and its session; runs on the event loop."""

    def __init__(self, websocket: WebSocket, engine: Engine, settings: ServerSettings, model: str) -> None:
        self.ws = websocket
        self.settings = settings
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.pending_bytes = 0
        self.main_task: asyncio.Task | None = None
        self.session = RealtimeSession(engine, settings, model, self)

    # ------------------------------------------------------------------ what the session needs

    def send_text(self, data: str) -> None:
        if self.closing:
            return
        if self.pending_bytes + len(data) > MAX_PENDING_BYTES:
            self.abort(1008, "the client is not reading its events")
            return
        self.pending_bytes += len(data)
        self.outbox.put_nowait(data)

    def stopped(self) -> None:
        if self.main_task is not None and self.main_task is not asyncio.current_task():
            self.main_task.cancel()  # the receive loop ends

    async def sender(self) -> None:
        try:
            while True:
                data = await self.outbox.get()
                self.pending_bytes -= len(data)
                await self.ws.send_text(data)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the client went away; the receive side ends the session
            self.abort(None, None)

    async def flush(self) -> None:
        while not self.outbox.empty():
            data = self.outbox.get_nowait()
            self.pending_bytes -= len(data)
            await self.ws.send_text(data)

    async def run(self) -> None:
        self.main_task = asyncio.current_task()
        sender = asyncio.create_task(self.sender())
        try:
            self.session.start()
            while not self.closing:
                message = await self.receive()
                if message is None or message["type"] == "websocket.disconnect":
                    return
                await self.session.receive(message.get("text"))
        except asyncio.CancelledError:
            if self.close_reason is None and not self.closing:
                raise
            uncancel = getattr(self.main_task, "uncancel", None)
            if uncancel is not None:
                uncancel()
        finally:
            self.closing = True
            self.session.close()
            if self.close_reason is not None and self.close_reason[0] in (1000, 1001):
                # A normal close: what was said before it (the error, the failed response) still goes out.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.flush(), timeout=2)
            sender.cancel()
            if self.close_reason is not None and self.ws.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):  # the client may be gone already
                    await asyncio.wait_for(self.ws.close(*self.close_reason), timeout=2)

    async def receive(self) -> dict[str, Any] | None:
        """The next WebSocket message, or None when the connection ends (closed, or idle too long)."""
        while True:
            try:
                return await asyncio.wait_for(self.ws.receive(), timeout=self.settings.idle_timeout)
            except asyncio.TimeoutError:
                if self.session.response is None:
                    self.abort(1000, f"no event for {self.settings.idle_timeout:g} s: closing the idle connection")
                    return None
            except (WebSocketDisconnect, RuntimeError):
                return None


def add_realtime_routes(app: FastAPI, engine: Engine, settings: ServerSettings) -> None:
    """``WS /v1/realtime``; its connections join the app's registry of open transports."""

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        """OpenAI Realtime protocol (GA event names); see docs/server.md."""
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        grant, reason = None, None
        try:  # an ek_ client secret instead of the API key: its session configuration comes with it
            grant = app.state.client_secrets.from_headers(websocket.headers, offered)
        except KeyRefused as exc:
            reason = str(exc)
        reason = reason or websocket_refusal(websocket.headers, settings, offered, client_secret_ok=grant is not None)
        code = 1008
        if reason is None and (refused := refusal(app, settings)) is not None:
            kind, reason = refused
            code = 1001 if kind == STOPPING else 1013
        await websocket.accept(subprotocol=choose_subprotocol(offered))
        if reason is not None:
            count_refused(app, code)
            await websocket.close(code=code, reason=reason.encode()[:123].decode(errors="ignore"))
            return
        model = (grant.model if grant else None) or websocket.query_params.get("model") or "mini-omni"
        connection = RealtimeConnection(websocket, engine, settings, model)
        if grant is not None:
            try:
                await preconfigure(connection.session, [grant.session])
            except ClientError as exc:  # checked when the key was made; the server's state may have changed
                connection.session.error(f"the client secret's session: {exc.message}", exc.code, exc.param)
        await hold(app, connection, connection.run)


async def close_all(app: FastAPI, message: str, timeout: float = 3.0) -> None:
    """Shutting down: every connection's answer ends with an error event, and the connection with code 1001;
    then every other answer of the engine ends with ``message``.

    Returns once every connection has sent its close frame (or after ``timeout`` seconds), so that the
    HTTP server, stopped after this, does not close them first with its own code.
    """
    app.state.stopping = True
    connections = list(getattr(app.state, "connections", ()))
    for connection in connections:
        connection.shut_down()
    app.state.engine.request_shutdown(message)
    running = [c.main_task for c in connections if c.main_task is not None and not c.main_task.done()]
    if running:
        await asyncio.wait(running, timeout=timeout)
