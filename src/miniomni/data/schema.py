"""The VoiceAssistant-400K parquet schema and WAV bytes helpers for the data tools."""

from __future__ import annotations

import io
import json

import numpy as np
import soundfile as sf

from ..audio import WHISPER_SAMPLE_RATE
from ..errors import MiniOmniError

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


def _schema():
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


def require_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise MiniOmniError(f"the data tools need pyarrow ({exc}); pip install 'miniomni[data]'") from exc


def schema():
    """The pyarrow schema of a shard (with the ``huggingface`` features metadata)."""
    require_pyarrow()
    return _schema()


def wav_bytes(audio: np.ndarray, sample_rate: int = WHISPER_SAMPLE_RATE) -> bytes:
    """Mono float audio -> a complete 16-bit PCM WAV file in memory."""
    from ..audio import write_wav

    buffer = io.BytesIO()
    write_wav(buffer, audio, sample_rate)
    return buffer.getvalue()


def read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    return audio, int(rate)
