"""The compute thread gets the cores: every other thread of the server runs at a lower priority.

A decode step is many short parallel operations; when another thread of the process (the
event loop, HTTP, voice activity, the end-of-turn model, WebRTC) holds one of the cores,
every one of them waits for its slowest part. On Linux the nice value is a property of
each thread, inherited by the threads it starts, and any thread may lower its own or its
process's other threads' priority without privileges. So the server lowers every thread
but the compute thread (and the workers that thread starts for PyTorch, which inherit its
priority): the others still get the cores whenever the compute thread waits, but no longer
take them from a step. Elsewhere (macOS, Windows) this does nothing.
"""

from __future__ import annotations

import os
import sys
import threading

# How far below the compute thread the other threads run. At 10 a thread that wants a core
# the compute thread also wants gets about a tenth of it; the server's other threads need
# less than that (0.04 to 0.1 cores with several talkers).
LOWER_BY = 10


def supported() -> bool:
    """Whether threads of one process can have different priorities here (Linux)."""
    return sys.platform.startswith("linux") and hasattr(os, "setpriority")


def lower_thread(tid: int | None = None, by: int = LOWER_BY) -> bool:
    """Lower thread ``tid`` (default: the calling thread) ``by`` nice steps; False where that is not possible."""
    tid = threading.get_native_id() if tid is None else tid
    now = thread_nice(tid)
    if now is None:
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + by))
    except OSError:  # the thread has ended, or the system says no
        return False
    return True


def lower_other_threads(by: int = LOWER_BY) -> int:
    """Lower every thread of this process but the calling one; returns how many were lowered.

    Call it on the compute thread before it starts PyTorch's workers (they inherit its
    priority): threads started later by the lowered ones inherit the lower priority.
    """
    if not supported():
        return 0
    me = threading.get_native_id()
    lowered = 0
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        if tid != me and lower_thread(tid, by):
            lowered += 1
    return lowered


def thread_nice(tid: int) -> int | None:
    """The nice value of thread ``tid`` of this process (None where unknown)."""
    if not supported():
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None
