"""ASR evaluation (the model's ``asr`` task on LibriSpeech-layout or spoken-question data); the ASR judge."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..audio import WHISPER_SAMPLE_RATE
from ..errors import MiniOmniError
from .normalize import normalize_text
from .report import markdown_table, write_report
from .wer import WordErrors, word_errors

log = logging.getLogger(__name__)

__all__ = ["Judge", "OmniAsrJudge", "evaluate_asr", "make_judge", "write_asr_report"]


class Judge(Protocol):
    """Anything that turns a waveform into text."""

    name: str

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str: ...


class OmniAsrJudge:
    """Transcribes with a miniomni model's ``asr`` task (audio is resampled to 16 kHz on the way in)."""

    def __init__(self, omni: Any, name: str = "self", max_new_tokens: int | None = None) -> None:
        self.omni = omni
        self.name = name
        self.max_new_tokens = max_new_tokens

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.size == 0:
            return ""
        result = self.omni.generate("asr", audio=audio, sample_rate=sample_rate, max_new_tokens=self.max_new_tokens)
        return result.text


def make_judge(spec: str, omni: Any, max_new_tokens: int | None = None, device: str = "auto",
               dtype: str = "float32") -> Judge:
    """``self`` (the evaluated model's own asr task) or ``omni:CHECKPOINT`` (another miniomni checkpoint's asr task)."""
    if spec in ("", "self"):
        return OmniAsrJudge(omni, "self", max_new_tokens)
    kind, _, path = spec.partition(":")
    if kind == "omni" and path:
        from ..pipeline import load

        return OmniAsrJudge(load(path, device=device, dtype=dtype), spec, max_new_tokens)
    raise MiniOmniError(f"--judge {spec!r} is not understood; use self or omni:CHECKPOINT "
                        "(another miniomni checkpoint's asr task)")


def asr_records(data: str | Path) -> Iterator:
    """Utterances with their transcripts: a LibriSpeech-layout folder, or spoken questions (the
    VoiceAssistant layout ``data synth`` writes: a parquet file, a folder of them, or the folder
    holding ``data/``) with the question text as the transcript."""
    from ..data.librispeech import read_librispeech
    from ..data.voiceassistant import read_voiceassistant

    path = Path(data)
    if not path.exists():
        raise MiniOmniError(f"evaluation data {path} not found")
    if path.suffix == ".parquet" or any(path.glob("*.parquet")) or any(path.glob("data/*.parquet")):
        return read_voiceassistant(path, task="ASR")
    return read_librispeech(path)


def evaluate_asr(omni: Any, data: str | Path, limit: int | None = None, max_new_tokens: int | None = None) -> dict:
    """WER of the ``asr`` task on :func:`asr_records`; per-utterance rows and the corpus total."""
    rows: list[dict] = []
    total = WordErrors()
    for record in asr_records(data):
        if limit is not None and len(rows) >= limit:
            break
        started = time.perf_counter()
        result = omni.generate("asr", audio=record.question_audio, sample_rate=WHISPER_SAMPLE_RATE,
                               max_new_tokens=max_new_tokens)
        seconds = time.perf_counter() - started
        errors = word_errors(record.answer_text, result.text)
        total = total + errors
        rows.append({
            "id": Path(record.source).stem if record.source.endswith(".flac") else record.source,
            "audio": record.source,
            "reference": record.answer_text, "hypothesis": result.text,
            "reference_normalized": normalize_text(record.answer_text),
            "hypothesis_normalized": normalize_text(result.text),
            **errors.as_dict(), "audio_seconds": len(record.question_audio) / WHISPER_SAMPLE_RATE, "latency_s": seconds,
        })
        log.info("%s: WER %s", rows[-1]["id"], errors.wer)
    if not rows:
        raise MiniOmniError(f"no utterances evaluated from {data}")
    return {"task": "asr", "data": str(data), "utterances": len(rows), "summary": total.as_dict(), "rows": rows}


def write_asr_report(report: dict, out: str | Path) -> dict[str, str]:
    """Write the JSON, Markdown and PNG reports of :func:`evaluate_asr`; returns the paths written."""
    summary = report["summary"]
    rows = report["rows"]
    table = markdown_table([
        ("utterances", report["utterances"]),
        ("reference words", summary["reference_words"]),
        ("substitutions", summary["substitutions"]),
        ("deletions", summary["deletions"]),
        ("insertions", summary["insertions"]),
        ("WER (%)", None if summary["wer"] is None else 100 * summary["wer"]),
        ("median latency (s)", float(np.median([r["latency_s"] for r in rows]))),
    ])
    markdown = f"# ASR evaluation\n\nData: `{report['data']}` (normalized text, corpus WER)\n\n{table}"
    panels = [("per-utterance WER", [r["wer"] for r in rows]),
              ("hypothesis length (words)", [r["hypothesis_words"] for r in rows]),
              ("latency (s)", [r["latency_s"] for r in rows])]
    return write_report(out, report, markdown, panels, "ASR")
