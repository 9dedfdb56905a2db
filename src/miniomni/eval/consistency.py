"""Text/speech consistency: WER between the text answer and the transcription of the spoken answer.

Also the ratio of spoken words to text words, which exposes the "speech shorter than text" failure
(the spoken answer stops before the text answer does).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MiniOmniError
from .asr import Judge
from .report import markdown_table, write_report
from .spoken_qa import answer_question, read_questions
from .wer import WordErrors, word_errors

log = logging.getLogger(__name__)

__all__ = ["evaluate_consistency", "write_consistency_report"]


def evaluate_consistency(omni: Any, data: str | Path, judge: Judge, task: str = "A1A2-batch",
                         limit: int | None = None, max_new_tokens: int | None = None) -> dict:
    """Per row: text answer (reference) vs transcribed spoken answer (hypothesis), WER and length ratio."""
    if task == "A1T2":
        raise MiniOmniError("consistency needs a spoken answer; use task A1A2-batch or A1A2")
    questions = read_questions(data, need_answers=False)[:limit]
    rows = []
    total = WordErrors()
    for question in questions:
        answer = answer_question(omni, question["audio"], task, max_new_tokens)
        transcript = judge.transcribe(answer.audio, answer.sample_rate)
        errors = word_errors(answer.text, transcript)
        total = total + errors
        rows.append({
            "id": question["id"], "audio": question["audio"], "text_answer": answer.text,
            "speech_transcript": transcript, **errors.as_dict(),
            "text_words": errors.reference_words, "speech_words": errors.hypothesis_words,
            "length_ratio": errors.hypothesis_words / errors.reference_words if errors.reference_words else None,
            "speech_seconds": len(answer.audio) / answer.sample_rate, "latency_s": answer.latency_s,
        })
        log.info("%s: WER %s, spoken/text words %s", rows[-1]["id"], errors.wer, rows[-1]["length_ratio"])
    ratios = [r["length_ratio"] for r in rows if r["length_ratio"] is not None]
    summary = {
        **total.as_dict(), "rows": len(rows),
        "length_ratio": total.hypothesis_words / total.reference_words if total.reference_words else None,
        "median_length_ratio": float(np.median(ratios)) if ratios else None,
        "speech_shorter_rows": sum(r < 1 for r in ratios),
    }
    return {"task": task, "data": str(data), "judge": judge.name, "summary": summary, "rows": rows}


def write_consistency_report(report: dict, out: str | Path) -> dict[str, str]:
    summary, rows = report["summary"], report["rows"]
    table = markdown_table([
        ("rows", summary["rows"]),
        ("text words", summary["reference_words"]),
        ("spoken words (transcribed)", summary["hypothesis_words"]),
        ("WER text vs speech (%)", None if summary["wer"] is None else 100 * summary["wer"]),
        ("spoken / text words", summary["length_ratio"]),
        ("rows with speech shorter than text", summary["speech_shorter_rows"]),
    ])
    markdown = (f"# Text/speech consistency\n\nData: `{report['data']}`, task {report['task']}, judge "
                f"{report['judge']} (reference = text answer, hypothesis = transcribed spoken answer).\n\n{table}")
    panels = [("per-row WER", [r["wer"] for r in rows]),
              ("spoken / text words", [r["length_ratio"] for r in rows]),
              ("latency (s)", [r["latency_s"] for r in rows])]
    return write_report(out, report, markdown, panels, "Consistency")
