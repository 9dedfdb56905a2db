"""Fuzz `miniomni serve` at length: 10,000 seeded cases on /v1/realtime and POST /chat, beside a control session.

Runs the server in its own process on the tiny test model (built here, random weights)
and prints the counts: cases, error codes returned, close codes, crashes (internal
errors, 5xx, unexpected closes, missing messages), client disconnects, and how many of
the control session's answers differed from its answer alone (must be 0); then a storm of
clients that vanish mid-answer, and the server's resident memory warm, after the cases and
after the storm.

    python benchmarks/fuzz.py --cases 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import websockets

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import write_checkpoint_dir  # noqa: E402  (the test suite's tiny checkpoint writer)
from fuzzcases import Report, b64, control, fuzz_chat, fuzz_realtime, pcm, spoken_answer  # noqa: E402

from miniomni.server.heap import TRIM_INTERVAL  # noqa: E402


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` (MB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(checkpoint: Path, flags: list[str], log=None, quiet: bool = False) -> tuple[subprocess.Popen, int]:
    """``miniomni serve`` on a free port of 127.0.0.1 with ``flags``, once it answers /healthz (``quiet``: ``-q``)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "miniomni.cli", *(["-q"] if quiet else []), "serve",
                               "--checkpoint", str(checkpoint),
                               "--port", str(port), *flags], stdout=log, stderr=subprocess.STDOUT if log else None)
    for _ in range(600):
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return server, port
        except httpx.HTTPError:
            time.sleep(0.2)
    server.terminate()
    raise RuntimeError("the server did not answer /healthz within two minutes")


async def storm(port: int, clients: int, question: bytes) -> None:
    """``clients`` connections that each send a question, ask for an answer and drop at once."""
    async def one(i: int) -> None:
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime", proxy=None, max_size=None)
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(question[: 3200 * (1 + i % 10)])}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "response.create"}))
        await asyncio.sleep(0.01 * (i % 20))
        ws.transport.abort()

    for start in range(0, clients, 20):
        await asyncio.gather(*(one(i) for i in range(start, min(clients, start + 20))))
    await asyncio.sleep(2)  # let the server notice and release them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4, help="fuzzing connections at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storm", type=int, default=100, help="clients that connect, start talking and vanish, after")
    parser.add_argument("--server-flags", default="--quantize none", help="extra flags for miniomni serve")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint_dir(Path(tmp) / "tiny")
        server, port = start_server(checkpoint, [
            "--max-answers", "3", "--max-audio-seconds", "5", "--max-message-mb", "0.5", "--max-request-mb", "1",
            "--max-connections", "200", "--max-events-per-second", "1000", *args.server_flags.split()], quiet=True)
        try:
            started = time.perf_counter()
            question = pcm(1.0, seed=42)
            alone = asyncio.run(spoken_answer(port, question, 10))
            for _ in range(3):  # warm: allocator pools and caches at their working size
                asyncio.run(spoken_answer(port, question, 10))
            rss = {"warm": rss_mb(server.pid)}
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
            time.sleep(TRIM_INTERVAL + 1)  # the server hands freed heap back at most this often
            rss["after the fuzz cases"] = rss_mb(server.pid)
            asyncio.run(storm(port, args.storm, question))
            asyncio.run(spoken_answer(port, question, 10))
            time.sleep(TRIM_INTERVAL + 1)
            rss[f"after {args.storm} vanishing clients"] = rss_mb(server.pid)
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
    print("resident memory: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss.items())
          + f" (largest growth over warm: {max(rss.values()) - rss['warm']:+.0f} MB)")
    crashes = report.crashes + chat_report.crashes
    print(f"crashes: {len(crashes)} {crashes[:5]}; server alive at the end: {alive}; exit code after SIGTERM: {code}")


if __name__ == "__main__":
    main()
