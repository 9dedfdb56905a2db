"""The VoiceAssistant-400K parquet schema, WAV bytes helpers and SNAC loading for the data tools."""

from __future__ import annotations

import io
import json
from pathlib import Path

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


def resolve_snac(source: str | Path) -> Path:
    """A ``snac/`` folder, a checkpoint dir holding one, or a miniomni ``.safetensors`` bundle."""
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    for candidate in (path, path / "snac"):
        if (candidate / "config.json").is_file() and (candidate / "pytorch_model.bin").is_file():
            return candidate
    raise MiniOmniError(
        f"no SNAC codec at {path}: give --snac a folder with config.json + pytorch_model.bin, a checkpoint "
        "directory holding snac/, or a miniomni .safetensors bundle (`miniomni download DIR` fetches one)"
    )


def load_codec(source: str | Path, device: str = "cpu"):
    """Load the SNAC codec with the project's safe loaders."""
    from ..codec import Codec

    path = resolve_snac(source)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "snac_config" not in metadata:
                raise MiniOmniError(f"{path} is not a miniomni bundle with a SNAC codec")
            names = [k for k in handle.keys() if k.startswith("snac.")]  # noqa: SIM118 - a safetensors handle
            state = {k[len("snac."):]: handle.get_tensor(k) for k in names}
        return Codec.from_state_dict(json.loads(metadata["snac_config"]), state, device)
    from ..safeload import load_torch_file

    fix = "download it again with `miniomni download DIR`"
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise MiniOmniError(f"{path / 'config.json'} is not valid JSON ({exc}); {fix}") from exc
    state = load_torch_file(path / "pytorch_model.bin", "SNAC codec weights", fix)
    return Codec.from_state_dict(config, state, device)
