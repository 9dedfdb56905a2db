"""Training data readers: VoiceAssistant-400K parquet (local or streamed), LibriSpeech ASR, JSONL text pairs.

Every reader yields plain :class:`Record` s; :func:`collate.collate_record` turns one into a
:class:`collate.TrainingExample`. :class:`FeatureCache` computes Whisper features on the fly
and keeps them on disk, keyed by a hash of the audio.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..audio import load_audio, trim_to_30s
from ..errors import MiniOmniError
from ..tokens import Task, answer_snac_to_layers

VOICEASSISTANT_REPO = "gpt-omni/VoiceAssistant-400K"


@dataclass
class Record:
    """One training pair before tokenization."""

    task: Task
    answer_text: str
    question_audio: np.ndarray | None = None  # 16 kHz mono float32
    question_text: str | None = None
    answer_layers: torch.Tensor | None = None  # (7, N) SNAC frames of a speech answer
    source: str = ""


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
    """One VoiceAssistant-400K row -> Record. A1A2/A1T2 use the question audio, T1A2/T1T2 its text."""
    task = Task.parse(task)
    if task in (Task.ASR, Task.A1A2_BATCH):
        raise ValueError(f"VoiceAssistant rows make A1A2, A1T2, T1A2 or T1T2 examples, not {task.value}")
    source = f"{row.get('split_name', '')}/{row.get('index', '')}/{row.get('round', '')}"
    audio = None
    if task.audio_input:
        audio, _ = trim_to_30s(load_audio(_audio_bytes(row["question_audio"])))
    layers = answer_snac_to_layers(row["answer_snac"]) if task.audio_output else None
    return Record(task, row["answer"], question_audio=audio, question_text=None if task.audio_input
                  else row["question"], answer_layers=layers, source=source)


def read_voiceassistant(paths: str | Path | Iterable[str | Path], task: Task | str = Task.A1A2,
                        batch_rows: int = 64) -> Iterator[Record]:
    """Records from local VoiceAssistant-400K parquet files (a file, a folder of them, or a list)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MiniOmniError("reading parquet needs pyarrow: pip install pyarrow") from exc
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


def read_librispeech(root: str | Path) -> Iterator[Record]:
    """ASR records from a LibriSpeech-layout folder: ``*/*/*.trans.txt`` lines ``ID TEXT``, ``ID.flac`` beside."""
    root = Path(root)
    transcripts = sorted(root.glob("*/*/*.trans.txt")) or sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise MiniOmniError(f"no *.trans.txt files under {root}; expected the LibriSpeech layout")
    for transcript in transcripts:
        for line in transcript.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            audio_path = transcript.parent / f"{utterance}.flac"
            if not audio_path.exists():
                raise MiniOmniError(f"{transcript} names {utterance} but {audio_path} is missing")
            audio, _ = trim_to_30s(load_audio(audio_path))
            yield Record(Task.ASR, text.strip(), question_audio=audio, source=str(audio_path))


def read_jsonl(path: str | Path) -> Iterator[Record]:
    """T1T2 records from JSONL lines ``{"question", "answer"}`` or ``{"instruction", "output"}``."""
    path = Path(path)
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            question = item.get("question", item.get("instruction"))
            answer = item.get("answer", item.get("output"))
            if not question or answer is None:
                raise MiniOmniError(f"{path}:{number}: expected question/answer or instruction/output keys")
            if item.get("input"):  # alpaca-style context goes after the instruction
                question = f"{question}\n{item['input']}"
            yield Record(Task.T1T2, str(answer), question_text=str(question), source=f"{path}:{number}")


def _expand(paths, pattern: str) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for path in map(Path, paths):
        out.extend(sorted(path.glob(pattern)) if path.is_dir() else [path])
    return out


@dataclass(frozen=True)
class CachedFeatures:
    """Whisper features (F, D) kept on disk by a :class:`FeatureCache`, read only when a batch is built.

    Stands in for the tensor in a ``TrainingExample`` (``shape``, ``dim()``, ``load()``), so a
    large dataset's features never sit in memory all at once.
    """

    path: Path
    shape: tuple[int, int]

    def dim(self) -> int:
        return 2

    def load(self) -> torch.Tensor:
        try:
            data = np.load(self.path)
        except (OSError, ValueError, EOFError) as exc:
            raise MiniOmniError(f"cached Whisper features {self.path} cannot be read ({exc}); delete that file "
                                "and start again: it is computed anew") from exc
        if tuple(data.shape) != self.shape:
            raise MiniOmniError(f"cached Whisper features {self.path} have shape {tuple(data.shape)}, expected "
                                f"{self.shape}; the cache changed under a running job: delete the file and start again")
        return torch.from_numpy(data.astype(np.float32))


class FeatureCache:
    """Whisper features (F, D) of a 16 kHz waveform, computed by ``encode`` and cached on disk as float16 .npy.

    The key is a SHA-256 of the float32 samples and ``namespace`` (name the encoder there, so
    features of different checkpoints do not mix). Without ``directory`` nothing is stored.
    ``encode`` is e.g. ``MiniOmni.encode_audio`` (returns (1, F, D)) or any waveform -> (F, D).
    With ``lazy`` (and a directory) a call returns :class:`CachedFeatures` instead of the tensor.
    """

    def __init__(self, encode: Callable[[np.ndarray], torch.Tensor], directory: str | Path | None = None,
                 namespace: str = "", lazy: bool = False) -> None:
        self.encode = encode
        self.directory = None if directory is None else Path(directory)
        self.namespace = namespace
        self.lazy = lazy and self.directory is not None
        self.hits = 0
        self.misses = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def key(self, audio: np.ndarray) -> str:
        digest = hashlib.sha256(self.namespace.encode())
        digest.update(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def __call__(self, audio: np.ndarray) -> torch.Tensor | CachedFeatures:
        path = None if self.directory is None else self.directory / f"{self.key(audio)}.npy"
        if path is not None and path.exists():
            try:
                if self.lazy:  # reads the header only
                    cached = CachedFeatures(path, tuple(np.load(path, mmap_mode="r").shape))
                else:
                    cached = torch.from_numpy(np.load(path).astype(np.float32))
                self.hits += 1
                return cached
            except (OSError, ValueError, EOFError):
                path.unlink(missing_ok=True)  # a damaged entry (e.g. a disk filled up): compute it again
        self.misses += 1
        features = self.encode(audio)
        if features.dim() == 3:
            features = features[0]
        features = features.detach().float().cpu()
        if path is not None:
            # Ranks (on one machine or several sharing the folder) may write the same entry at once.
            partial = path.with_name(f"{path.stem}.{socket.gethostname()}.{os.getpid()}.tmp.npy")
            np.save(partial, features.numpy().astype(np.float16))
            partial.replace(path)
            if self.lazy:
                return CachedFeatures(path, tuple(features.shape))
            # Return what a later hit returns, so cached and fresh runs see the same numbers.
            features = features.half().float()
        return features
