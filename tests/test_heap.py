"""What a closed connection leaves in cycles is collected and handed back soon after."""

from __future__ import annotations

import asyncio
import gc
import weakref

from miniomni.server import heap


class Node:
    def __init__(self) -> None:
        self.buffer = bytearray(1 << 20)
        self.me = self  # a cycle: only the collector frees it


def test_a_trim_after_a_close_collects_cycles_once_per_interval(monkeypatch):
    monkeypatch.setattr(heap, "TRIM_DELAY", 0.05)
    monkeypatch.setattr(heap, "_last_trim", 0.0)
    monkeypatch.setattr(heap, "_scheduled", None)
    gc.disable()  # only the trim may collect here
    try:
        async def run() -> tuple[bool, bool, bool]:
            node = Node()
            ref = weakref.ref(node)
            del node
            heap.trim_heap()
            heap.trim_heap()  # joins the scheduled trim
            alive_before = ref() is not None
            await asyncio.sleep(0.2)
            first = heap._last_trim
            heap.trim_heap()  # within the interval of the last: waits for its end
            waiting = heap._scheduled is not None and heap._last_trim == first
            heap._scheduled.cancel()
            return alive_before, ref() is None, waiting

        alive_before, collected, waiting = asyncio.run(run())
    finally:
        gc.enable()
    assert alive_before and collected and waiting
