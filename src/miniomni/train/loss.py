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
    so audio targets are turned into local ids. A stream with no trained target adds 0. The
    heads run only at positions where some stream has a target (an ASR or A1T2 example's audio
    prompt has none), which leaves the loss as it is and skips most of the text head's work.
    With ``return_parts`` also returns {stream name: loss} (text, audio0 .. audio6).
    """
    device = model.llm.embed.weight.device
    batch = batch.to(device)
    features = batch.audio_features
    lengths = batch.audio_lengths if features is not None else None
    at = (batch.targets != IGNORE).any(dim=1)  # (B, T): positions where some stream has a target
    text_logits, audio_logits = model(batch.input_ids, audio_features=features, audio_lengths=lengths, at=at)
    parts: dict[str, torch.Tensor] = {}
    parts["text"] = _stream_loss(text_logits, batch.targets[:, TEXT_STREAM][at])
    for layer in range(NUM_AUDIO_LAYERS):
        targets = batch.targets[:, layer][at]
        local = torch.where(targets == IGNORE, IGNORE, targets - LAYER_SHIFTS[layer])
        parts[f"audio{layer}"] = _stream_loss(audio_logits[:, layer], local)
    total = sum(parts.values())
    return (total, parts) if return_parts else total


def _stream_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not bool((targets != IGNORE).any()):
        return logits.sum() * 0.0  # keeps the graph (and the dtype/device) without a NaN
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
