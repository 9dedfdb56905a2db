"""``miniomni`` command line: thin over :mod:`miniomni.pipeline` and :mod:`miniomni.checkpoints`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .audio import ENCODER_CONTEXTS, OUTPUT_SAMPLE_RATE, float_to_pcm16
from .data.cli import add_data_command
from .devices import resolve_device
from .errors import MiniOmniError, install_hint
from .precision import INT8_ACTIVATIONS, PLAN_DTYPES, Plan, Precision
from .quantize import QUANTIZE_MODES
from .server.settings import SERVE_ENCODER_CONTEXT, add_server_arguments, api_key_from_args
from .streaming import AudioChunk, TextDelta
from .tokens import SAMPLES_PER_FRAME, Task

log = logging.getLogger("miniomni")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one spoken or written question")
    _add_loading(p, serve=False)
    p.add_argument("--task", default=None, choices=[t.value for t in Task],
                   help="default: A1A2-batch for --audio, T1A2 for --text")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", help="question as an audio file (any common rate, mono or stereo, <= 30 s)")
    source.add_argument("--text", help="question as text")
    p.add_argument("--out", default="answer.wav",
                   help="24 kHz 16-bit WAV for speech answers (default answer.wav); '-' writes raw 16-bit "
                        "little-endian mono PCM to stdout (the text then goes to stderr)")
    p.add_argument("--stream", action="store_true",
                   help="print text and write (or play) audio as they are generated")
    p.add_argument("--play", action="store_true", help="play the answer as it arrives (needs sounddevice)")
    p.add_argument("--tokens-out", help="write every sampled token as JSON here")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on sampled steps (default: up to 2048 positions)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    p.set_defaults(func=_cmd_generate)


class _EncoderContext(argparse.Action):
    """``--encoder-context``, and ``--fast-encoder`` as its shorthand: two different choices are refused."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        value = self.const if self.nargs == 0 else values
        earlier = getattr(namespace, "_encoder_context_option", None)
        if earlier is not None and earlier[1] != value:
            parser.error(f"{option_string} (encoder context {value}) contradicts {earlier[0]} {earlier[1]}: give one")
        namespace._encoder_context_option = (option_string, value)
        setattr(namespace, self.dest, value)


def _add_loading(p: argparse.ArgumentParser, serve: bool) -> None:
    """What to load and how, for generate and serve."""
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (published layout), .safetensors bundle, or gpt-omni/mini-omni")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    if serve:
        p.add_argument("--quantize", choices=("auto", *QUANTIZE_MODES), default="auto",
                       help="auto (default): int8 on a CPU, where float32 cannot keep a conversation in real time, "
                            "none elsewhere; none: the float32 weights as published (bit-faithful, slow on a CPU)")
    else:
        p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                       help="int8 weight-only linears (faster on CPU; not bit-faithful)")
    default = SERVE_ENCODER_CONTEXT if serve else "30"
    p.add_argument("--encoder-context", choices=ENCODER_CONTEXTS, default=default, action=_EncoderContext,
                   help="how much audio Whisper attends over: 30 (its whole 30 s window, as the reference: "
                        "faithful), 10 or 5 (the question padded to the next multiple of 10 s or 5 s: quicker, the "
                        "features change a little), audio (the question only: quickest, the features change most); "
                        f"default {default}")
    p.add_argument("--fast-encoder", dest="encoder_context", nargs=0, const="audio", action=_EncoderContext,
                   help="short for --encoder-context audio")
    p.add_argument("--dtype", default="auto", choices=PLAN_DTYPES,
                   help="the decoder's activations; auto (default): float32 with float weights (faithful), with "
                        "int8 weights bfloat16 where the machine has bfloat16 instructions, else float32")
    p.add_argument("--encoder-dtype", default="auto", choices=PLAN_DTYPES,
                   help="Whisper's precision; auto (default): bfloat16 only where the decoder runs in it and the "
                        "machine has bfloat16 instructions")
    p.add_argument("--codec-dtype", default="auto", choices=PLAN_DTYPES,
                   help="the SNAC codec's precision; auto (default) as for --encoder-dtype (serve also times both)")
    p.add_argument("--int8-activations", default="auto", choices=INT8_ACTIVATIONS,
                   help="with int8 weights on an x86 CPU, quantize each row's activations to 8 bits (7 without "
                        "VNNI) for fbgemm's int8 products: about the same cost for 1 to 16 rows, so more talkers, at "
                        "a cost in quality; auto (default): on where the CPU has VNNI")


def _load(args: argparse.Namespace, quantize: str | None) -> object:
    from .pipeline import load

    return load(args.checkpoint, device=args.device, dtype=args.dtype, quantize=quantize,
                encoder_context=args.encoder_context, encoder_dtype=args.encoder_dtype,
                codec_dtype=args.codec_dtype, int8_activations=args.int8_activations)


def _cmd_generate(args: argparse.Namespace) -> int:
    default_task = "A1A2-batch" if args.audio is not None else "T1A2"
    speech_out = Task.parse(args.task or default_task).audio_output
    # Check where the results go before spending minutes on the answer.
    _check_writable(args.tokens_out, "--tokens-out")
    if speech_out and args.out != "-":
        _check_writable(args.out, "--out")
    started = time.perf_counter()
    omni = _load(args, args.quantize)
    log.info("loaded in %.1f s", time.perf_counter() - started)
    request = dict(audio=args.audio, text=args.text, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    text_out = sys.stderr if args.out == "-" else sys.stdout
    with AudioSink(args.out if speech_out else None, args.play and speech_out) as sink:
        if args.stream:
            done = None
            for event in omni.stream(args.task, **request):
                if isinstance(event, TextDelta):
                    text_out.write(event.text)
                    text_out.flush()
                elif isinstance(event, AudioChunk):
                    sink.write(event.audio)
                else:
                    done = event
            text_out.write("\n")
            tokens = {"task": done.task, "prompt_length": done.prompt_length,
                      "text": done.text_tokens, "audio": done.audio_tokens}
            t = done.timings
            log.info("first audio %s ms, %.1f steps/s, real-time factor %s",
                     "-" if t.first_audio_ms is None else f"{t.first_audio_ms:.0f}", t.steps_per_second,
                     "-" if t.real_time_factor is None else f"{t.real_time_factor:.2f}")
        else:
            result = omni.generate(args.task, **request)
            print(result.text, file=text_out)
            if result.audio is not None:
                sink.write(result.audio)
            tokens = result.tokens_json()
    if args.tokens_out:
        try:
            Path(args.tokens_out).write_text(json.dumps(tokens))
        except OSError as exc:
            raise MiniOmniError(f"could not write --tokens-out {args.tokens_out} ({exc})") from exc
        log.info("wrote tokens to %s", args.tokens_out)
    return 0


def _check_writable(path: str | None, option: str) -> None:
    if not path:
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise MiniOmniError(f"{option} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise MiniOmniError(f"{option}: the folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise MiniOmniError(f"{option}: {path} is not writable")


class AudioSink:
    """Where answer audio goes: a WAV file written as it arrives, raw PCM on stdout, the speakers."""

    def __init__(self, out: str | None, play: bool, sample_rate: int = OUTPUT_SAMPLE_RATE) -> None:
        self.out, self.play, self.sample_rate = out, play, sample_rate
        self.samples, self._file, self._player = 0, None, None

    def __enter__(self) -> AudioSink:
        if self.play:
            try:
                import sounddevice
            except (ImportError, OSError) as exc:
                raise MiniOmniError(f"--play needs the sounddevice package and PortAudio ({exc}); "
                                    "pip install sounddevice, or write a file with --out") from exc
            try:
                self._player = sounddevice.OutputStream(samplerate=self.sample_rate, channels=1, dtype="float32")
                self._player.start()
            except Exception as exc:  # sounddevice.PortAudioError and friends
                raise MiniOmniError(f"--play could not open an audio output ({exc}); use --out instead") from exc
        return self

    def write(self, audio: np.ndarray) -> None:
        if self._player is not None:
            self._player.write(np.ascontiguousarray(audio, dtype=np.float32).reshape(-1, 1))
        if self.out == "-":
            sys.stdout.buffer.write(float_to_pcm16(audio))
            sys.stdout.buffer.flush()
        elif self.out:
            import soundfile

            try:
                if self._file is None:
                    self._file = soundfile.SoundFile(self.out, "w", samplerate=self.sample_rate, channels=1,
                                                     subtype="PCM_16", format="WAV")
                self._file.write(np.clip(audio, -1.0, 1.0))
            except (OSError, soundfile.LibsndfileError) as exc:
                raise MiniOmniError(f"could not write {self.out} ({exc})") from exc
        self.samples += len(audio)

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()
            log.info("wrote %.2f s of speech to %s", self.samples / self.sample_rate, self.out)
        if self._player is not None:
            self._player.stop()
            self._player.close()


def _cmd_download(args: argparse.Namespace) -> int:
    from .checkpoints import download
    from .server.turns.endofturn import download_turn_model

    directory = download(args.directory, revision=args.revision)
    try:  # semantic VAD's end-of-turn model, beside the checkpoint; the model works without it
        download_turn_model(directory)
    except MiniOmniError as exc:
        log.warning("%s; semantic_vad will be unavailable unless that file is found another way", exc)
    print(directory)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints import read_checkpoint, write_bundle
    from .devices import resolve_dtype

    parts = read_checkpoint(args.checkpoint)
    dtype = None if args.dtype is None else resolve_dtype(args.dtype)
    path = write_bundle(parts, args.output, dtype=dtype, quantize=args.quantize)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miniomni",
                                     description="Mini-Omni: talk to a language model that talks back.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    add_data_command(sub)
    from .eval.cli import add_eval_command
    from .train.cli import add_train_command
    from .train.from_lm import add_init_command

    add_train_command(sub)
    add_init_command(sub)
    add_eval_command(sub)
    p = sub.add_parser("download", help="fetch the published checkpoint files into a directory")
    p.add_argument("directory", nargs="?", default="checkpoint")
    p.add_argument("--revision", default=None, help="revision of gpt-omni/mini-omni (default: main)")
    p.set_defaults(func=_cmd_download)
    p = sub.add_parser("convert", help="write a checkpoint as one .safetensors bundle (fast, safe loading)")
    p.add_argument("checkpoint", help="checkpoint directory in the published layout")
    p.add_argument("output", help="bundle path, e.g. mini-omni.safetensors")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="cast the model weights (default: keep the checkpoint's)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                   help="store the decoder's linears as int8 (loads straight into --quantize int8)")
    p.set_defaults(func=_cmd_convert)
    return parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve voice chat over HTTP (see docs/server.md)")
    _add_loading(p, serve=True)
    p.add_argument("--max-answers", "--max-sessions", dest="max_answers", type=int, default=4,
                   help="concurrent answers; more get HTTP 503 (--max-sessions: its former name)")
    p.add_argument("--simulate-text-end", type=float, default=None, metavar="FRACTION",
                   help="for benchmarks on random weights, which never end their text: end every spoken "
                        "answer's text after this fraction of its steps, as a real answer's text ends before "
                        "its speech (0.4 is typical)")
    add_server_arguments(p)
    from .server.rayserve import add_ray_arguments  # ray itself is imported only with --ray

    add_ray_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.ray:
        from .server.rayserve import serve_from_args

        return serve_from_args(args)
    try:
        import uvicorn

        from .server.app import create_app, shut_down, uvicorn_options
        from .server.engine import Engine
        from .server.settings import settings_from_args
        from .server.turns.endofturn import turn_model_for_serving
    except ImportError as exc:
        raise MiniOmniError(f"serving needs the server extra ({exc}); {install_hint('server')}") from exc
    from .precision import confirm_codec, confirm_prompts

    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise MiniOmniError("give both --ssl-certfile and --ssl-keyfile, or neither")
    turn_model = turn_model_for_serving(args.turn_model, args.checkpoint)
    quantize = args.quantize
    if quantize == "auto":
        quantize = "int8" if resolve_device(args.device).type == "cpu" else "none"
    omni = _load(args, quantize)
    omni.plan = confirm_prompts(omni.model, confirm_codec(omni.codec, omni.plan))
    settings = settings_from_args(args, api_key_from_args(args), turn_model)
    engine = Engine(omni, max_answers=args.max_answers, start=False, text_end=args.simulate_text_end)
    _report_speed(engine.warm_up(), omni.plan, args)
    app = create_app(engine, settings)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                                           ssl_keyfile=args.ssl_keyfile, log_level="info",
                                           timeout_graceful_shutdown=5, **uvicorn_options(settings)))
    # The HTTP side runs on a thread of its own; the main thread computes (see server/engine/scheduler.py).
    http = threading.Thread(target=_serve_http, args=(server, engine), name="miniomni-http", daemon=True)

    def stop(signum: int, frame: object) -> None:
        # Answers end with an error event, connections close with 1001, then uvicorn stops; a second
        # signal stops at once.
        if stopping.is_set():
            server.should_exit = server.force_exit = True
            return
        stopping.set()
        closed = shut_down(app)
        if closed is None:
            server.should_exit = True
        else:
            closed.add_done_callback(lambda _: setattr(server, "should_exit", True))

    stopping = threading.Event()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    http.start()
    try:
        engine.run_forever()
    finally:
        server.should_exit = True
        http.join(timeout=10)
    return 0


def _report_speed(timings: object, plan: Plan, args: argparse.Namespace) -> None:
    """Say which precisions run, whether this machine keeps a spoken answer in real time, and what to pass if not."""
    frame_ms = 1000 * SAMPLES_PER_FRAME / OUTPUT_SAMPLE_RATE
    frames = max(1.0, timings.audio_seconds * 1000 / frame_ms)
    cost = timings.step_ms_median + timings.codec_ms / frames
    measured = (f"a frame of speech ({frame_ms:.0f} ms) costs {cost:.0f} ms here (decode step "
                f"{timings.step_ms_median:.0f} ms, codec {timings.codec_ms / frames:.0f} ms)")
    from .pipeline import describe_encoder_context

    log.info("precision: %s; %s; %s", plan.describe(), plan.quality(), describe_encoder_context(args.encoder_context))
    if cost < 0.9 * frame_ms:
        log.info("real time: %s", measured)
        return
    log.warning("this machine cannot keep a spoken answer in real time with these settings: %s, so listeners will "
                "hear gaps; %s%s", measured, _advice(plan, args),
                "" if args.encoder_context == "audio" else
                " (a shorter --encoder-context, audio the shortest, also makes first answers quicker)")


def _advice(plan: Plan, args: argparse.Namespace) -> str:
    """What would make a frame cheaper on this machine, from what was asked and what the plan chose."""
    from . import int8act
    from .precision import choose

    device = resolve_device(args.device)
    if plan.weights != "int8":
        return "pass --quantize int8 (or leave --quantize at auto)"
    best = choose(device, Precision("int8"))
    flags = {"activations": "--dtype", "codec": "--codec-dtype"}  # what a frame's cost depends on
    asked = [flag for part, flag in flags.items()
             if part not in plan.chosen and getattr(plan, part) != getattr(best, part)]
    if asked:
        return f"leave {' and '.join(asked)} at auto"
    if not plan.int8_activations and device.type == "cpu" and int8act.available():
        return ("--int8-activations on makes steps cheaper, at a cost in quality (docs/performance.md); "
                "otherwise this is the fastest precision plan here")
    return "this is already the fastest precision plan here: use a faster machine or a GPU"


def _serve_http(server: object, engine: object) -> None:
    from .server.priority import lower_thread

    lower_thread()  # and every thread it starts: the compute thread keeps the cores (server/priority.py)
    try:
        server.run()
    finally:
        engine.close()  # the server has stopped (or failed to start): the compute loop ends too


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except MiniOmniError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
