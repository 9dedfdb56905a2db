"""Fuzzing and disconnect storms on loopback (tiny model): the server stays up, says what was wrong, leaks nothing."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import httpx
import pytest
import websockets
from conftest import engine_fixture, port_fixture, wait_idle
from fuzzcases import Report, b64, control, fuzz_chat, fuzz_realtime, pcm, spoken_answer

from miniomni.server.settings import ServerSettings

pytestmark = pytest.mark.slow  # about a thousand cases, and a hundred clients

SETTINGS = ServerSettings(max_audio_seconds=5, max_request_bytes=1 << 20, max_message_bytes=512 * 1024,
                          max_tokens_limit=12, idle_timeout=30, max_events_per_second=1000, max_connections=200)
CONTROL_STEPS = 10


engine = engine_fixture(3)
port = port_fixture(SETTINGS)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def test_a_thousand_fuzz_cases_beside_a_control_session(port, engine):
    question = pcm(1.0, seed=42)
    alone = asyncio.run(spoken_answer(port, question, CONTROL_STEPS))
    assert len(alone) == (CONTROL_STEPS - 7) * 2048 * 2
    report = Report()

    async def run():
        stop = asyncio.Event()
        watcher = asyncio.create_task(control(port, question, CONTROL_STEPS, alone, stop, report))
        await asyncio.gather(*(fuzz_realtime(port, 220, seed, report, SETTINGS.max_message_bytes) for seed in range(4)))
        stop.set()
        await watcher

    chat_report = Report()
    chat = threading.Thread(target=fuzz_chat, args=(port, 120, 7, chat_report))
    chat.start()
    asyncio.run(run())
    chat.join()
    assert report.crashes == [] and chat_report.crashes == []
    assert report.cases + chat_report.cases >= 1000
    assert report.control_answers >= 3 and report.control_differences == 0
    assert sum(report.errors.values()) > 200  # the bad input was answered as such
    assert {400, 200} <= set(chat_report.chat_statuses) and 500 not in chat_report.chat_statuses
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["status"] == "ok"
    assert wait_idle(engine, timeout=20)
    assert sorted(engine.free_slots) == [0, 1, 2]


def test_a_hundred_clients_vanishing_at_random_moments_leave_nothing_behind(port, engine):
    rng = random.Random(3)
    threads_before = threading.active_count()
    question = b64(pcm(1.0, seed=1))
    asyncio.run(spoken_answer(port, pcm(0.5), 8))  # everything warm before measuring memory
    rss_before = rss_mb()

    async def vanisher(index: int) -> None:
        await asyncio.sleep(rng.random() * 2)
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime", proxy=None, max_size=None)
        await ws.recv()
        moment = index % 4
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}))
        if moment == 0:  # while uploading
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": question}))
        else:
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": question}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
            if moment == 1:  # during Whisper or prefill
                await asyncio.sleep(rng.random() * 0.05)
            elif moment == 2:  # mid-answer (or as soon as it is refused: most find every slot busy)
                while json.loads(await ws.recv())["type"] not in ("response.output_audio.delta", "error"):
                    pass
            else:  # never reading while the server writes
                await asyncio.sleep(rng.random() * 0.5)
        ws.transport.abort()

    async def run():
        await asyncio.gather(*(vanisher(i) for i in range(100)))

    asyncio.run(run())
    assert wait_idle(engine, timeout=20)
    assert sorted(engine.free_slots) == [0, 1, 2]
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert "miniomni_active_answers 0.0" in metrics and "miniomni_open_connections 0.0" in metrics
    assert threading.active_count() <= threads_before + 1  # uvicorn may keep one worker thread around
    rss_after = rss_mb()
    print(f"a hundred vanishing clients: RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after")
    assert rss_after - rss_before < 50
    # And the server still answers as before.
    assert len(asyncio.run(spoken_answer(port, pcm(1.0, seed=42), CONTROL_STEPS))) == (CONTROL_STEPS - 7) * 4096
