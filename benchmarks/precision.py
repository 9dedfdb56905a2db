"""What each component costs in each precision on this CPU, full size, random weights.

Prints one table: per component (the decoder's linears at several batch sizes, a whole decode
step, prefill, the Whisper encoder, the SNAC stream) and per option, the median of a few
runs; with ``--avx2`` the same measurements run again in a second process limited to AVX2
(``miniomni.precision.AVX2_LIMIT``, like most laptops and many servers)
and print beside them, with the precision plan that each kind of CPU gets.

    python benchmarks/precision.py --avx2
    python benchmarks/precision.py --only codec,linears --avx2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fullsize import SNAC_24KHZ, WHISPER_SMALL, random_model, speech_like

from miniomni.precision import AVX2_LIMIT

COMPONENTS = ("linears", "step", "talkers", "prefill", "encoder", "codec")


def timed(fn, runs: int) -> float:
    """Median milliseconds of ``runs`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def layer_linears(model) -> list[torch.nn.Module]:
    return [m for layer in model.llm.layers for m in layer.modules() if hasattr(m, "in_features")]


def run_linears(linears: list, rows: int, dtype: torch.dtype, runs: int, positions: int | None = None) -> float:
    shape = (rows,) if positions is None else (rows, positions)
    inputs = {n: torch.randn(*shape, n, dtype=dtype) for n in {m.in_features for m in linears}}
    return timed(lambda: [m(inputs[m.in_features]) for m in linears], runs)


def bench_linears(runs: int, rows: tuple[int, ...]) -> dict[str, float]:
    from miniomni.quantize import quantize_int8

    out: dict[str, float] = {}
    model = random_model(torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        linears = layer_linears(model)
        out[f"linears, 2 rows, dense {str(dtype)[6:]}"] = run_linears(linears, 2, dtype, runs)
    quantize_int8(model.llm)
    linears = layer_linears(model)
    for m in rows:
        for dtype in (torch.bfloat16, torch.float32):
            if m > 2 and dtype == torch.float32:
                continue
            out[f"linears, {m} rows, int8 weight-only ({str(dtype)[6:]} activations)"] = run_linears(
                linears, m, dtype, runs)
    from miniomni import int8act
    from miniomni.precision import machine

    if int8act.available():
        bits = 8 if machine().vnni else 7
        int8act.use_int8_activations(model.llm, bits)
        blocks = model.llm.layers
        for m in rows:
            x = {n: torch.randn(m, n) for n in (896, 4864)}

            def products(x=x):
                for block in blocks:
                    block.attn.qkv(x[896])
                    block.attn.out(x[896])
                    block.mlp.gate_up(x[896])
                    block.mlp.down(x[4864])
            out[f"linears, {m} rows, int8 x int8 activations per row (fbgemm, 4 products a layer)"] = timed(
                products, runs)
    return out


def build(dtype: torch.dtype, int8: bool, codec_dtype: torch.dtype = torch.float32):
    import fullsize

    omni = fullsize.build("float32", None, "cpu", encoder_context="audio")
    if int8:
        from miniomni.quantize import quantize_int8

        quantize_int8(omni.model.llm)
    omni.model = omni.model.to(dtype)
    omni.dtype = dtype
    omni.codec.stream_dtype = codec_dtype
    return omni


def bench_step(runs: int) -> dict[str, float]:
    from miniomni.streaming import Done

    out = {}
    question = speech_like(3.0)
    from miniomni import int8act
    from miniomni.precision import machine

    bits = (8 if machine().vnni else 7) if int8act.available() else 0
    variants = [("int8 weights, bfloat16 activations", torch.bfloat16, True, 0),
                ("int8 weights, float32 activations", torch.float32, True, 0),
                ("dense bfloat16", torch.bfloat16, False, 0), ("dense float32", torch.float32, False, 0)]
    if bits:
        variants.append((f"int8 weights x {bits}-bit activations", torch.bfloat16 if machine().native_bfloat16
                         else torch.float32, True, bits))
    for label, dtype, int8, act_bits in variants:
        omni = build(dtype, int8)
        omni.codec.set_noise(False)
        if act_bits:
            int8act.use_int8_activations(omni.model.llm, act_bits)
        medians = []
        for _ in range(max(1, runs // 2)):
            done = [e for e in omni.stream(task="A1A2-batch", audio=question, sample_rate=16000, max_new_tokens=40)
                    if isinstance(e, Done)][0]
            medians.append(done.timings.step_ms_median)
        out[f"decode step, 2 rows (layers, heads, sampling), {label}"] = statistics.median(medians)
        del omni
    return out


def bench_talkers(runs: int) -> dict[str, float]:
    """The server's decode step (layers, heads, sampling and codec) with K answers at once, per kernel."""
    import fullsize

    from miniomni import int8act
    from miniomni.precision import Precision, choose, machine
    from miniomni.server.engine import AnswerRequest, Engine

    out: dict[str, float] = {}
    kernels = {"int8 weight-only": 0}
    if int8act.available():
        kernels["int8 x int8 activations (8 bits with VNNI, else 7)"] = 8 if machine().vnni else 7
    for label, bits in kernels.items():
        plan = choose(torch.device("cpu"), Precision("int8", int8_activations="on" if bits else "off"))
        omni = fullsize.build(str(plan.activations).removeprefix("torch."), "int8", "cpu", encoder_context="audio")
        omni.codec.set_stream_dtype(plan.codec)
        if bits:
            int8act.use_int8_activations(omni.model.llm, bits)
        for talkers in (1, 4, 8):
            engine = Engine(omni, max_answers=talkers, start=False)
            for seed in range(talkers):
                engine.open(AnswerRequest(task="A1A2-batch", audio=speech_like(1.0 + 0.1 * seed), sample_rate=16000,
                                          max_new_tokens=16 + 8 * runs, max_chunk=4), lambda event: None)
            engine._admit()  # prepare every answer first: then each step decodes all of them
            while engine.preparing:
                engine._advance(engine.preparing[0])
            times = []
            while len(engine.active) == talkers:
                began = time.perf_counter()
                engine.run_once()
                times.append(1000 * (time.perf_counter() - began))
            engine.close()
            out[f"server step, {talkers} talkers ({2 * talkers} rows, codec included), {label}"] = (
                statistics.median(times) if times else float("nan"))
        del omni
    return out


def bench_prefill(runs: int) -> dict[str, float]:
    out = {}
    model = random_model(torch.float32)
    from miniomni.quantize import quantize_int8

    quantize_int8(model.llm)
    positions = 179
    for dtype in (torch.bfloat16, torch.float32):
        model = model.to(dtype)
        out[f"prefill linears, {positions} positions x 2 rows, int8 weights, {str(dtype)[6:]} GEMM"] = run_linears(
            layer_linears(model), 2, dtype, max(1, runs // 2), positions)
    from miniomni import int8act
    from miniomni.precision import machine

    if int8act.available():
        int8act.use_int8_activations(model.llm, 8 if machine().vnni else 7)
        x = {n: torch.randn(2, positions, n) for n in (896, 4864)}

        def products():
            for block in model.llm.layers:
                block.attn.qkv(x[896])
                block.attn.out(x[896])
                block.mlp.gate_up(x[896])
                block.mlp.down(x[4864])
        out[f"prefill linears, {positions} positions x 2 rows, int8 x int8 activations (fbgemm)"] = timed(
            products, max(1, runs // 2))
    return out


def bench_encoder(runs: int) -> dict[str, float]:
    from miniomni.audio import log_mel_spectrogram
    from miniomni.devices import autocast
    from miniomni.models.whisper import WhisperDims, WhisperEncoder

    encoder = WhisperEncoder(WhisperDims(**WHISPER_SMALL)).eval().requires_grad_(False)
    full = log_mel_spectrogram(speech_like(3.0)).unsqueeze(0)  # padded to 30 s, as the faithful encoder runs
    mel = full[..., :300]  # the 3 s the fast encoder keeps
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        def run(m=mel, dtype=dtype):
            with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
                encoder(m, allow_short=True)
        out[f"Whisper, 3 s (fast encoder), {str(dtype)[6:]}"] = timed(run, runs)
        out[f"Whisper, 30 s padded (faithful), {str(dtype)[6:]}"] = timed(lambda r=run: r(full), max(1, runs // 3))
    return out


def bench_codec(runs: int) -> dict[str, float]:
    from snac import SNAC

    from miniomni.codec import Codec
    from miniomni.snacstream import SNACStream

    torch.manual_seed(0)
    out = {}
    model = SNAC(**SNAC_24KHZ)
    for dtype in (torch.float32, torch.bfloat16):
        codec = Codec(model, "cpu", stream_dtype=dtype)
        for chunk in (1, 4, 16):
            frames = [[int(c) for c in torch.randint(0, 4096, (7,))] for _ in range(chunk)]
            stream = SNACStream(codec)
            stream.push(frames * 3)

            def push(s=stream, f=frames):
                s.push(f)
            out[f"SNAC stream per frame, {chunk}-frame calls, {str(dtype)[6:]}"] = timed(push, runs) / chunk
            for streams in (2, 4, 8):  # several answers' frames stacked in one call: what batching would save
                out[f"SNAC stream per frame and answer, {chunk}-frame calls, {streams} answers in one call, "
                    f"{str(dtype)[6:]}"] = timed(batched_stream(codec, chunk, streams), runs) / chunk / streams
    return out


def batched_stream(codec, frames: int, streams: int):
    """A call of the streaming decoder on ``streams`` answers' frames stacked as one batch."""
    from miniomni.snacstream import _Noise
    from miniomni.tokens import layers_to_codes

    plan = codec.stream_plan()
    state = [{} for _ in plan]  # this batch's own stream

    @torch.inference_mode()
    def call() -> None:
        codes = layers_to_codes(torch.randint(0, 4096, (7, frames)))
        x = codec.model.quantizer.from_codes(codes).to(codec.stream_dtype).repeat(streams, 1, 1)
        noise = _Noise(0, codec.noise)
        for op, slot in zip(plan, state, strict=True):
            x = op.run(x, slot, False, noise)

    for _ in range(3):  # past the stream's start, as the single stream above
        call()
    return call


def measure(components: list[str], runs: int) -> dict:
    from miniomni.precision import machine

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    figures: dict[str, float] = {}
    for name in components:
        if name == "linears":
            figures.update(bench_linears(runs, (1, 2, 4, 8, 16)))
        else:
            figures.update(globals()[f"bench_{name}"](runs))
    return {"capability": torch.backends.cpu.get_cpu_capability(), "plan": machine().describe(),
            "figures": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(COMPONENTS), help=f"comma-separated subset of {COMPONENTS}")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--avx2", action="store_true", help="also measure limited to AVX2, in a second process")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one process's figures as JSON
    args = parser.parse_args()
    components = [c for c in args.only.split(",") if c]
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        parser.error(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    if args.json:
        print(json.dumps(measure(components, args.runs)))
        return
    kinds = [("native", {})] + ([("AVX2-limited", AVX2_LIMIT)] if args.avx2 else [])
    results = []
    for _, env in kinds:
        done = subprocess.run([sys.executable, __file__, "--json", "--only", args.only, "--runs", str(args.runs)],
                              env={**os.environ, **env}, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    header = " | ".join(f"{label} ({r['capability']})" for (label, _), r in zip(kinds, results, strict=True))
    print(f"| component, option | {header} |")
    print("|---|" + "---|" * len(kinds))
    for key in results[0]["figures"]:
        cells = " | ".join(f"{r['figures'].get(key, float('nan')):.1f} ms" for r in results)
        print(f"| {key} | {cells} |")
    for (label, _), r in zip(kinds, results, strict=True):
        print(f"plan chosen {label}: {r['plan']}")


if __name__ == "__main__":
    main()
