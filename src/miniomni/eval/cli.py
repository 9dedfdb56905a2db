"""``miniomni eval asr | spoken-qa | consistency | agreement``: :func:`add_eval_command` and :func:`run_eval`."""

from __future__ import annotations

import argparse
import json

from ..audio import ENCODER_CONTEXTS
from ..errors import MiniOmniError

__all__ = ["add_eval_command", "run_eval"]


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (published layout), .safetensors bundle, or gpt-omni/mini-omni")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--out", default=default_out,
                   help=f"report path prefix: writes PREFIX.json, PREFIX.md and PREFIX.png (default {default_out})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on sampled steps per answer and per judge transcription")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--encoder-context", default="30", choices=list(ENCODER_CONTEXTS),
                   help="how much audio Whisper attends over (default 30, as generate; serve uses 10): "
                        "evaluate with the context the model was trained and is served with")


def _answers(p: argparse.ArgumentParser, with_text_only: bool) -> None:
    choices = ["A1A2-batch", "A1A2", "A1T2"] if with_text_only else ["A1A2-batch", "A1A2"]
    p.add_argument("--task", default="A1A2-batch", choices=choices,
                   help="task that answers (default A1A2-batch: text from its A1T2 row, speech from its A1A2 row)")
    p.add_argument("--judge", default="self",
                   help="ASR judge of the spoken answer: self (default, this model's asr task on the answer "
                        "resampled to 16 kHz) or omni:CHECKPOINT (another miniomni checkpoint's asr task)")


def add_eval_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval`` and its sub-subcommands on the main parser's subparsers."""
    p = subparsers.add_parser("eval", help="evaluate ASR WER, spoken QA accuracy, text/speech consistency "
                                           "(see docs/evaluation.md)")
    sub = p.add_subparsers(dest="eval_command", required=True)
    a = sub.add_parser("asr", help="WER of the asr task on a LibriSpeech-layout folder")
    a.add_argument("--data", required=True, help="folder with */*/*.trans.txt and the .flac files beside them, "
                                                 "or spoken questions as `data synth` writes them")
    _common(a, "eval-asr")
    q = sub.add_parser("spoken-qa", help="accuracy of text and spoken answers to spoken questions")
    q.add_argument("--data", required=True, help='JSONL rows {"audio": path, "answers": [accepted strings]}')
    _common(q, "eval-spoken-qa")
    _answers(q, with_text_only=True)
    c = sub.add_parser("consistency", help="WER between the text answer and the transcribed spoken answer")
    c.add_argument("--data", required=True, help='JSONL rows {"audio": path}, or a folder of audio files')
    _common(c, "eval-consistency")
    _answers(c, with_text_only=False)
    g = sub.add_parser("agreement", help="answers to spoken questions against answers to the same questions written")
    g.add_argument("--data", required=True, help="spoken questions as `data synth` writes them (folder or parquet)")
    _common(g, "eval-agreement")
    p.set_defaults(func=run_eval)
    return p


def run_eval(args: argparse.Namespace) -> int:
    """Run the chosen evaluation, write its reports and print the summary as JSON."""
    from ..pipeline import load
    from .asr import evaluate_asr, make_judge, write_asr_report
    from .consistency import evaluate_consistency, write_consistency_report
    from .spoken_qa import evaluate_spoken_qa, write_spoken_qa_report

    if args.limit is not None and args.limit < 1:
        raise MiniOmniError("--limit must be at least 1")
    omni = load(args.checkpoint, device=args.device, dtype=args.dtype, encoder_context=args.encoder_context)
    if args.eval_command == "asr":
        report = evaluate_asr(omni, args.data, args.limit, args.max_new_tokens)
        files = write_asr_report(report, args.out)
    elif args.eval_command == "spoken-qa":
        judge = None if args.task == "A1T2" else make_judge(args.judge, omni, args.max_new_tokens, args.device,
                                                            args.dtype)
        report = evaluate_spoken_qa(omni, args.data, judge, args.task, args.limit, args.max_new_tokens)
        files = write_spoken_qa_report(report, args.out)
    elif args.eval_command == "consistency":
        judge = make_judge(args.judge, omni, args.max_new_tokens, args.device, args.dtype)
        report = evaluate_consistency(omni, args.data, judge, args.task, args.limit, args.max_new_tokens)
        files = write_consistency_report(report, args.out)
    elif args.eval_command == "agreement":
        from .agreement import evaluate_agreement, write_agreement_report

        report = evaluate_agreement(omni, args.data, args.limit, args.max_new_tokens)
        files = write_agreement_report(report, args.out)
    else:  # argparse only lets these through
        raise MiniOmniError(f"unknown eval command {args.eval_command!r}")
    print(json.dumps({"summary": report["summary"], "files": files}, indent=2))
    return 0
