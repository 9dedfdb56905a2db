"""``miniomni data``: make spoken QA training data (``synth``) and look into it (``inspect``)."""

from __future__ import annotations

import argparse
import json
import time

from ..audio import OUTPUT_SAMPLE_RATE
from ..errors import MiniOmniError


def add_data_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make and inspect spoken QA training data (see docs/data.md)")
    data = p.add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="speak (question, answer) pairs into VoiceAssistant-400K parquet shards")
    s.add_argument("--input", required=True, help=".jsonl, .parquet or .csv with question and answer columns")
    s.add_argument("--out", required=True, help="output directory (data/*.parquet, state/, manifest.json)")
    s.add_argument("--snac", default="checkpoint",
                   help="snac/ folder, checkpoint directory holding snac/, or .safetensors bundle (default checkpoint)")
    s.add_argument("--tts", default="espeak", help="TTS backend: espeak (default, offline) or piper")
    s.add_argument("--voice", action="append", default=None,
                   help="question voice to pick from (repeatable); espeak NAME[:RATE[:PITCH]], piper MODEL.onnx "
                        "or joe (default: a built-in list for espeak, joe for piper)")
    s.add_argument("--answer-voice", default=None, help="the one voice of every answer (default: the backend's)")
    s.add_argument("--workers", type=int, default=1,
                   help="processes (with --ray: actors), each with its own codec (default 1)")
    s.add_argument("--shard", default="0/1", help="i/N: only rows with index %% N == i (cluster job arrays)")
    s.add_argument("--rows-per-shard", type=int, default=1000, help="rows per parquet file (default 1000)")
    s.add_argument("--split-name", default="synth", help="value of the split_name column (default synth)")
    s.add_argument("--seed", type=int, default=0, help="seed of the per-row question voice choice")
    s.add_argument("--max-question-seconds", type=float, default=30.0)
    s.add_argument("--max-answer-frames", type=int, default=2040)
    s.add_argument("--text-answers", action="store_true",
                   help="speak only the questions; answers stay text (no --snac needed): data for A1T2, T1T2, ASR")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .raysynth import add_ray_arguments as add_ray_synth_arguments  # ray itself only with --ray

    add_ray_synth_arguments(s)
    i = data.add_parser("inspect", help="statistics of a dataset; decode one row's answer to a WAV")
    i.add_argument("directory", help="dataset directory (DIR/data/*.parquet) or one parquet file")
    i.add_argument("--row", type=int, default=None, help="the row whose index column is N")
    i.add_argument("--wav", default=None, help="write the row's decoded answer_snac here (24 kHz)")
    i.add_argument("--question-wav", default=None, help="write the row's question audio here (16 kHz)")
    i.add_argument("--snac", default="checkpoint", help="SNAC codec for --wav (as for synth)")
    p.set_defaults(func=run_data_command)


def run_data_command(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from .synth import SynthOptions, parse_shard, synthesize

        if args.workers < 1:
            raise MiniOmniError("--workers must be at least 1")
        options = SynthOptions(
            snac=args.snac, tts=args.tts, voices=args.voice, answer_voice=args.answer_voice, workers=args.workers,
            shard=parse_shard(args.shard), rows_per_shard=args.rows_per_shard, split_name=args.split_name,
            seed=args.seed, max_question_seconds=args.max_question_seconds,
            max_answer_frames=args.max_answer_frames, progress=not args.no_progress,
            text_answers=args.text_answers,
        )
        started = time.perf_counter()
        if args.ray:
            from .raysynth import synthesize_ray

            manifest = synthesize_ray(args.input, args.out, options, args.ray_address, args.worker_cpus)
        else:
            manifest = synthesize(args.input, args.out, options)
        elapsed = time.perf_counter() - started
        keys = ("rows_in", "rows_done", "written", "failed", "question_hours", "answer_hours")
        print(json.dumps({**{k: manifest[k] for k in keys}, "seconds": round(elapsed, 2)}))
        return 0
    from .inspect import decode_row, find_row, question_audio, summarize

    if (args.wav or args.question_wav) and args.row is None:
        raise MiniOmniError("--wav and --question-wav need --row N")
    report: dict = summarize(args.directory)
    if args.row is not None:
        from ..audio import write_wav

        row = find_row(args.directory, args.row)
        report["row"] = {k: row[k] for k in ("split_name", "index", "round", "question", "answer")}
        report["row"]["answer_frames"] = row["answer_snac"].split().count("#")
        if args.question_wav:
            audio, rate = question_audio(row)
            write_wav(args.question_wav, audio, rate)
        if args.wav:
            from ..checkpoints import load_codec

            write_wav(args.wav, decode_row(row, load_codec(args.snac)), OUTPUT_SAMPLE_RATE)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0
