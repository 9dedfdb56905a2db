"""Load time and peak memory of a full-size checkpoint, per format and mode.

Writes a random-weight checkpoint with the published shapes in the published layout
(lit_model.pth float32 2.8 GB, small.pt, snac/), converts it to safetensors bundles,
then loads each in a fresh process and answers a 3 s question (30 steps), printing
load seconds, peak RSS while loading and peak RSS while answering.

    python benchmarks/load_memory.py --workdir /tmp/miniomni-full
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def peak_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(source: str, dtype: str, quantize: str | None) -> None:
    torch.set_num_threads(2)
    import miniomni

    sys.path.insert(0, str(HERE))
    from fullsize import speech_like

    started = time.perf_counter()
    omni = miniomni.load(source, device="cpu", dtype=dtype, quantize=quantize)
    load_s = time.perf_counter() - started
    load_peak = peak_mb()
    *_, done = omni.stream(audio=speech_like(3.0), sample_rate=16000, max_new_tokens=30)
    print(json.dumps({"load_s": load_s, "load_peak_mb": load_peak, "run_peak_mb": peak_mb(),
                      "steps": done.timings.steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/miniomni-full")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        source, dtype, quantize = args.worker
        worker(source, dtype, None if quantize == "none" else quantize)
        return
    workdir = Path(args.workdir)
    checkpoint = workdir / "checkpoint"
    print(f"full-size random checkpoint in {checkpoint} ...", flush=True)
    sys.path.insert(0, str(HERE))
    from fullsize import write_checkpoint

    write_checkpoint(checkpoint)
    bundles = {}
    for dtype, quantize in (("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8")):
        name = f"{dtype}-{quantize}.safetensors"
        bundle = workdir / name
        if not bundle.is_file():
            cmd = [sys.executable, "-m", "miniomni.cli", "-q", "convert", str(checkpoint), str(bundle),
                   "--dtype", dtype, "--quantize", quantize]
            subprocess.run(cmd, check=True)
        bundles[(dtype, quantize)] = bundle
    print(f"{'source':28} {'mode':15} {'load':>7} {'peak load':>10} {'peak run':>9}")
    cases = [(checkpoint, "float32", "none"), (checkpoint, "bfloat16", "none"), (checkpoint, "bfloat16", "int8")]
    cases += [(bundle, dtype, quantize) for (dtype, quantize), bundle in bundles.items()]
    for source, dtype, quantize in cases:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(source), dtype, quantize],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{source.name:28} {dtype}/{quantize}: failed {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{source.name:28} {dtype + '/' + quantize:15} {r['load_s']:>6.1f}s {r['load_peak_mb']:>8.0f}MB "
              f"{r['run_peak_mb']:>7.0f}MB")


if __name__ == "__main__":
    main()
