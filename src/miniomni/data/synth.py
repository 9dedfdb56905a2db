"""``miniomni data synth``: (question, answer) text pairs -> VoiceAssistant-400K parquet shards.

Layout of the output directory::

    DIR/data/train-{i:03d}of{N:03d}-{seq:05d}.parquet   shards (i/N from --shard, seq counts up)
    DIR/state/shard-{i:03d}of{N:03d}.json               done input indices, failures, seconds, shards
    DIR/manifest.json                                   totals over every state file

A shard is written to a temporary name and renamed; the state file of its job is then rewritten
(also temp + rename). A shard file that no state file names (a crash between the two renames) is
deleted on restart and its rows are made again, so nothing is lost or duplicated.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..audio import OUTPUT_SAMPLE_RATE, WHISPER_SAMPLE_RATE
from ..errors import MiniOmniError
from .voiceassistant import require_pyarrow, voiceassistant_row, write_parquet

log = logging.getLogger("miniomni.data")

# The model's context is 2048 positions; the answer's 7 layers are delayed by up to 7 steps and
# end with _eoa, so longer answers could never be trained on whole.
MAX_ANSWER_FRAMES = 2040
MAX_QUESTION_SECONDS = 30.0


@dataclass
class SynthOptions:
    """The settings of one ``data synth`` job (the CLI flags)."""

    snac: str | None
    tts: str = "espeak"
    voices: list[str] | None = None  # question voices to choose from (backend default list if None)
    answer_voice: str | None = None  # one fixed voice for every answer (backend default if None)
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    rows_per_shard: int = 1000
    split_name: str = "synth"
    seed: int = 0
    max_question_seconds: float = MAX_QUESTION_SECONDS
    max_answer_frames: int = MAX_ANSWER_FRAMES
    progress: bool = True
    text_answers: bool = False  # answers stay text (answer_snac empty): data for A1T2, T1T2 and ASR


# ---------------------------------------------------------------- input


def read_pairs(path: str | Path) -> list[tuple[int, str, str]]:
    """(index, question, answer) for every row of a .jsonl, .parquet or .csv file; index = row number."""
    path = Path(path)
    if not path.is_file():
        raise MiniOmniError(f"input not found: {path}")
    suffix = path.suffix.lower()
    records: list[dict]
    if suffix in (".jsonl", ".json"):
        records = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise MiniOmniError(f"{path}:{number} is not a JSON object ({exc})") from exc
    elif suffix == ".parquet":
        require_pyarrow()
        import pyarrow.parquet as pq

        records = pq.read_table(path, columns=["question", "answer"]).to_pylist()
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            records = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise MiniOmniError(f"{path}: give a .jsonl, .parquet or .csv file of question/answer pairs")
    pairs = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "question" not in record or "answer" not in record:
            raise MiniOmniError(f"{path}: row {index} has no 'question' and 'answer' fields")
        pairs.append((index, str(record["question"] or ""), str(record["answer"] or "")))
    return pairs


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard i/N`` -> (i, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise MiniOmniError(f"--shard takes i/N, e.g. 0/8 (got {text!r})") from None
    if n < 1 or not 0 <= i < n:
        raise MiniOmniError(f"--shard i/N needs 0 <= i < N (got {text!r})")
    return i, n


# ---------------------------------------------------------------- one row (runs in a worker)

_WORKER: dict = {}


def init_worker(options: SynthOptions, threads: int | None = None) -> None:
    """Set up a synthesis worker process (its threads, its TTS backend and codec) once, before its rows."""
    import torch

    from ..checkpoints import load_codec
    from .tts import get_backend

    if threads:  # a pool worker: the process is ours
        torch.set_num_threads(threads)
        variable_length_snac().__enter__()
    _WORKER["options"] = options
    _WORKER["codec"] = None if options.text_answers else load_codec(options.snac)
    _WORKER["tts"] = get_backend(options.tts, options.voices)


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    import soxr

    if rate == target:
        return audio.astype(np.float32)
    return soxr.resample(audio.astype(np.float32), rate, target).astype(np.float32)


@contextlib.contextmanager
def variable_length_snac() -> Iterator[None]:
    """Within it, SNAC handles inputs of many lengths fast: TorchScript's profiling executor is off.

    Under that executor SNAC's TorchScript activation re-specializes for every new input length
    (about 2 s each on CPU), and every answer has its own length.
    """
    import torch

    setter = getattr(torch._C, "_jit_set_profiling_executor", None)
    if setter is None:
        yield
        return
    previous = setter(False)
    try:
        yield
    finally:
        setter(previous)


class RowError(Exception):
    """A row that cannot be made; it is skipped and listed with this reason."""


def make_row(pair: tuple[int, str, str]) -> dict:
    """Speak and encode one pair. Returns {"row": ..., seconds} or {"index", "reason"} for a bad row."""
    from .tts import TTSError

    options: SynthOptions = _WORKER["options"]
    codec = _WORKER["codec"]
    tts = _WORKER["tts"]
    index, question, answer = pair
    try:
        question, answer = question.strip(), answer.strip()
        if not question:
            raise RowError("empty question")
        if not answer:
            raise RowError("empty answer")
        audio, rate = tts.synthesize(question, tts.question_voice(index, options.seed))
        q16 = _resample(audio, rate, WHISPER_SAMPLE_RATE)
        q_seconds = q16.size / WHISPER_SAMPLE_RATE
        if q_seconds > options.max_question_seconds:
            raise RowError(f"question audio is {q_seconds:.1f} s (> {options.max_question_seconds:g} s)")
        if q16.size == 0:
            raise RowError("question audio is empty")
        layers, answer_seconds = None, 0.0
        if not options.text_answers:
            audio, rate = tts.synthesize(answer, options.answer_voice)
            a24 = _resample(audio, rate, OUTPUT_SAMPLE_RATE)
            if a24.size == 0:
                raise RowError("answer audio is empty")
            layers = codec.encode(a24)
            if layers.shape[1] > options.max_answer_frames:
                raise RowError(f"answer is {layers.shape[1]} SNAC frames (> {options.max_answer_frames})")
            answer_seconds = a24.size / OUTPUT_SAMPLE_RATE
    except (RowError, TTSError) as exc:
        return {"index": index, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one bad row must not stop a day-long job
        return {"index": index, "reason": f"{type(exc).__name__}: {exc}"}
    row = voiceassistant_row(options.split_name, index, question, q16, answer, layers)
    return {"row": row, "question_seconds": q_seconds, "answer_seconds": answer_seconds}


# ---------------------------------------------------------------- state and files


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class JobState:
    """What one ``--shard i/N`` job has done, saved in its state file."""

    shard: tuple[int, int]
    done: list[int] = field(default_factory=list)  # input indices written or failed
    written: int = 0
    failures: list[dict] = field(default_factory=list)
    question_seconds: float = 0.0
    answer_seconds: float = 0.0
    shards: list[str] = field(default_factory=list)


def _tag(shard: tuple[int, int]) -> str:
    return f"{shard[0]:03d}of{shard[1]:03d}"


def _state_path(out: Path, shard: tuple[int, int]) -> Path:
    return out / "state" / f"shard-{_tag(shard)}.json"


def _load_states(out: Path) -> list[JobState]:
    states = []
    for path in sorted((out / "state").glob("shard-*.json")):
        raw = json.loads(path.read_text())
        raw["shard"] = tuple(raw["shard"])
        states.append(JobState(**raw))
    return states


def _save_state(out: Path, state: JobState) -> None:
    _atomic_write(_state_path(out, state.shard), json.dumps(asdict(state)).encode())


def write_manifest(out: Path, rows_in: int | None = None, extra: dict | None = None) -> dict:
    """Totals over every job's state file, written to ``DIR/manifest.json``."""
    states = _load_states(out)
    previous = {}
    if (out / "manifest.json").is_file():
        previous = json.loads((out / "manifest.json").read_text())
    failures = sorted((f for s in states for f in s.failures), key=lambda f: f["index"])
    manifest = {
        "format": "VoiceAssistant-400K",
        "rows_in": rows_in if rows_in is not None else previous.get("rows_in"),
        "rows_done": sum(len(s.done) for s in states),
        "written": sum(s.written for s in states),
        "failed": len(failures),
        "question_hours": round(sum(s.question_seconds for s in states) / 3600, 6),
        "answer_hours": round(sum(s.answer_seconds for s in states) / 3600, 6),
        "shards": sorted(name for s in states for name in s.shards),
        "jobs": sorted(f"{s.shard[0]}/{s.shard[1]}" for s in states),
        "failures": failures,
        **{k: v for k, v in previous.items() if k in ("settings",)},
        **(extra or {}),
    }
    _atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    return manifest


def _write_shard(out: Path, state: JobState, rows: list[dict]) -> str | None:
    if not rows:
        return None
    name = f"train-{_tag(state.shard)}-{len(state.shards):05d}.parquet"
    path = out / "data" / name
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
    write_parquet(rows, tmp)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return name


def _clean_orphans(out: Path, state: JobState) -> None:
    """Remove this job's temporary files and shards that its state does not name (crash leftovers)."""
    tag = _tag(state.shard)
    for path in (out / "data").glob(f"*train-{tag}-*"):
        if path.name.startswith(".") or path.name not in state.shards:
            log.warning("removing %s, left by an interrupted run (its rows are made again)", path)
            path.unlink()
    for path in (out / "state").glob(f".shard-{tag}.json.tmp-*"):
        path.unlink()


# ---------------------------------------------------------------- the job


def _results(options: SynthOptions, todo: list[tuple[int, str, str]]) -> Iterator[dict]:
    if options.workers <= 1:
        init_worker(options)
        with variable_length_snac():
            for pair in todo:
                yield make_row(pair)
        return
    threads = max(1, (os.cpu_count() or 1) // options.workers)
    context = multiprocessing.get_context("spawn")  # each worker loads its own codec; no forked torch state
    with context.Pool(options.workers, initializer=init_worker, initargs=(options, threads)) as pool:
        yield from pool.imap(make_row, todo, chunksize=1)


Results = Callable[[SynthOptions, list[tuple[int, str, str]]], Iterator[dict]]
"""Where rows are made: (options, pairs to make) -> :func:`make_row`'s results, in the pairs' order."""


def synthesize(
    input_path: str | Path,
    out: str | Path,
    options: SynthOptions,
    on_shard: Callable[[str | None, JobState], None] | None = None,
    results: Results | None = None,
) -> dict:
    """Make (or finish) the dataset; returns the manifest. ``on_shard`` runs after each shard is recorded.

    ``results`` makes the rows (default: this process, or a pool of ``options.workers``
    processes); whatever makes them, the shards, state files and manifest are written here.
    """
    require_pyarrow()
    from ..checkpoints import resolve_snac
    from .tts import get_backend

    if options.rows_per_shard < 1:
        raise MiniOmniError("--rows-per-shard must be at least 1")
    if not options.text_answers:
        if not options.snac:
            raise MiniOmniError("spoken answers need a SNAC codec: pass --snac, or --text-answers to keep answers text")
        resolve_snac(options.snac)  # fail now, not in every worker
    get_backend(options.tts, options.voices)
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "state").mkdir(parents=True, exist_ok=True)
    pairs = read_pairs(input_path)
    states = {s.shard: s for s in _load_states(out)}
    state = states.get(options.shard) or JobState(shard=options.shard)
    _clean_orphans(out, state)
    done = {i for s in states.values() for i in s.done}
    i, n = options.shard
    todo = [p for p in pairs if p[0] % n == i and p[0] not in done]
    settings = {k: v for k, v in asdict(options).items() if k not in ("workers", "shard", "progress")}
    write_manifest(out, len(pairs), {"settings": settings})
    log.info("%d rows to make (%d already done)", len(todo), len(done))

    from tqdm import tqdm

    pending: list[dict] = []
    bar = tqdm(total=len(todo), unit="row", disable=not options.progress)
    shards_total = -(-len(todo) // options.rows_per_shard)
    shards_done = 0

    def flush() -> None:
        name = _write_shard(out, state, [r["row"] for r in pending if "row" in r])
        for result in pending:
            state.done.append(result["index"] if "index" in result else result["row"]["index"])
            if "row" in result:
                state.written += 1
                state.question_seconds += result["question_seconds"]
                state.answer_seconds += result["answer_seconds"]
            else:
                state.failures.append({"index": result["index"], "reason": result["reason"]})
                log.warning("row %d skipped: %s", result["index"], result["reason"])
        if name:
            state.shards.append(name)
        _save_state(out, state)
        pending.clear()
        nonlocal shards_done
        shards_done += 1
        bar.set_postfix_str(f"shards {shards_done}/{shards_total}")
        log.info("shard %d/%d recorded (%s)", shards_done, shards_total, name or "no rows written")
        if on_shard is not None:
            on_shard(name, state)

    made = (results or _results)(options, todo) if todo else iter(())
    try:
        for result in made:
            pending.append(result)
            bar.update(1)
            if len(pending) >= options.rows_per_shard:
                flush()
        if pending:
            flush()
    finally:
        close = getattr(made, "close", None)
        if close is not None:  # stop the workers now, also when interrupted (a traceback keeps the generator)
            close()
        bar.close()
    return write_manifest(out, len(pairs))
