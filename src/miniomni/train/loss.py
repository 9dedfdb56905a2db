"""The training loss: one cross-entropy per stream (text, audio0 .. audio6), summed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.omni import OmniModel
from ..tokens import LAYER_SHIFTS, NUM_AUDIO_LAYERS, TEXT_STREAM
from .collate import IGNORE, Batch

# The names of the loss parts, in the order the logs and the validation sums keep them.
STREAMS = ["text"] + [f"audio{layer}" for layer in range(NUM_AUDIO_LAYERS)]


def loss(model: OmniModel, batch: Batch, return_parts: bool = False
         ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over the 8 streams of each stream's mean cross-entropy over its trained targets (one forward).

    Text logits cover the 152,000-wide text block; audio layer i's logits its 4,160-wide block,
    so audio targets are turned into local ids. Logits are computed only where a stream has a
    trained target. A stream with no trained target adds 0.
    With ``return_parts`` also returns {stream name: loss} (text, audio0 .. audio6).
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    features = batch.audio_features
    lengths = batch.audio_lengths if features is not None else None
    wanted = batch.targets != IGNORE
    logits = model(batch.input_ids, audio_features=features, audio_lengths=lengths, wanted=wanted)
    parts: dict[str, torch.Tensor] = {}
    parts["text"] = _stream_loss(logits[TEXT_STREAM], batch.targets[:, TEXT_STREAM][wanted[:, TEXT_STREAM]])
    for layer in range(NUM_AUDIO_LAYERS):
        targets = batch.targets[:, layer][wanted[:, layer]] - LAYER_SHIFTS[layer]
        parts[f"audio{layer}"] = _stream_loss(logits[layer], targets)
    total = sum(parts.values())
    return (total, parts) if return_parts else total


def _stream_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (n, vocab) logits against their n targets; 0 (in the graph) when n is 0."""
    if targets.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph (and the dtype/device) without a NaN
    return F.cross_entropy(logits.float(), targets)
