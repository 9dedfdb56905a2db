"""Word error rate on normalized text, via jiwer: corpus-level (total edits / total reference words)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from ..errors import MiniOmniError
from .normalize import normalize_text

__all__ = ["WordErrors", "corpus_wer", "word_errors"]


@dataclass
class WordErrors:
    """Edit counts of one or many (reference, hypothesis) pairs."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0
    reference_words: int = 0
    hypothesis_words: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float | None:
        """Edits / reference words; None when there are no reference words (undefined)."""
        if self.reference_words == 0:
            return None
        return self.errors / self.reference_words

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def as_dict(self) -> dict:
        return {**asdict(self), "errors": self.errors, "wer": self.wer}


def _jiwer():
    try:
        import jiwer
    except ImportError as exc:
        raise MiniOmniError("evaluation needs jiwer: pip install jiwer (or the dev extra)") from exc
    return jiwer


def word_errors(reference: str, hypothesis: str,
                normalizer: Callable[[str], str] | None = normalize_text) -> WordErrors:
    """Align two texts (normalized first unless ``normalizer=None``) and count the edits."""
    if normalizer is not None:
        reference, hypothesis = normalizer(reference), normalizer(hypothesis)
    ref, hyp = reference.split(), hypothesis.split()
    if not ref or not hyp:  # jiwer refuses empty strings; the alignment is trivial anyway
        return WordErrors(deletions=len(ref), insertions=len(hyp), reference_words=len(ref),
                          hypothesis_words=len(hyp))
    out = _jiwer().process_words(" ".join(ref), " ".join(hyp))
    return WordErrors(out.substitutions, out.deletions, out.insertions, out.hits, len(ref), len(hyp))


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str],
               normalizer: Callable[[str], str] | None = normalize_text) -> WordErrors:
    """Summed edit counts over pairs; ``.wer`` is total edits / total reference words."""
    if len(references) != len(hypotheses):
        raise MiniOmniError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    total = WordErrors()
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        total = total + word_errors(reference, hypothesis, normalizer)
    return total
