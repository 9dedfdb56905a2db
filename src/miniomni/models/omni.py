"""The Mini-Omni language model: audio adapter, 8-stream mean embedding, text and audio heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import OmniConfig
from ..cooperative import Steps, run
from ..tokens import NUM_AUDIO_LAYERS, NUM_STREAMS
from .llm import KVCache, KVSegments, SwiGLU, Transformer, linear_rows


class OmniModel(nn.Module):
    """Backbone plus the Whisper-to-LLM adapter.

    Input: (B, 8, T) absolute token ids, streams 0..6 audio layers, stream 7 text.
    Output: text logits (B, T, text_vocab_size) and audio logits (B, T, 7, audio_vocab_size).
    """

    def __init__(self, config: OmniConfig) -> None:
        super().__init__()
        self.config = config
        self.llm = Transformer(config)
        self.adapter = SwiGLU(config.whisper_adapter_dim, config.intermediate_size, config.n_embd, bias=False)

    def embed_streams(
        self,
        streams: torch.Tensor,
        audio_features: torch.Tensor | None = None,
        audio_lengths: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Mean of the 8 stream embeddings; adapted Whisper frames replace positions 1..T of the audio streams.

        ``audio_features`` is (B, F, whisper_dim); row b injects its first ``audio_lengths[b]``
        frames (``0`` injects nothing, as for text-input rows of a mixed batch).
        """
        if streams.dim() != 3 or streams.shape[1] != NUM_STREAMS:
            raise ValueError(f"expected (B, 8, T) stream ids, got shape {tuple(streams.shape)}")
        embeddings = self.llm.embed(streams)  # (B, 8, T, C)
        if audio_features is not None:
            adapted = self.adapter(audio_features.to(embeddings.dtype))
            lengths = audio_lengths if audio_lengths is not None else [adapted.shape[1]] * adapted.shape[0]
            for row, count in enumerate(lengths):
                if count:
                    embeddings[row, :NUM_AUDIO_LAYERS, 1 : count + 1] = adapted[row, :count]
        # Summed in stream order, then divided: the reference's arithmetic, bit for bit.
        total = embeddings[:, 0]
        for stream in range(1, NUM_STREAMS):
            total = total + embeddings[:, stream]
        if audio_features is not None and not any(lengths):
            # Nothing injected, but the adapter stays in the graph with a zero gradient (the trainer
            # needs that when other ranks' batches use it); adding 0 leaves the values unchanged.
            total = total + adapted.sum() * 0
        return total / NUM_STREAMS

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split the full-vocabulary head into text logits and 7 audio-layer logits."""
        return self.text_logits(hidden), self.audio_logits(hidden)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Text logits only (reads only the text rows of the head)."""
        return linear_rows(self.llm.lm_head, hidden, 0, self.config.text_vocab_size)

    def audio_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, 7, audio_vocab_size) audio logits only (reads only the audio rows of the head)."""
        start = self.config.text_vocab_size
        logits = linear_rows(self.llm.lm_head, hidden, start, self.config.padded_vocab_size)
        return logits.unflatten(-1, (NUM_AUDIO_LAYERS, self.config.audio_vocab_size))

    def hidden_states(
        self,
        streams: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        audio_features: torch.Tensor | None = None,
        audio_lengths: Sequence[int] | None = None,
        kv_len: int | KVSegments | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C), before the heads."""
        return run(self.hidden_states_steps(streams, positions, cache, audio_features, audio_lengths, kv_len))

    def hidden_states_steps(
        self,
        streams: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        audio_features: torch.Tensor | None = None,
        audio_lengths: Sequence[int] | None = None,
        kv_len: int | KVSegments | None = None,
    ) -> Steps[torch.Tensor]:
        """:meth:`hidden_states` one block at a time (see :mod:`miniomni.cooperative`)."""
        x = self.embed_streams(streams, audio_features, audio_lengths)
        return (yield from self.llm.forward_hidden_steps(x, positions, cache, kv_len))

    def forward(
        self,
        streams: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        audio_features: torch.Tensor | None = None,
        audio_lengths: Sequence[int] | None = None,
        kv_len: int | KVSegments | None = None,
        last_only: bool = False,
        at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for every position, only the last one with ``last_only``, or only where ``at`` is set.

        ``at`` is a (B, T) bool mask; the logits are then (N, V) and (N, 7, A) for its N set
        positions in row-major order (training reads the heads only where a target is).
        """
        if at is not None and (last_only or at.dtype != torch.bool or at.shape != streams.shape[::2]):
            raise ValueError(f"at must be a (B, T) = {tuple(streams.shape[::2])} bool mask without last_only; got "
                             f"{at.dtype} {tuple(at.shape)}{' with last_only' if last_only else ''}")
        hidden = self.hidden_states(streams, positions, cache, audio_features, audio_lengths, kv_len)
        if last_only:
            hidden = hidden[:, -1:]
        elif at is not None:
            hidden = hidden[at]
        return self.heads(hidden)

    def new_cache(self, batch_size: int, max_length: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        return self.llm.new_cache(batch_size, max_length, dtype=dtype)
