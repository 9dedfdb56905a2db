"""Training: the layout of training examples, batching, Whisper feature caching; the loop is in :mod:`.trainer`.

The loss is :func:`.loss.loss`; ``docs/training.md`` describes the whole training layout.
"""

from .collate import (
    IGNORE,
    Batch,
    TrainingExample,
    answer_streams,
    bucket_by_length,
    build_example,
    collate_batch,
    collate_record,
    padding_fraction,
)
from .features import CachedFeatures, FeatureCache

__all__ = [
    "IGNORE",
    "Batch",
    "CachedFeatures",
    "FeatureCache",
    "TrainingExample",
    "answer_streams",
    "bucket_by_length",
    "build_example",
    "collate_batch",
    "collate_record",
    "padding_fraction",
]
