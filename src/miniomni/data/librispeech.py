"""The LibriSpeech folder layout, read as ASR records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..audio import load_audio, trim_to_30s
from ..errors import MiniOmniError
from ..tokens import Task
from .record import Record


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
