"""The audio formats a Realtime session speaks: 16-bit PCM at 24 kHz, and G.711 at 8 kHz (``audio/pcmu``,
μ-law; ``audio/pcma``, A-law), the formats of telephone bridges.

The model hears and speaks 24 kHz; G.711 audio is converted on the way in and out, with one
streaming resampler per direction so that chunk edges leave no clicks. The G.711 companding is
ITU-T G.711's, written here with NumPy.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...audio import float_to_pcm16

PROTOCOL_SAMPLE_RATE = 24000
TELEPHONE_RATE = 8000


class FormatError(ValueError):
    """An audio format or a chunk of audio that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class AudioFormat:
    """One format: its GA type, sample rate and beta name."""

    type: str
    rate: int
    beta: str

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.type == "audio/pcm" else 1

    def shape(self) -> dict[str, Any]:
        """As the GA protocol writes it in a session object."""
        return {"type": self.type, "rate": self.rate} if self.type == "audio/pcm" else {"type": self.type}


PCM = AudioFormat("audio/pcm", PROTOCOL_SAMPLE_RATE, "pcm16")
PCMU = AudioFormat("audio/pcmu", TELEPHONE_RATE, "g711_ulaw")
PCMA = AudioFormat("audio/pcma", TELEPHONE_RATE, "g711_alaw")
FORMATS = (PCM, PCMU, PCMA)


def parse_format(value: Any, param: str) -> AudioFormat:
    """GA ``{"type": "audio/pcm", "rate": 24000}``, ``{"type": "audio/pcmu"}``, ``{"type": "audio/pcma"}``,
    or beta ``"pcm16"``, ``"g711_ulaw"``, ``"g711_alaw"``."""
    for known in FORMATS:
        if value == known.beta:
            return known
        if isinstance(value, dict) and value.get("type") == known.type:
            rate = value.get("rate", known.rate)
            if rate not in (None, known.rate):
                raise FormatError(f"{param}: {known.type} is at {known.rate} Hz here, not {rate!r}")
            return known
    names = ", ".join(f"{f.shape()}" for f in FORMATS)
    raise FormatError(f"{param}: supported formats are {names} (beta: \"pcm16\", \"g711_ulaw\", \"g711_alaw\"); "
                      f"got {value!r}")


# ---------------------------------------------------------------------- G.711 companding

_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # of the 14-bit magnitude
_ULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def ulaw_encode(samples: np.ndarray) -> np.ndarray:
    """16-bit linear samples -> μ-law bytes (uint8)."""
    x = samples.astype(np.int32) >> 2  # 14 bits
    mask = np.where(x < 0, 0x7F, 0xFF)
    x = np.minimum(np.abs(x), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    segment = np.searchsorted(_ULAW_SEGMENT_ENDS, x)
    value = (np.minimum(segment, 7) << 4) | ((x >> (np.minimum(segment, 7) + 1)) & 0x0F)
    value = np.where(segment >= 8, 0x7F, value)
    return ((value ^ mask) & 0xFF).astype(np.uint8)


def ulaw_decode(data: np.ndarray) -> np.ndarray:
    """μ-law bytes -> 16-bit linear samples (int16)."""
    u = ~data.astype(np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = (((u & 0x0F) << 3) + _ULAW_BIAS) << exponent
    return np.where(u & 0x80, _ULAW_BIAS - magnitude, magnitude - _ULAW_BIAS).astype(np.int16)


def alaw_encode(samples: np.ndarray) -> np.ndarray:
    """16-bit linear samples -> A-law bytes (uint8)."""
    x = samples.astype(np.int32) >> 3  # 13 bits
    mask = np.where(x >= 0, 0xD5, 0x55)
    x = np.where(x >= 0, x, -x - 1)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, x)
    shift = np.where(segment < 2, 1, segment)
    value = (np.minimum(segment, 7) << 4) | ((x >> shift) & 0x0F)
    value = np.where(segment >= 8, 0x7F, value)
    return ((value ^ mask) & 0xFF).astype(np.uint8)


def alaw_decode(data: np.ndarray) -> np.ndarray:
    """A-law bytes -> 16-bit linear samples (int16)."""
    a = data.astype(np.int32) ^ 0x55
    segment = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(segment == 0, t + 8, t + 0x108)
    t = np.where(segment > 1, t << np.maximum(segment - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


# ---------------------------------------------------------------------- the two directions


def pcm16_to_float(pcm: bytes | bytearray) -> np.ndarray:
    """16-bit little-endian PCM -> float32 in [-1, 1)."""
    return np.frombuffer(bytes(pcm), dtype="<i2").astype(np.float32) / 32768.0


def decode_audio(data: Any, param: str, fmt: AudioFormat = PCM) -> bytes:
    """A base64 field of audio in ``fmt`` -> its bytes (not yet converted)."""
    if not isinstance(data, str):
        raise FormatError(f"{param} must be a base64 string of {fmt.beta} audio")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{param} is not valid base64") from None
    if len(raw) % fmt.bytes_per_sample:
        raise FormatError(f"{param} holds {len(raw)} bytes: 16-bit PCM needs an even number")
    return raw


class InputConverter:
    """A session's incoming audio in its input format -> 16-bit PCM at 24 kHz, chunk after chunk."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self._stream = None
        if fmt.rate != PROTOCOL_SAMPLE_RATE:
            import soxr

            self._stream = soxr.ResampleStream(fmt.rate, PROTOCOL_SAMPLE_RATE, 1, dtype="float32")

    def to_pcm16(self, raw: bytes) -> bytes:
        if self._stream is None:
            return raw
        codes = np.frombuffer(raw, dtype=np.uint8)
        linear = ulaw_decode(codes) if self.format == PCMU else alaw_decode(codes)
        return float_to_pcm16(self._stream.resample_chunk(linear.astype(np.float32) / 32768.0))


class OutputConverter:
    """One answer's 24 kHz float32 audio -> bytes in the session's output format, chunk after chunk."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self._stream = None
        if fmt.rate != PROTOCOL_SAMPLE_RATE:
            import soxr

            self._stream = soxr.ResampleStream(PROTOCOL_SAMPLE_RATE, fmt.rate, 1, dtype="float32")

    def encode(self, audio: np.ndarray, last: bool = False) -> bytes:
        """The bytes for ``audio``; with ``last`` also what the resampler still holds (the answer's end)."""
        if self._stream is not None:
            audio = self._stream.resample_chunk(np.asarray(audio, dtype=np.float32).reshape(-1), last=last)
        pcm = float_to_pcm16(audio)  # the server's one rounding of float audio
        if self.format == PCM:
            return pcm
        linear = np.frombuffer(pcm, dtype="<i2")
        return (ulaw_encode(linear) if self.format == PCMU else alaw_encode(linear)).tobytes()
