"""JSONL files of text (question, answer) pairs, read as T1T2 records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import MiniOmniError
from ..tokens import Task
from .record import Record


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
