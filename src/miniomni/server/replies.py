"""The JSON error body every HTTP route of the server answers with (the OpenAI error shape)."""

from __future__ import annotations

from fastapi.responses import JSONResponse


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """``{"error": {"message", "type"}}`` with ``status``: the message says what was wrong and what to do."""
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)
