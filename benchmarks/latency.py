"""Latency of streamed speech-to-speech at full Mini-Omni size (random weights, published shapes).

For each mode (dtype / quantization) it runs batch-parallel speech in / speech out on a
3 s and a 6 s spoken question and prints, as medians over runs:

* first audio: time from the end of input (the whole question in hand) to the first
  audio sample handed out (log-mel + Whisper + prefill + 8 decode steps + first SNAC chunk)
* step: one decode step, median (LLM only; SNAC time is counted in the real-time factor)
* RTF: compute time / audio time, over the whole answer and over the steady state
* peak memory: peak RSS of the process while answering (and while building the model)

Each mode runs in its own process so that peak memory is its own. Random weights only
test speed: the audio special rows of the head are zeroed so that every step yields a
speech frame, as a real answer does. Also prints the streaming decoder's fidelity to the
offline SNAC decode against the reference's independent 4-frame chunks.

    python benchmarks/latency.py                       # CPU: float32, bfloat16, int8
    python benchmarks/latency.py --modes int8 --encoder-context 10 --runs 5   # --fast-encoder: audio
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fullsize import SNAC_24KHZ, speech_like

from miniomni.audio import ENCODER_CONTEXTS

MODES = {"float32": ("float32", None), "bfloat16": ("bfloat16", None), "int8": ("bfloat16", "int8")}


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def build(mode: str, device: str, encoder_context: str = "30"):
    import fullsize

    dtype, quantize = MODES[mode]
    return fullsize.build(dtype, quantize, device, encoder_context)


def end_text_after(model, steps: int) -> None:
    """Make the text stream emit _eot at its ``steps``-th sampled token, as a real answer's text ends
    before its speech (random weights never emit it). Later steps then skip the text head."""
    from miniomni.tokens import EOT

    original = model.text_logits
    calls = {"n": 0}

    def text_logits(hidden):
        logits = original(hidden)
        calls["n"] += 1
        if calls["n"] == steps:  # no text-head call follows within this answer: restart the count
            calls["n"] = 0
            logits = torch.full_like(logits, -1e4)
            logits[..., EOT] = 0
        return logits

    model.text_logits = text_logits


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    omni = build(args.worker, args.device, args.encoder_context)
    if args.text_steps is not None:
        end_text_after(omni.model, args.text_steps)
    build_s = time.perf_counter() - started
    build_peak = rss_mb("VmHWM")
    peak_reset = reset_peak_rss()
    warm = speech_like(1.0)
    for _ in omni.stream(audio=warm, sample_rate=16000, max_new_tokens=12):
        pass
    results = {}
    for seconds in args.questions:
        audio = speech_like(seconds)
        runs = []
        for _ in range(args.runs):
            *_, done = omni.stream(audio=audio, sample_rate=16000, max_new_tokens=args.steps)
            t = done.timings
            steady = (t.total_ms - t.first_audio_ms) / 1000 / max(t.audio_seconds - 2048 / 24000, 1e-9)
            runs.append(dict(first_audio_ms=t.first_audio_ms, prepare_ms=t.prepare_ms,
                             prefill_ms=t.first_token_ms - t.prepare_ms, step_ms=t.step_ms_median,
                             rtf=t.real_time_factor, rtf_steady=steady))
        results[seconds] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    results["build_s"] = build_s
    results["peak_build_mb"] = build_peak
    results["peak_run_mb"] = rss_mb("VmHWM") if peak_reset else float("nan")
    print(json.dumps(results))


def codec_fidelity(threads: int) -> dict[str, float]:
    """SNR (dB) of streamed vs offline SNAC decode: ours (context) and the reference's (independent chunks)."""
    from snac import SNAC

    from miniomni.codec import Codec
    from miniomni.snacstream import StreamingDecoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    codec = Codec(SNAC(**SNAC_24KHZ))
    codec.set_noise(False)
    t = np.arange(24000 * 4) / 24000
    signal = (0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t)))).astype(np.float32)
    frames = codec.encode(signal)
    offline = codec.decode(frames)
    decoder = StreamingDecoder(codec)
    pieces = []
    for k in range(frames.shape[1]):
        decoder.push(frames[:, k].tolist())
        pieces.append(decoder.pull())
    pieces.append(decoder.pull(final=True))
    ours = np.concatenate([p for p in pieces if p is not None])
    n = frames.shape[1] // 4 * 4
    theirs = np.concatenate([codec.decode(frames[:, k : k + 4]) for k in range(0, n, 4)])

    def snr(ref: np.ndarray, est: np.ndarray) -> float:
        return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - est) ** 2)))

    return {"frames": frames.shape[1], "ours_db": snr(offline, ours),
            "reference_db": snr(offline[: len(theirs)], theirs),
            "ours_samples": len(ours), "offline_samples": len(offline), "reference_samples": len(theirs)}


def add_encoder_context(parser: argparse.ArgumentParser) -> None:
    """``--encoder-context`` (how much audio Whisper attends over) and ``--fast-encoder``, short for ``audio``."""
    parser.add_argument("--encoder-context", choices=ENCODER_CONTEXTS, default="30",
                        help="seconds of audio Whisper attends over, or audio: the question only (default 30)")
    parser.add_argument("--fast-encoder", dest="encoder_context", action="store_const", const="audio",
                        help="short for --encoder-context audio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="float32,bfloat16,int8")
    parser.add_argument("--questions", default="3,6", help="question lengths in seconds")
    parser.add_argument("--steps", type=int, default=60, help="decode steps per answer")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    add_encoder_context(parser)
    parser.add_argument("--text-steps", type=int, default=None,
                        help="end the answer's text after this many tokens (default: text runs all along)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.questions = [float(q) for q in str(args.questions).split(",")]
    if args.worker:
        worker(args)
        return
    devices = [args.device]
    if args.device == "cpu" and torch.cuda.is_available():
        devices.append("cuda")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps, {args.runs} runs, "
          f"encoder context: {args.encoder_context}, text ends after: {args.text_steps or 'never'}")
    header = f"{'device':6} {'mode':9} {'question':>8} {'first audio':>11} {'encoder':>8} {'prefill':>8} " \
             f"{'step':>7} {'RTF':>5} {'RTF steady':>10} {'peak run':>9} {'peak build':>10}"
    print(header)
    for device in devices:
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--worker", mode, "--device", device, "--threads", str(args.threads),
                   "--steps", str(args.steps), "--runs", str(args.runs),
                   "--questions", ",".join(str(q) for q in args.questions), "--encoder-context", args.encoder_context]
            if args.text_steps is not None:
                cmd += ["--text-steps", str(args.text_steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                print(f"{device:6} {mode:9} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            for seconds in args.questions:
                r = result[str(seconds)]
                print(f"{device:6} {mode:9} {seconds:>7.0f}s {r['first_audio_ms']:>9.0f}ms {r['prepare_ms']:>6.0f}ms "
                      f"{r['prefill_ms']:>6.0f}ms {r['step_ms']:>5.1f}ms {r['rtf']:>5.2f} {r['rtf_steady']:>10.2f} "
                      f"{result['peak_run_mb']:>7.0f}MB {result['peak_build_mb']:>8.0f}MB")
    fidelity = codec_fidelity(args.threads)
    print(f"streamed SNAC vs offline decode ({fidelity['frames']} frames, noise off): ours "
          f"{fidelity['ours_db']:.1f} dB over {fidelity['ours_samples']}/{fidelity['offline_samples']} samples; "
          f"reference chunks {fidelity['reference_db']:.1f} dB over {fidelity['reference_samples']} samples")


if __name__ == "__main__":
    main()
