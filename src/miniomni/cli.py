"""``miniomni`` command line: thin over :mod:`miniomni.pipeline` and :mod:`miniomni.checkpoints`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import MiniOmniError
from .tokens import Task

log = logging.getLogger("miniomni")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one spoken or written question")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (published layout), .safetensors bundle, or gpt-omni/mini-omni")
    p.add_argument("--task", default=None, choices=[t.value for t in Task],
                   help="default: A1A2-batch for --audio, T1A2 for --text")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", help="question as an audio file (any common rate, mono or stereo, <= 30 s)")
    source.add_argument("--text", help="question as text")
    p.add_argument("--out", default="answer.wav", help="24 kHz 16-bit WAV for speech answers (default answer.wav)")
    p.add_argument("--tokens-out", help="write every sampled token as JSON here")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on sampled steps (default: up to 2048 positions)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def _cmd_generate(args: argparse.Namespace) -> int:
    from .audio import write_wav
    from .pipeline import load

    started = time.perf_counter()
    omni = load(args.checkpoint, device=args.device, dtype=args.dtype)
    loaded = time.perf_counter()
    result = omni.generate(
        args.task,
        audio=args.audio,
        text=args.text,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    done = time.perf_counter()
    print(result.text)
    if result.audio is not None:
        write_wav(args.out, result.audio, result.sample_rate)
        log.info("wrote %.2f s of speech to %s", len(result.audio) / result.sample_rate, args.out)
    if args.tokens_out:
        Path(args.tokens_out).write_text(json.dumps(result.tokens_json()))
        log.info("wrote tokens to %s", args.tokens_out)
    log.info("load %.1f s, generate %.1f s (%d steps)", loaded - started, done - loaded, len(result.text_tokens))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .checkpoints import download

    directory = download(args.directory, revision=args.revision)
    print(directory)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints import read_checkpoint, write_bundle

    parts = read_checkpoint(args.checkpoint)
    path = write_bundle(parts, args.output)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miniomni", description="Mini-Omni: talk to a language model that talks back.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    p = sub.add_parser("download", help="fetch the published checkpoint files into a directory")
    p.add_argument("directory", nargs="?", default="checkpoint")
    p.add_argument("--revision", default=None, help="revision of gpt-omni/mini-omni (default: main)")
    p = sub.add_parser("convert", help="write a checkpoint as one .safetensors bundle (fast, safe loading)")
    p.add_argument("checkpoint", help="checkpoint directory in the published layout")
    p.add_argument("output", help="bundle path, e.g. mini-omni.safetensors")
    return parser


COMMANDS = {"generate": _cmd_generate, "download": _cmd_download, "convert": _cmd_convert}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except MiniOmniError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
