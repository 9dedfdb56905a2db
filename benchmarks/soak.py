"""A long run: K talkers ask question after question of `miniomni serve` (own process, full-size random weights).

Every round, each talker asks one spoken question and listens to the answer (as in
benchmarks/conversation.py). After each round it reads the server's /metrics: resident
memory, failed answers, decode step time. At the end it prints the resident-memory slope
(least squares, MB per hour and per 100 answers), the answers that failed, and the step
time of the first and last quarter of the run (its drift).

    python benchmarks/soak.py --talkers 2 --minutes 30        # or --answers 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conversation
import fullsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--talkers", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--answers", type=int, default=None, help="stop after this many answers instead")
    parser.add_argument("--answer-steps", type=int, default=40, help="max_output_tokens of every answer")
    parser.add_argument("--flags", default="--fast-encoder", help="server flags")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "miniomni-bench"))
    args = parser.parse_args()
    checkpoint = fullsize.write_checkpoint(Path(args.workdir) / "checkpoint")
    questions = [conversation.question_audio(i, "espeak") for i in range(len(conversation.QUESTIONS))]
    talk = argparse.Namespace(rounds=1, answer_steps=args.answer_steps, silence_ms=500, stagger=0.3, lead_in=0.5,
                              answer_timeout=120.0)
    server = conversation.Server(checkpoint, args.flags.split(), args.talkers, Path(args.workdir) / "soak.log")
    began = time.perf_counter()
    samples = []  # (seconds since start, answers so far, RSS MB, failed so far)
    step_times = []  # per round: mean decode step (ms)
    answers = failed = 0
    try:
        while True:
            elapsed = time.perf_counter() - began
            if (args.answers is not None and answers >= args.answers) or \
                    (args.answers is None and elapsed > args.minutes * 60):
                break
            result = conversation.run_k(server, args.talkers, talk, questions)
            answers += result["answers"]
            failed += result["answers"] - result["completed"]
            text = conversation.http_get(server.url + "/metrics")
            rss = conversation.metric(text, "process_resident_memory_bytes") / 2**20
            samples.append((time.perf_counter() - began, answers, rss, failed))
            step_times.append(result["step_ms"])
            print(f"{samples[-1][0]:7.0f} s  {answers:5d} answers  RSS {rss:7.1f} MB  failed {failed}  "
                  f"step {result['step_ms']:.0f} ms", flush=True)
    finally:
        server.stop()
    seconds, counts, rss = (np.array([s[i] for s in samples]) for i in range(3))
    warm = len(samples) // 10  # the first rounds fill caches and allocator pools
    per_second = np.polyfit(seconds[warm:], rss[warm:], 1)[0] if len(samples) - warm >= 3 else float("nan")
    per_answer = np.polyfit(counts[warm:], rss[warm:], 1)[0] if len(samples) - warm >= 3 else float("nan")
    quarter = max(1, len(step_times) // 4)
    print(f"\n{answers} answers in {seconds[-1] / 60:.1f} min by {args.talkers} talkers; failed: {failed}")
    print(f"resident memory: {rss[0]:.0f} MB after the first round, {rss[-1]:.0f} MB at the end; slope "
          f"{per_second * 3600:+.1f} MB/hour, {per_answer * 100:+.2f} MB per 100 answers")
    print(f"decode step: {np.mean(step_times[:quarter]):.0f} ms in the first quarter, "
          f"{np.mean(step_times[-quarter:]):.0f} ms in the last")


if __name__ == "__main__":
    main()
