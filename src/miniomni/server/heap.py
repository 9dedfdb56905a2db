"""Handing freed C heap memory back to the system after connections close (glibc only)."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

TRIM_INTERVAL = 10.0  # seconds between two hand-backs of freed heap memory
TRIM_DELAY = 1.0  # seconds from a connection's end to the hand-back of what it held
_last_trim = 0.0
_scheduled: asyncio.TimerHandle | None = None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system a moment from now (at most once per ``TRIM_INTERVAL``).

    glibc keeps what closed connections and odd-sized requests freed (buffers, arrays, audio
    features) for reuse, scattered so that it is seldom reused: after 3,000 hostile requests
    about 50 MB of the server's resident memory was such free heap. The trim runs on the
    running event loop ``TRIM_DELAY`` seconds after the call (what the connection held is
    freed by then, on every thread), or later if the last trim was less than
    ``TRIM_INTERVAL`` ago; calls meanwhile join the scheduled one.
    """
    global _scheduled
    if _scheduled is not None:
        return
    wait = max(TRIM_DELAY, _last_trim + TRIM_INTERVAL - time.monotonic())
    try:
        _scheduled = asyncio.get_running_loop().call_later(wait, _trim_now)
    except RuntimeError:  # no event loop on this thread
        _trim_now()


def _trim_now() -> None:
    global _last_trim, _scheduled
    _scheduled = None
    _last_trim = time.monotonic()
    began = time.perf_counter()
    # A closed connection is a graph of cycles (the web server's protocol objects, exceptions
    # with their frames, the session and its transport), with zlib streams and audio buffers
    # in C memory: only a full collection frees it. Objects from before serving are frozen
    # (see freeze_loaded), so this looks only at what serving made.
    found = gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    log.debug("heap: %d objects collected, freed memory handed back, in %.1f ms", found,
             1000 * (time.perf_counter() - began))


def freeze_loaded() -> None:
    """Exempt every object alive now (the model, modules) from the collections after each connection."""
    gc.collect()
    gc.freeze()


@functools.cache
def _glibc() -> Any:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # another C library (musl)
        return None
