"""What every transport of a Realtime session shares: it ends once, with a close code and a reason."""

from __future__ import annotations

import logging

from ..realtime.session import RealtimeSession

log = logging.getLogger(__name__)


class Transport:
    """A connection carrying one :class:`~..realtime.session.RealtimeSession`; it is the session's Output."""

    session: RealtimeSession
    closing: bool = False
    close_reason: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.abort(code, reason)

    def shut_down(self) -> None:
        """The server is stopping: the session says so and the transport closes with 1001 (going away)."""
        self.session.shut_down()

    def abort(self, code: int | None, reason: str | None) -> None:
        """End it: its answers are cancelled at once, then :meth:`stopped` lets the transport's loops end."""
        if self.closing:
            return
        if code is not None:
            log.log(logging.INFO if code in (1000, 1001) else logging.WARNING, "%s: %s; closing it", self.describe(),
                    reason)
            self.close_reason = (code, reason or "")
        self.closing = True
        self.session.close()
        self.stopped()

    def stopped(self) -> None:
        """The transport's own part of ending (wake its loops)."""

    def describe(self) -> str:
        """How the log names it."""
        return f"realtime session {self.session.session_id}"
