"""A spoken conversation as a person feels it: `miniomni serve` in its own process, K talkers over /v1/realtime.

For each server configuration this starts `miniomni serve` on a full-size random-weight
checkpoint (published layout, written once to --workdir), then for K = 1, 2, ... runs K
talkers as separate WebSocket clients of this process, with server VAD (silence 500 ms).
Each talker streams 16-bit PCM in 20 ms chunks at real-time pace: room noise, a spoken
question (espeak-ng or Piper), then room noise until its answer is done; it asks --rounds
questions in a row. Talker k starts k * --stagger seconds after the first, so questions
arrive while other answers are playing.

Per K it prints:
* voice-to-voice: the last speech sample sent -> the first answer audio byte received
  (median, p90, max over every answer);
* how often a player that starts at the first answer byte runs dry, and for how long in
  all, with a 0 ms and a 200 ms jitter buffer (a dry player resumes as soon as audio comes);
* answers completed and answer audio received (seconds);
* the server's mean decode step and its CPU use (cores busy, from /proc), and below the row
  each busy server thread's share and this process's (the clients').

Random weights never end an answer, so answers are capped by max_output_tokens
(--answer-steps; 144 steps = 12.2 s of speech), and never end their text: the server is
told to end each answer's text after --text-end of its steps (`serve --simulate-text-end`;
0.4 by default, as a real answer's text ends well before its speech), after which the text
head is no longer computed.

    python benchmarks/conversation.py --config "" --config "--quantize int8 --fast-encoder" --talkers 1-6
    python benchmarks/conversation.py --avx2 --talkers 1,2     # the server as on an AVX2-only CPU
    python benchmarks/conversation.py --talkers 1,2 --transport both          # WebSocket and WebRTC talkers
    python benchmarks/conversation.py --talkers 1,2 --turn-detection both     # server VAD and semantic VAD
    python benchmarks/conversation.py --talkers 1,2 --new-config "--ray --replicas 1"  # through Ray Serve
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import soxr

from miniomni.precision import AVX2_LIMIT

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from talk import RATE, Answer, TalkerLog, room_noise, turn_detection  # noqa: E402

CHUNK = RATE // 50  # 20 ms
QUESTIONS = [  # about 3 s each, spoken by espeak-ng at 140 words per minute
    "What will the weather be like in Paris tomorrow morning?",
    "Can you tell me a short story about a friendly dragon?",
    "How many planets are there in our solar system today?",
    "What should I cook for dinner tonight with some rice?",
    "Why is the sky blue during the day but red at night?",
    "Which is the tallest mountain in the whole wide world?",
]


# ---------------------------------------------------------------------- audio


def espeak(text: str, voice: str, speed: int) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
        audio, rate = sf.read(path, dtype="float32")
    return audio, rate


def question_audio(index: int, tts: str) -> np.ndarray:
    """A spoken question at 24 kHz, without leading or trailing silence."""
    text = QUESTIONS[index % len(QUESTIONS)]
    if tts == "piper":
        from miniomni.data.tts import get_backend

        audio, rate = get_backend("piper").synthesize(text)
    else:
        audio, rate = espeak(text, "en-us", 140)
    audio = soxr.resample(np.asarray(audio, dtype=np.float32), rate, RATE).astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.02)
    audio = audio[loud[0] : loud[-1] + 1]
    return (0.5 * audio / max(1e-6, float(np.abs(audio).max()))).astype(np.float32)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


# ---------------------------------------------------------------------- one talker


async def talker(index: int, url: str, args: argparse.Namespace, question: np.ndarray, log: TalkerLog) -> None:
    import websockets

    rng = np.random.default_rng(index)
    await asyncio.sleep(index * args.stagger)
    async with websockets.connect(url, subprotocols=["realtime"], max_size=None, open_timeout=60,
                                  ping_interval=None) as ws:
        audio_input: dict = {"turn_detection": turn_detection(args)}
        if getattr(args, "transcribing", False):
            audio_input["transcription"] = {"model": "mini-omni"}
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "max_output_tokens": args.answer_steps, "audio": {"input": audio_input},
        }}))
        current: dict = {"answer": None}
        done = asyncio.Event()

        async def receive() -> None:
            async for message in ws:
                now = time.perf_counter()
                event = json.loads(message)
                kind = event["type"]
                answer = current["answer"]
                if kind == "response.created" and answer is not None and answer.response_id is None:
                    answer.response_id = event["response"]["id"]
                    answer.taken = now
                elif kind == "response.output_audio.delta" and answer is not None and \
                        event["response_id"] == answer.response_id:
                    samples = (len(event["delta"]) * 3 // 4 - event["delta"][-2:].count("=")) // 2
                    if answer.first_audio is None:
                        answer.first_audio = now
                    answer.deltas.append((now, samples / RATE))
                elif kind == "response.done":
                    status = event["response"]["status"]
                    if answer is not None and event["response"]["id"] == answer.response_id:
                        answer.status = status
                        done.set()
                    elif status == "cancelled":
                        log.cancelled += 1
                elif kind == "error":
                    log.errors.append(event["error"]["message"])

        receiver = asyncio.create_task(receive())
        clock = time.perf_counter()
        sent = 0  # samples sent so far

        async def stream(audio: np.ndarray) -> None:
            nonlocal sent
            for start in range(0, len(audio), CHUNK):
                due = clock + (sent + CHUNK) / RATE  # a chunk leaves once it has been "spoken"
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                piece = audio[start : start + CHUNK]
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(pcm16(piece)).decode()}))
                sent += len(piece)

        try:
            for _ in range(args.rounds):
                await stream(room_noise(args.lead_in, rng))
                done.clear()
                await stream(question)
                answer = Answer(speech_end=time.perf_counter())
                current["answer"] = answer
                log.answers.append(answer)
                deadline = time.perf_counter() + args.answer_timeout
                while not done.is_set() and time.perf_counter() < deadline:
                    await stream(room_noise(0.2, rng))
                await stream(room_noise(0.3, rng))
                current["answer"] = None
        finally:
            receiver.cancel()


def dry_outs(answer: Answer, buffer_s: float) -> tuple[int, float]:
    """(times a player starting at the first byte + buffer_s ran dry, seconds of silence in all)."""
    if answer.gaps is not None:
        return answer.gaps
    if not answer.deltas:
        return 0, 0.0
    count, silence = 0, 0.0
    playing_until = answer.deltas[0][0] + buffer_s  # when the audio received so far will have played out
    for arrival, seconds in answer.deltas:
        if arrival > playing_until:
            count += 1
            silence += arrival - playing_until
            playing_until = arrival
        playing_until += seconds
    return count, silence


# ---------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def step_seconds(text: str) -> float:
    """Time spent in decode steps so far (a histogram's sum now; a plain counter in earlier versions)."""
    value = metric(text, "miniomni_decode_step_seconds_sum")
    return metric(text, "miniomni_decode_step_seconds_total") if value != value else value


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of process ``pid`` ("tid name nice N")."""
    out: dict[str, float] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        name = f"{task} {text[text.index('(') + 1 : text.rindex(')')]} nice {fields[16]}"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, checkpoint: Path, flags: list[str], max_answers: int, log_path: Path,
                 source: str | None = None, avx2: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "miniomni.cli", "serve", "--checkpoint", str(checkpoint), "--port",
               str(self.port), "--max-sessions", str(max_answers), *flags]  # the name old servers know too
        env = dict(os.environ)
        if avx2:  # PyTorch, oneDNN and fbgemm use no more than AVX2, as on most laptops
            env.update(AVX2_LIMIT)
        if source:  # another version of the package, to compare in the same run
            env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while True:
            try:
                http_get(self.url + "/healthz")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {log_path}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def run_k(server: Server, k: int, args: argparse.Namespace, questions: list[np.ndarray],
          transport: str = "websocket") -> dict:
    before_metrics, before_cpu, began = http_get(server.url + "/metrics"), cpu_seconds(server.process.pid), \
        time.perf_counter()
    before_threads, before_own = thread_cpu(server.process.pid), time.process_time()
    logs = [TalkerLog() for _ in range(k)]
    url = server.url.replace("http", "ws") + "/v1/realtime?model=mini-omni"

    async def everyone() -> None:
        if transport == "webrtc":
            import webrtc_talker

            await asyncio.gather(*(webrtc_talker.talker(i, server.url, args, questions[i % len(questions)], logs[i])
                                   for i in range(k)))
        else:
            await asyncio.gather(*(talker(i, url, args, questions[i % len(questions)], logs[i]) for i in range(k)))

    asyncio.run(everyone())
    wall = time.perf_counter() - began
    after_metrics, after_cpu = http_get(server.url + "/metrics"), cpu_seconds(server.process.pid)
    after_threads, own = thread_cpu(server.process.pid), time.process_time() - before_own
    threads = {name: round((seconds - before_threads.get(name, 0.0)) / wall, 3)
               for name, seconds in after_threads.items()}
    answers = [a for log in logs for a in log.answers]
    v2v = sorted(a.first_audio - a.speech_end for a in answers if a.first_audio is not None)
    steps = metric(after_metrics, "miniomni_decode_steps_total") - metric(before_metrics, "miniomni_decode_steps_total")
    step_s = step_seconds(after_metrics) - step_seconds(before_metrics)
    result = {
        "talkers": k,
        "answers": len(answers),
        "completed": sum(a.status == "completed" for a in answers),
        "v2v": v2v,
        "audio_s": sum(s for a in answers for _, s in a.deltas),
        "cancelled": sum(log.cancelled for log in logs),
        "errors": [e for log in logs for e in log.errors],
        "step_ms": 1000 * step_s / steps if steps else float("nan"),
        "cpu_cores": (after_cpu - before_cpu) / wall,
        "thread_cores": {name: cores for name, cores in threads.items() if cores >= 0.005},
        "client_cores": own / wall,
        "timelines": [{"speech_end": a.speech_end, "taken": a.taken, "first_audio": a.first_audio, "deltas": a.deltas}
                      for a in answers],
    }
    for buffer_ms in (0, 200):
        outs = [dry_outs(a, buffer_ms / 1000) for a in answers]
        result[f"dry{buffer_ms}"] = (sum(c for c, _ in outs), sum(s for _, s in outs))
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


def row(label: str, r: dict) -> str:
    v = r["v2v"]
    return (f"| {label} | {r['talkers']} | {statistics.median(v) if v else float('nan'):.2f} s | "
            f"{percentile(v, 90):.2f} s | {max(v) if v else float('nan'):.2f} s | "
            f"{r['dry0'][0]} ({r['dry0'][1]:.1f} s) | {r['dry200'][0]} ({r['dry200'][1]:.1f} s) | "
            f"{r['completed']}/{r['answers']} | {r['audio_s']:.0f} s | {r['step_ms']:.0f} ms | "
            f"{r['cpu_cores']:.2f} |")


HEADER = ("| server flags | talkers | voice-to-voice median | p90 | max | dry, 0 ms buffer | dry, 200 ms buffer | "
          "answers | audio | step | server CPU (cores) |\n|---|---|---|---|---|---|---|---|---|---|---|")


def parse_range(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            low, high = part.split("-")
            out += list(range(int(low), int(high) + 1))
        else:
            out.append(int(part))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=None,
                        help="server flags, one configuration per option (default: none, and the fastest)")
    parser.add_argument("--talkers", default="1-6", help="values of K, e.g. 1-6 or 1,2,4")
    parser.add_argument("--rounds", type=int, default=2, help="questions each talker asks in a row")
    parser.add_argument("--answer-steps", type=int, default=144, help="max_output_tokens (144 = 12.2 s of speech)")
    parser.add_argument("--text-end", type=float, default=0.4,
                        help="the fraction of an answer's steps after which its text ends (0: never, for servers "
                             "without --simulate-text-end)")
    parser.add_argument("--silence-ms", type=int, default=500, help="server VAD silence before the turn is taken")
    parser.add_argument("--stagger", type=float, default=0.9, help="seconds between the talkers' starts")
    parser.add_argument("--lead-in", type=float, default=1.0, help="seconds of room noise before each question")
    parser.add_argument("--answer-timeout", type=float, default=90.0)
    parser.add_argument("--tts", default="espeak", choices=["espeak", "piper"])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "miniomni-bench"))
    parser.add_argument("--transcribe", default="off", choices=["off", "on", "both"],
                        help="ask for the users' transcripts (both: every configuration without, then with)")
    parser.add_argument("--before", default=None, metavar="SRC",
                        help="also run every configuration with the miniomni package in SRC (e.g. an older "
                             "checkout's src/), first, labelled 'before'")
    parser.add_argument("--before-talkers", default="1", help="values of K for the --before runs")
    parser.add_argument("--new-config", action="append", default=[],
                        help="server flags run with this version only (flags the --before version lacks)")
    parser.add_argument("--transport", default="websocket", choices=["websocket", "webrtc", "both"],
                        help="how the talkers connect: WebSocket (a 20 ms PCM event each), WebRTC (Opus tracks and a "
                             "data channel: benchmarks/webrtc_talker.py), or both in turn")
    parser.add_argument("--turn-detection", default="server_vad", choices=["server_vad", "semantic_vad", "both"],
                        help="how the server ends a talker's turn: server VAD after --silence-ms, or semantic VAD "
                             "(the end-of-turn model at each short pause), or both in turn")
    parser.add_argument("--details", default=None, help="write every answer's arrival times here (JSON)")
    parser.add_argument("--avx2", action="store_true",
                        help="limit the server to AVX2 (miniomni.precision.AVX2_LIMIT)")
    parser.add_argument("--stop-when-failing", action="store_true",
                        help="go to the next configuration after the first K whose 200 ms player ran dry")
    args = parser.parse_args()
    configs = args.config if args.config is not None else ["", "--quantize int8 --fast-encoder"]
    ks = parse_range(args.talkers)
    if args.tts == "espeak" and shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is needed for the spoken questions (apt-get install espeak-ng), or pass --tts piper")

    import fullsize

    workdir = Path(args.workdir)
    print(f"full-size random checkpoint in {workdir / 'checkpoint'} (written once) ...", flush=True)
    checkpoint = fullsize.write_checkpoint(workdir / "checkpoint")
    questions = [question_audio(i, args.tts) for i in range(len(QUESTIONS))]
    print(f"questions: {', '.join(f'{len(q) / RATE:.1f}' for q in questions)} s; {args.rounds} rounds; answers "
          f"capped at {args.answer_steps} steps ({args.answer_steps * 2048 / 24000:.1f} s); VAD silence "
          f"{args.silence_ms} ms; text ends after {args.text_end:.0%} of the steps; talkers {args.stagger:g} s "
          f"apart; {os.cpu_count()} CPUs", flush=True)
    lines, details = [], []
    transports = {"websocket": ["websocket"], "webrtc": ["webrtc"], "both": ["websocket", "webrtc"]}[args.transport]
    detections = {"server_vad": ["server_vad"], "semantic_vad": ["semantic_vad"],
                  "both": ["server_vad", "semantic_vad"]}[args.turn_detection]
    transcribing = {"off": [False], "on": [True], "both": [False, True]}[args.transcribe]
    runs = [(args.before, config, False) for config in configs] if args.before else []
    runs += [(None, config, t) for config in configs + args.new_config for t in transcribing]
    for source, config, args.transcribing in runs:
        label = f"`{config}`" if config else "none (the default)"
        if args.before:
            label = ("before: " if source else "now: ") + label
        if args.transcribing:
            label += ", transcripts on"
        log_path = workdir / f"server-{len(details)}-{len(lines)}.log"
        print(f"\nserver flags: {config or '(none)'}{' (before)' if source else ''}  (log: {log_path})", flush=True)
        started = time.perf_counter()
        run_ks = parse_range(args.before_talkers) if source else ks
        flags = config.split() + (["--simulate-text-end", str(args.text_end)] if args.text_end else [])
        server = Server(checkpoint, flags, max(run_ks), log_path, source, args.avx2)
        print(f"  started in {time.perf_counter() - started:.0f} s", flush=True)
        for line in log_path.read_text().splitlines():  # what the server said of its speed at start-up
            if any(word in line for word in ("precision:", "real time", "cannot keep")):
                print("  " + line.split(": ", 1)[-1], flush=True)
        try:
            run_k(server, 1, argparse.Namespace(**{**vars(args), "rounds": 1, "answer_steps": 12}), questions)
            for k, transport, args.detection in [(k, t, d) for k in run_ks for t in transports for d in detections]:
                r = run_k(server, k, args, questions, transport)
                details.append({"config": config, "before": bool(source), "transport": transport,
                                "turn_detection": args.detection, **r})
                lines.append(row(label + (" (WebRTC)" if transport == "webrtc" else "")
                                 + (", semantic VAD" if args.detection == "semantic_vad" else ""), r))
                print(lines[-1], flush=True)
                busy = sorted(r["thread_cores"].items(), key=lambda item: -item[1])
                print(f"  server threads (cores, nice): "
                      f"{', '.join(f'{c:.2f} ({n.rsplit(maxsplit=1)[-1]})' for n, c in busy)}; "
                      f"this benchmark's clients: {r['client_cores']:.2f}", flush=True)
                split = [(a["taken"] - a["speech_end"], a["first_audio"] - a["taken"]) for a in r["timelines"]
                         if a["taken"] is not None and a["first_audio"] is not None]
                if split:
                    print(f"  voice-to-voice, median: the turn taken {statistics.median(t for t, _ in split):.2f} s "
                          f"after the speech, its first audio {statistics.median(f for _, f in split):.2f} s later",
                          flush=True)
                if r["errors"]:
                    print(f"  errors: {r['errors'][:3]}", flush=True)
                if args.stop_when_failing and r["dry200"][0]:
                    break
        finally:
            server.stop()
    print("\n" + HEADER)
    print("\n".join(lines))
    if args.details:
        Path(args.details).write_text(json.dumps(details))


if __name__ == "__main__":
    main()
