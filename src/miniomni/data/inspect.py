"""``miniomni data inspect``: statistics of a synthesized (or downloaded VoiceAssistant-400K) dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..audio import OUTPUT_SAMPLE_RATE
from ..errors import MiniOmniError
from ..tokens import SAMPLES_PER_FRAME
from .voiceassistant import read_wav_bytes, require_pyarrow


def shard_files(directory: str | Path) -> list[Path]:
    """The parquet shards of a dataset folder (``DIR/data/*.parquet`` or ``DIR/*.parquet``), or the one file given."""
    directory = Path(directory)
    if directory.is_file():
        return [directory]
    files = sorted((directory / "data").glob("*.parquet")) or sorted(directory.glob("*.parquet"))
    files = [f for f in files if not f.name.startswith(".")]
    if not files:
        raise MiniOmniError(f"no parquet shards in {directory}/data or {directory}")
    return files


def _stats(values: list[float]) -> dict:
    if not values:
        return {"min": 0, "mean": 0, "max": 0, "total": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"min": round(float(array.min()), 3), "mean": round(float(array.mean()), 3),
            "max": round(float(array.max()), 3), "total": round(float(array.sum()), 3)}


def _wav_seconds(data: bytes | None) -> float:
    import io

    import soundfile as sf

    if not data:
        return 0.0
    info = sf.info(io.BytesIO(data))
    return info.frames / info.samplerate


def summarize(directory: str | Path) -> dict:
    """Rows, shards, text lengths, answer seconds (frames x 2048 / 24 kHz), question seconds."""
    require_pyarrow()
    import pyarrow.parquet as pq

    files = shard_files(directory)
    q_chars, a_chars, a_seconds, q_seconds = [], [], [], []
    for path in files:
        table = pq.read_table(path, columns=["question", "answer", "answer_snac", "question_audio"])
        for row in table.to_pylist():
            q_chars.append(len(row["question"] or ""))
            a_chars.append(len(row["answer"] or ""))
            a_seconds.append((row["answer_snac"] or "").split().count("#") * SAMPLES_PER_FRAME / OUTPUT_SAMPLE_RATE)
            q_seconds.append(_wav_seconds((row["question_audio"] or {}).get("bytes")))
    return {
        "rows": len(q_chars),
        "shards": len(files),
        "question_chars": _stats(q_chars),
        "answer_chars": _stats(a_chars),
        "question_seconds": _stats(q_seconds),
        "answer_seconds": _stats(a_seconds),
        "question_hours": round(sum(q_seconds) / 3600, 6),
        "answer_hours": round(sum(a_seconds) / 3600, 6),
    }


def find_row(directory: str | Path, index: int) -> dict:
    """The row whose ``index`` column equals ``index``."""
    require_pyarrow()
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path in shard_files(directory):
        table = pq.read_table(path)
        hits = table.filter(pc.equal(table["index"], index))
        if hits.num_rows:
            return hits.to_pylist()[0]
    raise MiniOmniError(f"no row with index {index} in {directory}")


def decode_row(row: dict, codec) -> np.ndarray:
    """A row's ``answer_snac`` -> 24 kHz float32 speech."""
    from ..tokens import answer_snac_to_layers
    from .synth import variable_length_snac

    with variable_length_snac():
        return codec.decode(answer_snac_to_layers(row["answer_snac"]))


def question_audio(row: dict) -> tuple[np.ndarray, int]:
    """A row's question audio: (float32 samples, sample rate)."""
    return read_wav_bytes(row["question_audio"]["bytes"])
