"""The VoiceAssistant-400K parquet format: its schema, writing rows and reading them as training records.

A row is ``split_name, index, round, question, question_audio {bytes, path}, answer, answer_snac``:
the question audio is a whole 16 kHz WAV file, the answer's speech is its SNAC frames written as
text (:func:`tokens.layers_to_answer_snac`). ``miniomni data synth`` writes such rows; the trainer
reads them, local (:func:`read_voiceassistant`) or streamed from the hub
(:func:`stream_voiceassistant`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch

from ..audio import WHISPER_SAMPLE_RATE, load_audio, trim_to_30s
from ..errors import MiniOmniError, install_hint
from ..tokens import Task, answer_snac_to_layers, layers_to_answer_snac
from .record import Record

if TYPE_CHECKING:
    import pyarrow as pa

VOICEASSISTANT_REPO = "gpt-omni/VoiceAssistant-400K"

# Field names and types of gpt-omni/VoiceAssistant-400K's parquet files; question_audio is a
# `datasets` Audio feature, stored as struct {bytes, path}.
FEATURES = {
    "split_name": {"dtype": "string", "_type": "Value"},
    "index": {"dtype": "int64", "_type": "Value"},
    "round": {"dtype": "int64", "_type": "Value"},
    "question": {"dtype": "string", "_type": "Value"},
    "question_audio": {"_type": "Audio"},
    "answer": {"dtype": "string", "_type": "Value"},
    "answer_snac": {"dtype": "string", "_type": "Value"},
}


def require_pyarrow() -> None:
    """Raise a MiniOmniError that says how to install pyarrow when it is missing."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise MiniOmniError(f"the data tools need pyarrow ({exc}); {install_hint('data')}") from exc


def schema() -> pa.Schema:
    """The pyarrow schema of a shard (with the ``huggingface`` features metadata)."""
    require_pyarrow()
    import pyarrow as pa

    fields = [
        pa.field("split_name", pa.string()),
        pa.field("index", pa.int64()),
        pa.field("round", pa.int64()),
        pa.field("question", pa.string()),
        pa.field("question_audio", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("answer", pa.string()),
        pa.field("answer_snac", pa.string()),
    ]
    # The metadata `datasets` writes, so that load_dataset("parquet", ...) sees an Audio column.
    metadata = {b"huggingface": json.dumps({"info": {"features": FEATURES}}).encode()}
    return pa.schema(fields, metadata=metadata)


# ---------------------------------------------------------------- writing


def wav_bytes(audio: np.ndarray, sample_rate: int = WHISPER_SAMPLE_RATE) -> bytes:
    """Mono float audio -> a complete 16-bit PCM WAV file in memory."""
    from ..audio import write_wav

    buffer = io.BytesIO()
    write_wav(buffer, audio, sample_rate)
    return buffer.getvalue()


def voiceassistant_row(split_name: str, index: int, question: str, question_audio: np.ndarray, answer: str,
                       answer_layers: torch.Tensor | None) -> dict:
    """One single-turn row: the 16 kHz question audio as a WAV file, the (7, N) answer frames as ``answer_snac``.

    Without ``answer_layers`` (a text-only answer) ``answer_snac`` is empty.
    """
    return {
        "split_name": split_name,
        "index": index,
        "round": 0,
        "question": question,
        "question_audio": {"bytes": wav_bytes(question_audio, WHISPER_SAMPLE_RATE),
                           "path": f"question_{index:08d}.wav"},
        "answer": answer,
        "answer_snac": "" if answer_layers is None else layers_to_answer_snac(answer_layers),
    }


def write_parquet(rows: list[dict], path: Path) -> None:
    """Rows (as :func:`voiceassistant_row` makes them) -> one parquet file with the schema and its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=schema()), path)


# ---------------------------------------------------------------- reading


def read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """A WAV file in memory -> (float32 samples, sample rate)."""
    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    return audio, int(rate)


def _audio_bytes(value) -> bytes:
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            return Path(value["path"]).read_bytes()
        if data is None:
            raise MiniOmniError("question_audio holds neither bytes nor a readable path")
        return bytes(data)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise MiniOmniError(f"question_audio is a {type(value).__name__}; expected {{bytes, path}}")


def voiceassistant_record(row: dict, task: Task | str = Task.A1A2) -> Record:
    """One VoiceAssistant-400K row -> Record.

    A1A2/A1T2 use the question audio, T1A2/T1T2 its text; ASR pairs the question audio with the
    question text (the transcript).
    """
    task = Task.parse(task)
    if task == Task.A1A2_BATCH:
        raise ValueError("VoiceAssistant rows make A1A2, A1T2, T1A2, T1T2 or ASR examples, not A1A2-batch")
    source = f"{row.get('split_name', '')}/{row.get('index', '')}/{row.get('round', '')}"
    audio = None
    if task.audio_input:
        audio, _ = trim_to_30s(load_audio(_audio_bytes(row["question_audio"])))
    if task == Task.ASR:
        return Record(task, row["question"], question_audio=audio, source=source)
    layers = None
    if task.audio_output:
        if not (row.get("answer_snac") or "").strip():
            raise MiniOmniError(f"row {source} has no spoken answer (answer_snac is empty, as `data synth "
                                f"--text-answers` writes): train it as A1T2, T1T2 or ASR, or remake it with --snac")
        layers = answer_snac_to_layers(row["answer_snac"])
    return Record(task, row["answer"], question_audio=audio, question_text=None if task.audio_input
                  else row["question"], answer_layers=layers, source=source)


def read_voiceassistant(paths: str | Path | Iterable[str | Path], task: Task | str = Task.A1A2,
                        batch_rows: int = 64) -> Iterator[Record]:
    """Records from local VoiceAssistant-400K parquet files (a file, a folder of them, a folder holding
    ``data/`` as ``data synth`` writes it, or a list of these)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MiniOmniError("reading parquet needs pyarrow: pip install pyarrow") from exc
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) / "data" if Path(p).is_dir() and not any(Path(p).glob("*.parquet")) and (Path(p) / "data").is_dir()
             else p for p in paths]
    for path in _expand(paths, "*.parquet"):
        parquet = pq.ParquetFile(path)
        for chunk in parquet.iter_batches(batch_size=batch_rows):
            for row in chunk.to_pylist():
                yield voiceassistant_record(row, task)


def stream_voiceassistant(task: Task | str = Task.A1A2, repo: str = VOICEASSISTANT_REPO, split: str = "train",
                          **load_options) -> Iterator[Record]:
    """Records streamed from the Hugging Face hub with ``datasets`` (imported only here)."""
    try:
        import datasets
    except ImportError as exc:
        raise MiniOmniError("streaming from the hub needs the datasets package: pip install datasets "
                            "(or download the parquet files and use read_voiceassistant)") from exc
    try:
        data = datasets.load_dataset(repo, split=split, streaming=True, **load_options)
        if "question_audio" in (data.features or {}):
            data = data.cast_column("question_audio", datasets.Audio(decode=False))
        rows = iter(data)
        first = next(rows, None)
    except Exception as exc:  # network, auth and hub errors come in many types
        raise MiniOmniError(f"could not stream {repo} ({type(exc).__name__}: {exc}); check the network "
                            "connection or use local parquet files with read_voiceassistant") from exc
    if first is None:
        return
    yield voiceassistant_record(first, task)
    for row in rows:
        yield voiceassistant_record(row, task)


def _expand(paths: str | Path | Iterable[str | Path], pattern: str) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for path in map(Path, paths):
        out.extend(sorted(path.glob(pattern)) if path.is_dir() else [path])
    return out
