"""The record every training data reader yields: one (question, answer) pair before tokenization."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..tokens import Task


@dataclass
class Record:
    """One training pair before tokenization (``train.collate.collate_record`` turns it into an example)."""

    task: Task
    answer_text: str
    question_audio: np.ndarray | None = None  # 16 kHz mono float32
    question_text: str | None = None
    answer_layers: torch.Tensor | None = None  # (7, N) SNAC frames of a speech answer
    source: str = ""
