"""Evaluation: Whisper-style normalization, WER, ASR / spoken-QA / consistency runs and their reports."""

from .normalize import normalize_text
from .wer import WordErrors, corpus_wer, word_errors

__all__ = ["WordErrors", "corpus_wer", "normalize_text", "word_errors"]
