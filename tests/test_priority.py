"""The compute thread keeps the cores: other threads lower their priority, and their children inherit it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from miniomni.server import priority

pytestmark = pytest.mark.skipif(not priority.supported(), reason="per-thread priorities are a Linux feature")

SCRIPT = """
import json, os, threading
from miniomni.server import priority

seen = {}
def child():
    seen["child"] = os.getpriority(os.PRIO_PROCESS, 0)
def lowered():
    priority.lower_thread()
    seen["lowered"] = os.getpriority(os.PRIO_PROCESS, 0)
    t = threading.Thread(target=child); t.start(); t.join()
t = threading.Thread(target=lowered); t.start(); t.join()
seen["main"] = os.getpriority(os.PRIO_PROCESS, 0)

idle = threading.Event()
waiting = threading.Thread(target=idle.wait); waiting.start()
def compute():
    seen["lowered_others"] = priority.lower_other_threads()
    seen["compute"] = os.getpriority(os.PRIO_PROCESS, 0)
    seen["waiting"] = priority.thread_nice(waiting.native_id)
    seen["main_after"] = priority.thread_nice(threading.main_thread().native_id)
t = threading.Thread(target=compute); t.start(); t.join(); idle.set()
print(json.dumps(seen))
"""


def test_lowered_threads_and_their_children_run_below_the_compute_thread():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=60)
    seen = json.loads(out.stdout)
    base = seen["main"]
    assert seen["lowered"] == min(19, base + priority.LOWER_BY) > base
    assert seen["child"] == seen["lowered"]  # a thread started by a lowered thread inherits its priority
    assert seen["compute"] == base  # lower_other_threads leaves its caller as it was ...
    assert seen["lowered_others"] >= 2  # ... and lowers the others: the main thread and the waiting one
    assert seen["waiting"] == seen["main_after"] == min(19, base + priority.LOWER_BY)
