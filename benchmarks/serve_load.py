"""K concurrent speech-to-speech clients against `miniomni serve` on loopback.

Builds the full-size Mini-Omni shapes with random weights (as benchmarks/latency.py),
serves them with the batching engine on 127.0.0.1, and for K = 1, 2, ... sends K
`POST /chat` requests at once (a 3 s spoken question each, a bounded answer), printing
per-session time to first audio (request sent -> first PCM byte) and real-time factor
(time to the last byte / seconds of audio received). Stops after the first K at which
some session falls behind real time, or at --max-clients. Every loop is bounded in
count and time, and only 127.0.0.1 is contacted.

    python benchmarks/serve_load.py --mode int8 --encoder-context 10 --max-clients 4   # --fast-encoder: audio
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import soundfile as sf
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import latency
from fullsize import speech_like

from miniomni.server.app import create_app
from miniomni.server.engine import Engine
from miniomni.server.settings import ServerSettings


def question_body(seconds: float, steps: int) -> dict:
    buffer = io.BytesIO()
    sf.write(buffer, speech_like(seconds), 16000, format="WAV", subtype="PCM_16")
    return {"audio": base64.b64encode(buffer.getvalue()).decode(), "stream_stride": 16, "max_tokens": steps}


def one_client(url: str, body: dict, results: list, index: int, timeout: float) -> None:
    started = time.perf_counter()
    first = None
    received = 0
    with httpx.stream("POST", f"{url}/chat", json=body, timeout=timeout) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            if chunk and first is None:
                first = time.perf_counter() - started
            received += len(chunk)
    elapsed = time.perf_counter() - started
    audio_seconds = received / 2 / 24000
    results[index] = {"first_audio_s": first, "elapsed_s": elapsed, "audio_s": audio_seconds,
                      "rtf": elapsed / audio_seconds if audio_seconds else float("inf")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="int8", choices=list(latency.MODES))
    latency.add_encoder_context(parser)
    parser.add_argument("--max-clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=80, help="decode steps per answer")
    parser.add_argument("--question-seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    omni = latency.build(args.mode, "cpu", args.encoder_context)
    engine = Engine(omni, max_answers=args.max_clients)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerSettings()), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    body = question_body(args.question_seconds, args.steps)
    one_client(url, question_body(1.0, 12), [None], 0, args.timeout)  # warm-up

    print(f"mode {args.mode}, encoder context {args.encoder_context}, {args.threads} threads, {args.steps} steps, "
          f"{args.question_seconds:g} s questions")
    print(f"{'clients':>7} {'first audio (s) per session':>34} {'RTF per session':>28} {'all real time':>14}")
    largest = 0
    for clients in range(1, args.max_clients + 1):
        results: list = [None] * clients
        threads = [threading.Thread(target=one_client, args=(url, body, results, i, args.timeout))
                   for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.timeout + 10)
        if any(r is None for r in results):
            print(f"{clients:>7} a request failed or timed out")
            break
        firsts = " ".join(f"{r['first_audio_s']:.2f}" for r in results)
        rtfs = " ".join(f"{r['rtf']:.2f}" for r in results)
        ok = all(r["rtf"] < 1.0 for r in results)
        print(f"{clients:>7} {firsts:>34} {rtfs:>28} {'yes' if ok else 'no':>14}   "
              f"(median RTF {statistics.median(r['rtf'] for r in results):.2f})")
        if not ok:
            break
        largest = clients
    print(f"largest K with every session faster than real time: {largest}")
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


if __name__ == "__main__":
    main()
