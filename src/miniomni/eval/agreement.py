"""Does the model answer a spoken question as it answers the same question written down?

For each question the model answers twice with greedy decoding: ``T1T2`` from the question's
text, ``A1T2`` from its audio. A model that hears the question as well as it reads it gives the
same answer both ways, so agreement measures hearing through the answer itself, with no answer
key. Agreement of one pair is the word F1 of the two normalized answers (the harmonic mean of the
shares of each answer's words found in the other, counted as multisets); a pair *agrees* when
F1 >= :data:`AGREE_F1` (at least about half of the words in common). Unrelated answers share
words too ("the", "is", the topic words of a template), so the report also gives the same score
for each spoken answer against the text answer of a *different* question (the next one, cyclic):
the chance level the threshold has to clear.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import WHISPER_SAMPLE_RATE
from ..errors import MiniOmniError
from .normalize import normalize_text
from .report import markdown_table, write_report

log = logging.getLogger(__name__)

__all__ = ["AGREE_F1", "evaluate_agreement", "word_f1", "write_agreement_report"]

AGREE_F1 = 0.5


def word_f1(reference: str, hypothesis: str) -> float:
    """Word F1 between two texts after :func:`normalize_text` (1.0 for two empty texts)."""
    ref, hyp = normalize_text(reference).split(), normalize_text(hypothesis).split()
    if not ref and not hyp:
        return 1.0
    common = sum((Counter(ref) & Counter(hyp)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def evaluate_agreement(omni: Any, data: str | Path, limit: int | None = None,
                       max_new_tokens: int | None = None) -> dict:
    """A1T2 answers to spoken questions against T1T2 answers to their text; ``data`` as ``data synth`` writes it."""
    from .asr import asr_records

    records = asr_records(data)  # question audio with the question text
    rows: list[dict] = []
    for record in records:
        if limit is not None and len(rows) >= limit:
            break
        started = time.perf_counter()
        spoken = omni.generate("A1T2", audio=record.question_audio, sample_rate=WHISPER_SAMPLE_RATE,
                               max_new_tokens=max_new_tokens).text
        heard_s = time.perf_counter() - started
        written = omni.generate("T1T2", text=record.answer_text, max_new_tokens=max_new_tokens).text
        rows.append({"id": record.source, "question": record.answer_text, "text_answer": written,
                     "spoken_answer": spoken, "f1": word_f1(written, spoken), "latency_s": heard_s})
        log.info("%s: F1 %.2f", record.source, rows[-1]["f1"])
    if not rows:
        raise MiniOmniError(f"no spoken questions read from {data}")
    for index, row in enumerate(rows):  # chance level: a spoken answer against another question's text answer
        other = rows[(index + 1) % len(rows)]
        row["f1_other_question"] = word_f1(other["text_answer"], row["spoken_answer"]) if len(rows) > 1 else None
    f1 = [r["f1"] for r in rows]
    chance = [r["f1_other_question"] for r in rows if r["f1_other_question"] is not None]
    summary = {
        "questions": len(rows),
        "agreement": float(np.mean([v >= AGREE_F1 for v in f1])),
        "mean_f1": float(np.mean(f1)),
        "exact": float(np.mean([normalize_text(r["text_answer"]) == normalize_text(r["spoken_answer"])
                                for r in rows])),
        "chance_agreement": float(np.mean([v >= AGREE_F1 for v in chance])) if chance else None,
        "chance_mean_f1": float(np.mean(chance)) if chance else None,
        "threshold_f1": AGREE_F1,
    }
    return {"task": "agreement", "data": str(data), "summary": summary, "rows": rows}


def write_agreement_report(report: dict, out: str | Path) -> dict[str, str]:
    """Write the JSON, Markdown and PNG reports of :func:`evaluate_agreement`; returns the paths written."""
    summary = report["summary"]
    table = markdown_table([
        ("questions", summary["questions"]),
        (f"agreement (word F1 >= {AGREE_F1})", summary["agreement"]),
        ("mean word F1", summary["mean_f1"]),
        ("identical answers", summary["exact"]),
        ("chance agreement (another question's text answer)", summary["chance_agreement"]),
        ("chance mean word F1", summary["chance_mean_f1"]),
    ])
    markdown = (f"# Spoken and written questions: do the answers agree?\n\nData: `{report['data']}`\n\n{table}")
    panels = [("word F1, same question", [r["f1"] for r in report["rows"]]),
              ("word F1, another question", [r["f1_other_question"] for r in report["rows"]])]
    return write_report(out, report, markdown, panels, "Agreement")
