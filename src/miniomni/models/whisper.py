"""Whisper's audio encoder (only the encoder), built from openai-whisper checkpoint tensors.

Parameter names match the ``encoder.*`` entries of an openai-whisper checkpoint's
``model_state_dict`` (with the prefix removed), so those tensors load strictly;
``checkpoints.load_whisper_encoder`` reads such a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cooperative import Steps, run
from ..errors import CheckpointError

__all__ = [
    "WhisperDims",
    "WhisperEncoder",
    "sinusoids",
    "encoder_state_dict_from_whisper",
]

_ENCODER_PREFIX = "encoder."
_AUDIO_FIELDS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")


@dataclass
class WhisperDims:
    """Whisper model dimensions, named as in openai-whisper's ModelDimensions (text side unused here)."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int | None = None
    n_text_ctx: int | None = None
    n_text_state: int | None = None
    n_text_head: int | None = None
    n_text_layer: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WhisperDims:
        """Build from a dict, ignoring unknown keys; CheckpointError when an audio field is missing or invalid."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"Whisper 'dims' must be a dict of dimensions, got {type(d).__name__}.")
        missing = [k for k in _AUDIO_FIELDS if k not in d]
        if missing:
            raise CheckpointError(
                f"Whisper 'dims' lacks {', '.join(missing)}; the checkpoint is not an openai-whisper model file."
            )
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in d.items():
            if key not in known:
                continue
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    try:
                        if int(value) != value:
                            raise ValueError
                        value = int(value)
                    except (TypeError, ValueError):
                        raise CheckpointError(f"Whisper dims field {key}={value!r} is not an integer.") from None
            values[key] = value
        dims = cls(**values)
        dims.validate()
        return dims

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields."""
        return asdict(self)

    def validate(self) -> None:
        """Raise CheckpointError when the audio dimensions cannot describe an encoder."""
        for key in _AUDIO_FIELDS:
            if getattr(self, key) <= 0:
                raise CheckpointError(f"Whisper dims field {key}={getattr(self, key)} must be positive.")
        if self.n_audio_state % self.n_audio_head:
            raise CheckpointError(
                f"Whisper dims: n_audio_state={self.n_audio_state} is not divisible by "
                f"n_audio_head={self.n_audio_head}."
            )
        if self.n_audio_state % 2 or self.n_audio_state < 4:
            raise CheckpointError(f"Whisper dims: n_audio_state={self.n_audio_state} must be even and >= 4.")


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's sinusoidal position table, float32 (length, channels): [sin | cos]."""
    if channels % 2:
        raise ValueError(f"sinusoids needs an even channel count, got {channels}")
    half = channels // 2
    increment = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-increment * torch.arange(half))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type(x.dtype)


class _Linear(nn.Linear):
    """Linear that runs in the input's dtype (weights cast on the fly)."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class _Conv1d(nn.Conv1d):
    """Conv1d that runs in the input's dtype (weights cast on the fly)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class _SelfAttention(nn.Module):
    """Non-causal multi-head self-attention; the key projection has no bias (as in Whisper)."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = _Linear(n_state, n_state)
        self.key = _Linear(n_state, n_state, bias=False)
        self.value = _Linear(n_state, n_state)
        self.out = _Linear(n_state, n_state)

    def forward(self, x: Tensor) -> Tensor:
        batch, ctx, state = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, ctx, self.n_head, state // self.n_head).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # Default scale 1/sqrt(d_head) equals Whisper's d_head**-0.25 applied to q and k.
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.out(attn.transpose(1, 2).reshape(batch, ctx, state))


class _EncoderBlock(nn.Module):
    """Pre-norm residual block: self-attention then a 4x GELU MLP."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = _SelfAttention(n_state, n_head)
        self.attn_ln = _LayerNorm(n_state)
        self.mlp = nn.Sequential(_Linear(n_state, 4 * n_state), nn.GELU(), _Linear(4 * n_state, n_state))
        self.mlp_ln = _LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder: log-mel (B, n_mels, 2*n_audio_ctx) -> features (B, n_audio_ctx, n_audio_state)."""

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        dims.validate()
        self.dims = dims
        d = dims.n_audio_state
        self.conv1 = _Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = _Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, d))
        self.blocks = nn.ModuleList(_EncoderBlock(d, dims.n_audio_head) for _ in range(dims.n_audio_layer))
        self.ln_post = _LayerNorm(d)

    @property
    def n_state(self) -> int:
        """Width of the output features."""
        return self.dims.n_audio_state

    def forward(self, mel: Tensor, allow_short: bool = False) -> Tensor:
        """Encode a log-mel batch (B, n_mels, 2*n_audio_ctx) into (B, n_audio_ctx, n_audio_state).

        ``allow_short`` accepts fewer frames (the opt-in fast path: attention sees only the
        real audio instead of 30 s with padding, which changes the features slightly).
        """
        return run(self.forward_steps(mel, allow_short))

    def forward_steps(self, mel: Tensor, allow_short: bool = False) -> Steps[Tensor]:
        """:meth:`forward` one block at a time (see :mod:`miniomni.cooperative`)."""
        dims = self.dims
        if mel.ndim != 3:
            raise ValueError(
                f"WhisperEncoder expects a (batch, {dims.n_mels}, {2 * dims.n_audio_ctx}) log-mel tensor, got shape "
                f"{tuple(mel.shape)}; add a batch dimension with mel.unsqueeze(0)."
            )
        if mel.shape[1] != dims.n_mels:
            raise ValueError(
                f"WhisperEncoder expects {dims.n_mels} mel bins, got {mel.shape[1]} (shape {tuple(mel.shape)})."
            )
        frames = mel.shape[2]
        positions = (frames + 1) // 2
        if positions != dims.n_audio_ctx and not (allow_short and 0 < positions < dims.n_audio_ctx):
            raise ValueError(
                f"WhisperEncoder needs {2 * dims.n_audio_ctx} mel frames (30 s padded) to produce {dims.n_audio_ctx} "
                f"positions, got {frames}; compute the spectrogram with "
                "log_mel_spectrogram(audio, padding_to_30s=True)."
            )
        if not torch.is_autocast_enabled(mel.device.type) and mel.is_floating_point():
            mel = mel.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x))
        x = x.transpose(1, 2)
        x = (x + self.positional_embedding[:positions]).to(x.dtype)
        yield
        for block in self.blocks:
            x = block(x)
            yield
        return self.ln_post(x)

    @classmethod
    def from_state_dict(
        cls,
        dims: WhisperDims,
        state_dict: Mapping[str, Tensor],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str = "state dict",
    ) -> WhisperEncoder:
        """Build an encoder from encoder tensors (keys with or without the 'encoder.' prefix); strict.

        Tensors already on ``device`` in ``dtype`` are used without a copy, so the
        encoder may share memory with ``state_dict``.
        """
        if any(k.startswith(_ENCODER_PREFIX) for k in state_dict):
            state_dict = {k[len(_ENCODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_ENCODER_PREFIX)}
        with torch.device("meta"):
            model = cls(dims)
        expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        problems: list[str] = []
        if missing:
            problems.append(f"missing {len(missing)} encoder tensors (e.g. {', '.join(missing[:4])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected encoder tensors (e.g. {', '.join(unexpected[:4])})")
        not_tensors = [k for k in expected if k in state_dict and not isinstance(state_dict[k], Tensor)]
        if not_tensors:
            problems.append(f"entries that are not tensors: {', '.join(not_tensors[:4])}")
        wrong = [
            f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state_dict and isinstance(state_dict[k], Tensor) and state_dict[k].shape != v.shape
        ]
        if wrong:
            problems.append(
                f"{len(wrong)} tensors with the wrong shape for dims {dims.to_dict()} (e.g. {'; '.join(wrong[:3])})"
            )
        if problems:
            raise CheckpointError(
                f"Whisper encoder weights in {source} do not fit: {'; '.join(problems)}. "
                "The file is not a matching openai-whisper checkpoint; re-download it with `miniomni download DIR`."
            )
        model.load_state_dict({k: state_dict[k] for k in expected}, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval()


def encoder_state_dict_from_whisper(
    ckpt: Mapping[str, Any], source: str = "checkpoint"
) -> tuple[WhisperDims, dict[str, Tensor]]:
    """Split an openai-whisper checkpoint dict into its dims and its encoder tensors (prefix removed)."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not an openai-whisper checkpoint dict.")
    missing = [k for k in ("dims", "model_state_dict") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{source} lacks the key(s) {', '.join(repr(k) for k in missing)} (found: "
            f"{', '.join(repr(k) for k in list(ckpt)[:8]) or 'nothing'}); it is not an openai-whisper checkpoint such "
            "as small.pt. Re-download it with `miniomni download DIR`."
        )
    dims = WhisperDims.from_dict(ckpt["dims"])
    state = ckpt["model_state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: 'model_state_dict' is a {type(state).__name__}, not a dict of tensors.")
    encoder = {k[len(_ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(_ENCODER_PREFIX)}
    if not encoder:
        raise CheckpointError(
            f"{source} has no 'encoder.*' tensors in 'model_state_dict'; re-download it with `miniomni download DIR`."
        )
    return dims, encoder
