"""Training (issue 5), first part: the training layout, batching, the loss and data readers."""

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
