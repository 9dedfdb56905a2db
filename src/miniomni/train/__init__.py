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
from .readers import (
    CachedFeatures,
    FeatureCache,
    Record,
    read_jsonl,
    read_librispeech,
    read_voiceassistant,
    stream_voiceassistant,
    voiceassistant_record,
)

__all__ = [
    "IGNORE",
    "Batch",
    "CachedFeatures",
    "FeatureCache",
    "Record",
    "TrainingExample",
    "answer_streams",
    "bucket_by_length",
    "build_example",
    "collate_batch",
    "collate_record",
    "padding_fraction",
    "read_jsonl",
    "read_librispeech",
    "read_voiceassistant",
    "stream_voiceassistant",
    "voiceassistant_record",
]
