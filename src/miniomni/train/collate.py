"""Training examples in the exact layout inference feeds (prompts and decoding rules: ``docs/decoding.md``).

One example is an (8, T) id matrix (streams 0..6 audio layers, stream 7 text, absolute
ids) plus targets: the model at position p predicts the token fed at p + 1. The layout
(see docs/training.md for a worked example):

* positions 0 .. P-1: the task's prompt (:func:`tokens.audio_prompt` /
  :func:`tokens.text_prompt`);
* positions P .. P+L-1: the answer, one column per sampled step, exactly as
  :class:`generate.AnswerState` would feed it if it sampled these tokens
  (column P+j holds step j; the last step, the stop token, is included so that it is
  a target, although inference never feeds it back).

Speech answers (A1A2, T1A2) with text ids t1..tn and SNAC frames (7, N): L = max(n+1, N+8);
text = t1..tn, ``_eot``, ``_pad_t`` …; audio layer i = i+1 ``_pad_a`` (the delay), its N
codes, ``_eoa``, ``_pad_a`` … (:func:`tokens.delay`). Text answers (A1T2, ASR, T1T2):
L = n+1; text = t1..tn, ``_eot``; every audio stream ``_pad_a``.

Targets (-100 = ignored): only positions P-1 .. P+L-2 carry targets.
Text: t1..tn and ``_eot`` always; ``_pad_t`` after ``_eot`` never (inference does not even
sample it). Audio: only in speech-output tasks; codes and ``_eoa`` always; the delay pads
before the codes and the ``_pad_a`` after ``_eoa`` are padding by construction and masked
unless ``mask_audio_padding=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..tokens import (
    EOT,
    NUM_AUDIO_LAYERS,
    NUM_STREAMS,
    PAD_A,
    PAD_T,
    Task,
    audio_prompt,
    delay,
    layer_shifts,
    padding_ids,
    text_prompt,
)
from .features import CachedFeatures

IGNORE = -100


@dataclass
class TrainingExample:
    """One sequence: (8, T) int32 input ids and targets (-100 ignored), Whisper features of audio-input tasks."""

    task: Task
    input_ids: torch.Tensor
    targets: torch.Tensor
    audio_features: torch.Tensor | CachedFeatures | None = None  # CachedFeatures: read when batched
    audio_length: int = 0
    prompt_length: int = 0

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def answer_length(self) -> int:
        return self.length - self.prompt_length


@dataclass
class Batch:
    """Padded examples: (B, 8, T) ids and targets, (B, Fmax, D) features (or None) and per-row frame counts."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    audio_features: torch.Tensor | None
    audio_lengths: list[int]
    tasks: list[Task]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device``."""
        feats = None if self.audio_features is None else self.audio_features.to(device)
        return Batch(self.input_ids.to(device), self.targets.to(device), feats, self.audio_lengths, self.tasks)


def _shift_rows(local: torch.Tensor) -> torch.Tensor:
    """(7, L) local audio ids -> absolute ids."""
    return local + layer_shifts().view(NUM_AUDIO_LAYERS, 1)


def answer_streams(task: Task, answer_ids: Sequence[int], answer_layers: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled steps of an answer: (8, L) absolute ids and an (8, L) bool mask of the trained ones.

    Column j is step j (the token sampled from position P-1+j), as described in the module doc.
    The mask here is the strict one (audio padding masked); see :func:`build_example`.
    """
    task = Task.A1A2 if task == Task.A1A2_BATCH else task
    answer_ids = [int(t) for t in answer_ids]
    n = len(answer_ids)
    if task.audio_output:
        if answer_layers is None:
            raise ValueError(f"task {task.value} has a speech answer; give its SNAC frames (7, N)")
        layers = torch.as_tensor(answer_layers, dtype=torch.long)
        if layers.dim() != 2 or layers.shape[0] != NUM_AUDIO_LAYERS:
            raise ValueError(f"expected (7, N) answer frames, got shape {tuple(layers.shape)}")
        frames = layers.shape[1]
        length = max(n + 1, frames + NUM_AUDIO_LAYERS + 1)
        audio_local = torch.full((NUM_AUDIO_LAYERS, length), PAD_A, dtype=torch.long)
        audio_local[:, : frames + NUM_AUDIO_LAYERS + 1] = delay(layers)
        audio_mask = torch.zeros(NUM_AUDIO_LAYERS, length, dtype=torch.bool)
        for layer in range(NUM_AUDIO_LAYERS):
            audio_mask[layer, layer + 1 : layer + 2 + frames] = True  # codes and _eoa
    else:
        if n == 0:
            raise ValueError(f"task {task.value} needs a non-empty answer text")
        if answer_layers is not None:
            raise ValueError(f"task {task.value} answers in text; it takes no answer frames")
        length = n + 1
        audio_local = torch.full((NUM_AUDIO_LAYERS, length), PAD_A, dtype=torch.long)
        audio_mask = torch.zeros(NUM_AUDIO_LAYERS, length, dtype=torch.bool)
    text = torch.full((1, length), PAD_T, dtype=torch.long)
    text[0, :n] = torch.tensor(answer_ids, dtype=torch.long)
    text[0, n] = EOT
    text_mask = torch.zeros(1, length, dtype=torch.bool)
    text_mask[0, : n + 1] = True
    return torch.cat([_shift_rows(audio_local), text]), torch.cat([audio_mask, text_mask])


def build_example(
    task: Task | str,
    answer_ids: Sequence[int],
    answer_layers: torch.Tensor | None = None,
    question_ids: Sequence[int] | None = None,
    audio_features: torch.Tensor | None = None,
    mask_audio_padding: bool = True,
) -> TrainingExample:
    """Prompt + answer in the inference layout. Audio-input tasks take ``audio_features`` (F, D) or (1, F, D)."""
    task = Task.parse(task)
    if task == Task.A1A2_BATCH:
        task = Task.A1A2  # the batch approach is an inference trick; its row 0 is trained as A1A2
    if task.audio_input:
        if audio_features is None:
            raise ValueError(f"task {task.value} takes audio input; give its Whisper features")
        if audio_features.dim() == 3:
            audio_features = audio_features[0]
        frames = int(audio_features.shape[0])
        prompt = audio_prompt(frames, task)
    else:
        if not question_ids:
            raise ValueError(f"task {task.value} takes text input; give the question's token ids")
        frames = 0
        audio_features = None
        prompt = text_prompt([int(t) for t in question_ids], task)
    answer, trained = answer_streams(task, answer_ids, answer_layers)
    if not mask_audio_padding and task.audio_output:
        trained[:NUM_AUDIO_LAYERS] = True
    input_ids = torch.cat([prompt, answer], dim=1)
    prompt_length, length = prompt.shape[1], answer.shape[1]
    targets = torch.full_like(input_ids, IGNORE)
    # Position P-1+j predicts step j, the token at P+j.
    targets[:, prompt_length - 1 : prompt_length - 1 + length] = torch.where(trained, answer, IGNORE)
    # int32 halves what a large dataset holds in memory; collate_batch widens to int64.
    return TrainingExample(task, input_ids.to(torch.int32), targets.to(torch.int32), audio_features, frames,
                           prompt_length)


def _encode(tokenizer, text: str) -> list[int]:
    if callable(tokenizer) and not hasattr(tokenizer, "encode"):
        return list(tokenizer(text))
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(encoded, "ids", encoded))


def collate_record(
    record,
    tokenizer,
    features: Callable[[np.ndarray], torch.Tensor] | None = None,
    mask_audio_padding: bool = True,
) -> TrainingExample:
    """A :class:`data.record.Record` -> TrainingExample.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (or a callable text -> ids); ``features`` maps a
    16 kHz waveform to (F, D) Whisper features (e.g. a :class:`features.FeatureCache`).
    """
    task = Task.parse(record.task)
    audio_features = None
    question_ids = None
    if task.audio_input:
        if features is None:
            raise ValueError(f"task {task.value} takes audio input; give a feature function")
        audio_features = features(record.question_audio)
    else:
        question_ids = _encode(tokenizer, record.question_text)
    answer_ids = _encode(tokenizer, record.answer_text)
    return build_example(task, answer_ids, record.answer_layers if task.audio_output else None, question_ids,
                         audio_features, mask_audio_padding)


def collate_batch(examples: Sequence[TrainingExample], pad_to: int | None = None) -> Batch:
    """Right-pad to the longest example (or ``pad_to``): inputs with layershifted pads, targets with -100."""
    if not examples:
        raise ValueError("collate_batch needs at least one example")
    length = max(e.length for e in examples)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({length})")
        length = pad_to
    rows = len(examples)
    input_ids = padding_ids().view(1, NUM_STREAMS, 1).repeat(rows, 1, length)
    targets = torch.full((rows, NUM_STREAMS, length), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, :, : example.length] = example.input_ids
        targets[row, :, : example.length] = example.targets
    with_audio = [e for e in examples if e.audio_features is not None]
    audio_features = None
    if with_audio:
        frames = max(e.audio_features.shape[0] for e in with_audio)
        dim = with_audio[0].audio_features.shape[-1]
        audio_features = torch.zeros(rows, frames, dim)
        for row, example in enumerate(examples):
            features = example.audio_features
            if isinstance(features, CachedFeatures):
                features = features.load()
            if features is not None:
                audio_features[row, : features.shape[0]] = features
    lengths = [e.audio_length if e.audio_features is not None else 0 for e in examples]
    return Batch(input_ids, targets, audio_features, lengths, [e.task for e in examples])


def bucket_by_length(examples: Iterable[TrainingExample], max_tokens: int, max_batch_size: int | None = None
                     ) -> list[list[TrainingExample]]:
    """Group examples of similar length into batches of at most ``max_tokens`` padded positions.

    Sorted by length, then filled greedily: a batch holds rows while ``rows x longest <= max_tokens``.
    An example longer than the budget gets a batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[TrainingExample]] = []
    current: list[TrainingExample] = []
    for example in sorted(examples, key=lambda e: e.length):
        longest = max(example.length, current[-1].length if current else 0)
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and ((len(current) + 1) * longest > max_tokens or full):
            batches.append(current)
            current = []
        current.append(example)
    if current:
        batches.append(current)
    return batches


def padding_fraction(batches: Sequence[Sequence[TrainingExample]]) -> float:
    """The share of padded positions over all batches (each padded to its longest example)."""
    padded = sum(len(b) * max(e.length for e in b) for b in batches if b)
    real = sum(e.length for b in batches for e in b)
    return 0.0 if padded == 0 else 1.0 - real / padded
