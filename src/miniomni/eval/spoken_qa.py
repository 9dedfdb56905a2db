"""Spoken question answering: accuracy of the text answer and of the spoken answer (via an ASR judge).

An answer counts as correct when any normalized accepted answer appears inside the normalized output
(substring match on the normalized strings, so "paris" matches "the capital is paris").
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MiniOmniError
from .asr import Judge
from .normalize import normalize_text
from .report import markdown_table, write_report

log = logging.getLogger(__name__)

__all__ = [
    "ANSWER_TASKS",
    "Answer",
    "answer_question",
    "evaluate_spoken_qa",
    "is_correct",
    "read_questions",
    "write_spoken_qa_report",
]

ANSWER_TASKS = ("A1A2-batch", "A1A2", "A1T2")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


@dataclass
class Answer:
    text: str
    audio: np.ndarray | None  # 24 kHz, None for A1T2
    sample_rate: int
    latency_s: float


def answer_question(omni: Any, audio: Any, task: str = "A1A2-batch", max_new_tokens: int | None = None) -> Answer:
    """One spoken question -> text answer (+ spoken answer for A1A2 / A1A2-batch) and its latency."""
    if task not in ANSWER_TASKS:
        raise MiniOmniError(f"task {task!r} cannot answer a spoken question here; use one of {', '.join(ANSWER_TASKS)}")
    started = time.perf_counter()
    result = omni.generate(task, audio=audio, max_new_tokens=max_new_tokens)
    return Answer(result.text, result.audio, result.sample_rate, time.perf_counter() - started)


def is_correct(output: str, accepted: list[str]) -> bool:
    """True if a normalized accepted answer is a substring of the normalized output (empty ones never match)."""
    haystack = f" {normalize_text(output)} "
    for answer in accepted:
        needle = normalize_text(answer)
        if needle and needle in haystack:
            return True
    return False


def read_questions(data: str | Path, need_answers: bool) -> list[dict]:
    """JSONL rows ``{"audio": path, "answers": [...]}`` (paths relative to the file), or a folder of audio."""
    data = Path(data)
    if data.is_dir():
        if need_answers:
            raise MiniOmniError(f"{data} is a folder; spoken QA needs a JSONL file with answers")
        files = sorted(p for p in data.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise MiniOmniError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {data}")
        return [{"id": p.stem, "audio": str(p)} for p in files]
    if not data.exists():
        raise MiniOmniError(f"{data} does not exist")
    rows = []
    for number, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MiniOmniError(f"{data}:{number}: not JSON ({exc})") from exc
        if not isinstance(item, dict) or "audio" not in item:
            raise MiniOmniError(f"{data}:{number}: expected an object with an \"audio\" path")
        audio = Path(item["audio"])
        if not audio.is_absolute():
            audio = data.parent / audio
        if not audio.exists():
            raise MiniOmniError(f"{data}:{number}: {audio} is missing")
        answers = item.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        if need_answers and not answers:
            raise MiniOmniError(f"{data}:{number}: expected \"answers\": [accepted strings]")
        rows.append({**item, "id": str(item.get("id", number)), "audio": str(audio), "answers": answers or []})
    if not rows:
        raise MiniOmniError(f"{data} holds no rows")
    return rows


def evaluate_spoken_qa(omni: Any, data: str | Path, judge: Judge | None, task: str = "A1A2-batch",
                       limit: int | None = None, max_new_tokens: int | None = None) -> dict:
    """Accuracy of the text answer and (for speech-output tasks, with a judge) of the transcribed spoken answer."""
    questions = read_questions(data, need_answers=True)[:limit]
    rows = []
    for question in questions:
        answer = answer_question(omni, question["audio"], task, max_new_tokens)
        row = {"id": question["id"], "audio": question["audio"], "answers": question["answers"],
               "text_answer": answer.text, "text_correct": is_correct(answer.text, question["answers"]),
               "text_words": len(normalize_text(answer.text).split()), "latency_s": answer.latency_s}
        if answer.audio is not None and judge is not None:
            transcript = judge.transcribe(answer.audio, answer.sample_rate)
            row.update(speech_transcript=transcript, speech_correct=is_correct(transcript, question["answers"]),
                       speech_words=len(normalize_text(transcript).split()),
                       speech_seconds=len(answer.audio) / answer.sample_rate)
        rows.append(row)
        log.info("%s: text %s, speech %s", row["id"], row["text_correct"], row.get("speech_correct"))
    scored = [r for r in rows if "speech_correct" in r]
    summary = {
        "questions": len(rows),
        "text_accuracy": sum(r["text_correct"] for r in rows) / len(rows),
        "speech_accuracy": sum(r["speech_correct"] for r in scored) / len(scored) if scored else None,
        "speech_scored": len(scored),
    }
    return {"task": task, "data": str(data), "judge": None if judge is None else judge.name,
            "match": "normalized accepted answer is a substring of the normalized output",
            "summary": summary, "rows": rows}


def write_spoken_qa_report(report: dict, out: str | Path) -> dict[str, str]:
    """Write the JSON, Markdown and PNG reports of :func:`evaluate_spoken_qa`; returns the paths written."""
    summary, rows = report["summary"], report["rows"]

    def pct(v: float | None) -> float | None:
        return None if v is None else 100 * v

    table = markdown_table([
        ("questions", summary["questions"]),
        ("text accuracy (%)", pct(summary["text_accuracy"])),
        ("speech accuracy (%)", pct(summary["speech_accuracy"])),
        ("speech answers judged", summary["speech_scored"]),
        ("median latency (s)", float(np.median([r["latency_s"] for r in rows]))),
    ])
    markdown = (f"# Spoken QA evaluation\n\nData: `{report['data']}`, task {report['task']}, judge "
                f"{report['judge']}; correct = {report['match']}.\n\n{table}")
    panels = [("text answer length (words)", [r["text_words"] for r in rows]),
              ("spoken answer length (words)", [r["speech_words"] for r in rows if "speech_words" in r]),
              ("latency (s)", [r["latency_s"] for r in rows])]
    return write_report(out, report, markdown, panels, "Spoken QA")
