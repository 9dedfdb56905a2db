"""Fuzz `miniomni serve` at length: 10,000 seeded cases on /v1/realtime and POST /chat, beside a control session.

Runs the server in its own process on the tiny test model (built here, random weights)
and prints the counts: cases, error codes returned, close codes, crashes (internal
errors, 5xx, unexpected closes, missing messages), client disconnects, and how many of
the control session's answers differed from its answer alone (must be 0).

    python benchmarks/fuzz.py --cases 10000
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import write_checkpoint_dir  # noqa: E402  (the test suite's tiny checkpoint writer)
from fuzzcases import Report, control, fuzz_chat, fuzz_realtime, pcm, spoken_answer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4, help="fuzzing connections at once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint_dir(Path(tmp) / "tiny")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "miniomni.cli", "-q", "serve", "--checkpoint",
                                   str(checkpoint), "--port", str(port), "--max-sessions", "3",
                                   "--max-audio-seconds", "5", "--max-message-mb", "0.5", "--max-request-mb", "1",
                                   "--max-connections", "200", "--max-events-per-second", "1000"])
        try:
            for _ in range(600):
                try:
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            started = time.perf_counter()
            question = pcm(1.0, seed=42)
            alone = asyncio.run(spoken_answer(port, question, 10))
            report, chat_report = Report(), Report()
            chat_cases = args.cases // 10
            realtime_cases = args.cases - chat_cases

            async def run() -> None:
                stop = asyncio.Event()
                watcher = asyncio.create_task(control(port, question, 10, alone, stop, report))
                share = realtime_cases // args.connections
                await asyncio.gather(*(fuzz_realtime(port, share, args.seed + i, report, 512 * 1024)
                                       for i in range(args.connections)))
                stop.set()
                await watcher

            chat = threading.Thread(target=fuzz_chat, args=(port, chat_cases, args.seed + 99, chat_report))
            chat.start()
            asyncio.run(run())
            chat.join()
            alive = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["status"] == "ok"
        finally:
            server.terminate()
            code = server.wait(timeout=30)
    print(f"cases: {report.cases} on /v1/realtime, {chat_report.cases} on /chat, in "
          f"{time.perf_counter() - started:.0f} s")
    print(f"error events by code: {dict(report.errors.most_common())}")
    print(f"closes by code: {dict(report.closes)}; client disconnects: {report.disconnects}")
    print(f"/chat statuses: {dict(chat_report.chat_statuses)}")
    print(f"control answers: {report.control_answers}, differing from the answer alone: {report.control_differences}")
    crashes = report.crashes + chat_report.crashes
    print(f"crashes: {len(crashes)} {crashes[:5]}; server alive at the end: {alive}; exit code after SIGTERM: {code}")


if __name__ == "__main__":
    main()
