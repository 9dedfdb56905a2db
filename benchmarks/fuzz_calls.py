"""Fuzz the WebRTC call and client-secret endpoints of `miniomni serve`, then callers who vanish.

Runs the server in its own process on the tiny test model (built here, random weights) with
8 connection slots, and sends seeded requests to ``POST /v1/realtime/calls`` (good offers hung
up at once, mutated SDP, malformed candidates, wrong content types, multipart forms with and
without sessions, oversized and cut-off uploads), ``POST /v1/realtime/client_secrets`` (random
bodies and sessions), the hang-up routes and wrong methods. Then 30 callers post an offer and
vanish: half hang up, half never connect nor hang up. Prints the statuses, the 5xx count,
tracebacks in the server's log, how long the slots took to come free, resident memory, and
whether a good session is still answered afterwards.

    python benchmarks/fuzz_calls.py --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import write_checkpoint_dir  # noqa: E402  (the test suite's tiny checkpoint writer)
from fuzz import rss_mb, start_server  # noqa: E402
from fuzzcases import good_offer, mutate_offer, pcm, spoken_answer  # noqa: E402

SLOTS = 8
SDP = {"content-type": "application/sdp"}


def multipart(fields: dict[str, str], boundary: str = "fuzzboundary") -> tuple[bytes, dict[str, str]]:
    body = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                   for name, value in fields.items()) + f"--{boundary}--\r\n"
    return body.encode(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def cut_upload(port: int, path: str, declared: int, sent: bytes) -> None:
    """Headers promising ``declared`` bytes, then ``sent`` and a closed socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\n"
                    f"Content-Length: {declared}\r\n\r\n".encode() + sent)


KINDS = ["good", "good", "mutated", "mutated", "mutated", "content-type", "form", "form-session", "oversize", "cut",
         "secret", "secret-session", "hangup-unknown", "wrong-method"]


def one_request(client: httpx.Client, port: int, offer: str, rng: random.Random, statuses: Counter) -> str:
    """One seeded request to the calls or keys endpoints; its status counted under a short name. Returns the kind."""
    kind = rng.choice(KINDS)
    try:
        _send(kind, client, port, offer, rng, statuses)
    except httpx.TransportError as exc:
        statuses[f"{kind} {type(exc).__name__}"] += 1
    return kind


def _send(kind: str, client: httpx.Client, port: int, offer: str, rng: random.Random, statuses: Counter) -> None:
    url = f"http://127.0.0.1:{port}"
    if kind == "good":
        response = client.post(f"{url}/v1/realtime/calls", content=offer, headers=SDP)
        if response.status_code == 201 and rng.random() < 0.5:
            client.delete(url + response.headers["location"])
        elif response.status_code == 201:
            client.post(url + response.headers["location"] + "/hangup")
    elif kind == "mutated":
        response = client.post(f"{url}/v1/realtime/calls", content=mutate_offer(offer, rng), headers=SDP)
        if response.status_code == 201:
            client.delete(url + response.headers["location"])
    elif kind == "content-type":
        response = client.post(f"{url}/v1/realtime/calls", content=offer,
                               headers={"content-type": rng.choice(["text/plain", "application/json", ""])})
    elif kind in ("form", "form-session"):
        fields = {"sdp": offer} if rng.random() < 0.8 else {"offer": offer}
        if kind == "form-session":
            fields["session"] = rng.choice([json.dumps({"type": "realtime", "output_modalities": ["text"]}),
                                            json.dumps({"audio": {"output": {"format": {"type": "audio/pcmu"}}}}),
                                            json.dumps({"type": "nonsense"}), "{not json", json.dumps([1, 2])])
        body, headers = multipart(fields)
        response = client.post(f"{url}/v1/realtime/calls", content=body, headers=headers)
        if response.status_code == 201:
            client.delete(url + response.headers["location"])
    elif kind == "oversize":  # on a connection of its own: the server refuses it unread and closes it
        try:
            response = httpx.post(f"{url}/v1/realtime/calls", headers=SDP, timeout=30,
                                  content=b"v=0\r\n" + b"a" * rng.choice([70_000, 2_000_000]))
        except httpx.TransportError:
            statuses["oversize closed before the answer"] += 1
            return
    elif kind == "cut":
        cut_upload(port, rng.choice(["/v1/realtime/calls", "/v1/realtime/client_secrets"]), 5000, b"v=0\r\n")
        statuses["cut upload"] += 1
        return
    elif kind in ("secret", "secret-session"):
        body = {"expires_after": {"anchor": "created_at", "seconds": rng.choice([10, 600, 0, 99999, "x"])}}
        if kind == "secret-session":
            body["session"] = rng.choice([{"type": "realtime", "instructions": "Be brief."}, {"type": 5},
                                          {"audio": {"input": {"noise_reduction": {"type": "far_field"}}}}, "x"])
        response = client.post(f"{url}/v1/realtime/client_secrets", json=body)
    elif kind == "hangup-unknown":
        response = client.delete(f"{url}/v1/realtime/calls/rtc_{rng.randrange(10**9)}")
    else:
        response = client.request(rng.choice(["GET", "PUT", "PATCH"]),
                                  f"{url}{rng.choice(['/v1/realtime/calls', '/v1/realtime/client_secrets'])}")
    statuses[f"{kind} {response.status_code}"] += 1


def open_connections(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("miniomni_open_connections "))


def wait_free(port: int, limit: float) -> float | None:
    """Seconds until no connection is open, or None past ``limit``."""
    began = time.perf_counter()
    while time.perf_counter() - began < limit:
        if open_connections(port) == 0:
            return time.perf_counter() - began
        time.sleep(0.1)
    return None


def vanishing_callers(port: int, offer: str, callers: int) -> dict[str, object]:
    """Callers who post an offer and vanish: the first half hang up at once, the rest never connect nor hang up."""
    url = f"http://127.0.0.1:{port}"
    half = callers // 2
    answered: Counter = Counter()
    with httpx.Client(timeout=30) as client:
        for index in range(callers):
            response = client.post(f"{url}/v1/realtime/calls", content=offer, headers=SDP)
            answered[f"{'hanging up' if index < half else 'silent'} {response.status_code}"] += 1
            if response.status_code == 201 and index < half:
                client.delete(url + response.headers["location"])
            if index == half - 1:
                after_hangups = wait_free(port, 5.0)  # every hung-up call's slot, within 5 s
        after_silence = wait_free(port, 45.0)  # the connect watchdog (30 s) frees the silent ones
    return {"offers": dict(answered), "free after the hang-ups (s)": after_hangups,
            "free after the silent callers (s)": after_silence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    offer = asyncio.run(good_offer())
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint_dir(Path(tmp) / "tiny")
        log_path = Path(tmp) / "server.log"
        with log_path.open("w") as log:
            server, port = start_server(checkpoint, [
                "--quantize", "none", "--max-answers", "3", "--max-connections", str(SLOTS),
                "--max-request-mb", "1", "--webrtc-address", "127.0.0.1"], log)
        try:
            question = pcm(1.0, seed=42)
            for _ in range(3):  # warm
                asyncio.run(spoken_answer(port, question, 10))
            rss = {"warm": rss_mb(server.pid)}
            rng = random.Random(args.seed)
            statuses: Counter = Counter()
            began = time.perf_counter()
            with httpx.Client(timeout=30) as client:
                for _ in range(args.requests):
                    one_request(client, port, offer, rng, statuses)
            fuzz_seconds = time.perf_counter() - began
            free_after_fuzz = wait_free(port, 45.0)
            rss["after the fuzz"] = rss_mb(server.pid)
            freed = vanishing_callers(port, offer, args.callers)
            rss[f"after {args.callers} vanishing callers"] = rss_mb(server.pid)
            answered = len(asyncio.run(spoken_answer(port, question, 10))) > 0
            with httpx.Client(timeout=30) as client:
                last = client.post(f"http://127.0.0.1:{port}/v1/realtime/calls", content=offer, headers=SDP)
                if last.status_code == 201:
                    client.delete(f"http://127.0.0.1:{port}" + last.headers["location"])
        finally:
            server.terminate()
            server.wait(timeout=30)
        text = log_path.read_text(errors="replace")
    server_errors = sum(n for name, n in statuses.items() if name.split()[-1].startswith("5"))
    busy = sum(n for name, n in statuses.items() if name.endswith(" 503"))
    print(f"requests: {args.requests} in {fuzz_seconds:.0f} s; statuses: {dict(sorted(statuses.items()))}")
    print(f"5xx: {server_errors} (503 busy: {busy}); tracebacks in the server log: {text.count('Traceback')}")
    print(f"slots free after the fuzz: {free_after_fuzz if free_after_fuzz is None else round(free_after_fuzz, 1)} s; "
          + "; ".join(f"{k}: {round(v, 1) if isinstance(v, float) else v}" for k, v in freed.items()))
    print("resident memory: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items())
          + f" (largest growth over warm: {max(rss.values()) - rss['warm']:+.0f} MB)")
    print(f"a good session answered afterwards: {answered}; a good offer afterwards: {last.status_code}")
    if "Traceback" in text:
        kept = Path(tempfile.gettempdir()) / "fuzz_calls_server.log"
        kept.write_text(text)
        print(f"the server's log, with its tracebacks: {kept}")


if __name__ == "__main__":
    main()
