"""Audio input/output and Whisper's log-mel front end.

Everything here works on float32 waveforms in [-1, 1]. Input audio is brought to
16 kHz mono (what Whisper hears); generated speech is written at 24 kHz (what the
SNAC codec produces).
"""

from __future__ import annotations

import io
import logging
import math
import os
from functools import cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr
import torch

from miniomni.errors import AudioError

logger = logging.getLogger(__name__)

WHISPER_SAMPLE_RATE = 16000
OUTPUT_SAMPLE_RATE = 24000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * WHISPER_SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000
MIN_SAMPLE_RATE = 1000  # below this a "recording" is not speech, and resampling it would multiply its size
MAX_SAMPLE_RATE = 384000
MAX_CHANNELS = 8
MAX_WHISPER_FRAMES = N_FRAMES // 2  # 1500 encoder positions
ENCODER_CONTEXTS = ("30", "10", "5", "audio")  # how much audio the Whisper encoder attends over (encoder_mel_frames)

_SUPPORTED_FORMATS = "WAV, FLAC, OGG/Vorbis, OGG/Opus and MP3"

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | torch.Tensor

__all__ = [
    "WHISPER_SAMPLE_RATE",
    "OUTPUT_SAMPLE_RATE",
    "N_FFT",
    "HOP_LENGTH",
    "N_MELS",
    "CHUNK_SECONDS",
    "N_SAMPLES",
    "N_FRAMES",
    "load_audio",
    "trim_to_30s",
    "whisper_frame_count",
    "ENCODER_CONTEXTS",
    "encoder_mel_frames",
    "mel_filters",
    "log_mel_spectrogram",
    "write_wav",
    "float_to_pcm16",
]


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _check_sample_rate(sample_rate: object, what: str) -> int:
    """Return ``sample_rate`` as an int or raise AudioError when it is nonsense."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise AudioError(
            f"{what}: sample rate {sample_rate!r} is not a number; pass the rate in Hz, e.g. sample_rate=16000."
        )
    if not math.isfinite(float(sample_rate)) or float(sample_rate) != int(sample_rate):
        raise AudioError(f"{what}: sample rate {sample_rate!r} is not a whole number of Hz.")
    rate = int(sample_rate)
    if rate < MIN_SAMPLE_RATE or rate > MAX_SAMPLE_RATE:
        raise AudioError(
            f"{what}: sample rate {rate} Hz is not usable (must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} "
            "Hz); check the file header or the sample_rate you passed."
        )
    return rate


class AudioTooLong(AudioError):
    """The audio lasts longer than the caller accepts."""


def _check_length(frames: int, rate: int, what: str, max_seconds: float | None) -> None:
    """Refuse audio over ``max_seconds`` from its header, before any decoding or resampling."""
    if max_seconds is not None and frames > 0 and frames / rate > max_seconds:
        raise AudioTooLong(f"{what} is {frames / rate:.1f} s long; at most {max_seconds:g} s is accepted")


def _read_with_soundfile(data: str | BinaryIO, what: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode an audio file with soundfile into a (frames, channels) float32 array, its header checked first."""
    try:
        with sf.SoundFile(data) as handle:
            rate = _check_sample_rate(handle.samplerate, what)
            _check_length(handle.frames, rate, what, max_seconds)
            if handle.channels > MAX_CHANNELS:
                raise AudioError(f"{what} has {handle.channels} channels; at most {MAX_CHANNELS} are accepted.")
            samples = handle.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, sf.SoundFileError, RuntimeError, TypeError, ValueError, EOFError) as exc:
        raise AudioError(
            f"{what}: the audio format could not be read ({exc}). "
            f"The file may be corrupt or in an unsupported container; {_SUPPORTED_FORMATS} work "
            "(convert others, e.g. `ffmpeg -i input.m4a output.wav`)."
        ) from exc
    return samples, rate


def _array_to_2d(source: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """Convert an array/tensor input to a (frames, channels) float32 numpy array."""
    if isinstance(source, torch.Tensor):
        tensor = source.detach().cpu()
        if tensor.is_complex():
            raise AudioError(f"{what}: complex audio tensors are not supported; pass real samples.")
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        array = tensor.numpy()
    else:
        array = np.asarray(source)
    if np.issubdtype(array.dtype, np.integer):
        # Integer PCM: scale to [-1, 1) by the type's full range.
        info = np.iinfo(array.dtype)
        if info.min < 0:
            array = array.astype(np.float64) / float(-info.min)
        else:  # unsigned PCM (e.g. 8-bit WAV) is centred at (max+1)/2
            half = (float(info.max) + 1.0) / 2.0
            array = (array.astype(np.float64) - half) / half
    elif np.issubdtype(array.dtype, np.bool_) or not np.issubdtype(array.dtype, np.floating):
        raise AudioError(f"{what}: samples of dtype {array.dtype} are not audio; pass float or int PCM samples.")
    array = array.astype(np.float32, copy=False)

    if array.ndim == 1:
        return array[:, None]
    if array.ndim == 2:
        rows, cols = array.shape
        if min(rows, cols) > MAX_CHANNELS:
            raise AudioError(
                f"{what}: array of shape {tuple(array.shape)} does not look like audio; expected (n,), "
                f"(n, channels) or (channels, n) with at most {MAX_CHANNELS} channels."
            )
        # The small axis is the channel axis; on a tie use soundfile's (n, channels) layout.
        return array.T if rows < cols else array
    raise AudioError(
        f"{what}: array with {array.ndim} dimensions is not audio; expected (n,), (n, channels) or (channels, n)."
    )


def load_audio(source: AudioSource, sample_rate: int | None = None, max_seconds: float | None = None) -> np.ndarray:
    """Load audio as a 16 kHz mono float32 1-D numpy array.

    ``source`` is a path, the raw bytes of an audio file, or a numpy array / torch
    tensor of samples (then ``sample_rate`` is required). For files the rate in the
    file header is used and ``sample_rate`` is ignored. Raises AudioError when the
    input is missing, unreadable, empty or not finite, and :class:`AudioTooLong` when it
    lasts over ``max_seconds`` (checked from the header, before any decoding).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        what = f"audio file '{path}'"
        if not path.exists():
            raise AudioError(f"{what} does not exist; check the path (relative paths are from {os.getcwd()}).")
        if path.is_dir():
            raise AudioError(f"{what} is a directory; pass the path of an audio file.")
        if path.stat().st_size == 0:
            raise AudioError(f"{what} is empty (0 bytes); record or send some audio.")
        if sample_rate is not None:
            logger.debug("load_audio: ignoring sample_rate=%s for %s (the file header is used)", sample_rate, path)
        samples, rate = _read_with_soundfile(str(path), what, max_seconds)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        what = "audio bytes"
        if len(source) == 0:
            raise AudioError("audio bytes are empty (0 bytes); send the contents of an audio file.")
        samples, rate = _read_with_soundfile(io.BytesIO(bytes(source)), what, max_seconds)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        what = "audio array"
        if sample_rate is None:
            raise AudioError(
                f"{what}: sample_rate is required when passing samples, e.g. load_audio(x, sample_rate=16000)."
            )
        rate = _check_sample_rate(sample_rate, what)
        samples = _array_to_2d(source, what)
        _check_length(samples.shape[0], rate, what, max_seconds)
    else:
        raise AudioError(
            f"cannot load audio from a {type(source).__name__}; pass a path, file bytes, or a numpy array/torch "
            "tensor together with sample_rate."
        )

    rate = _check_sample_rate(rate, what)
    _check_length(samples.shape[0], rate, what, max_seconds)  # headers can understate (MP3)
    if samples.size == 0 or samples.shape[0] == 0:
        raise AudioError(f"{what} is empty (0 samples); record or send some audio.")
    finite = np.isfinite(samples)
    if not finite.all():
        if np.isnan(samples).all():
            raise AudioError(f"{what} is empty (every sample is NaN); record or send real audio.")
        bad = int((~finite).sum())
        raise AudioError(
            f"{what} has {bad} non-finite samples (NaN or Inf) out of {samples.size}; "
            "fix the source or replace them, e.g. np.nan_to_num(x)."
        )

    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != WHISPER_SAMPLE_RATE:
        mono = soxr.resample(mono, rate, WHISPER_SAMPLE_RATE, quality="HQ")
    out = np.ascontiguousarray(mono, dtype=np.float32)
    if out.size == 0:
        raise AudioError(f"{what} is too short: nothing is left after resampling {rate} Hz to 16 kHz.")
    logger.debug("loaded %s: %d samples at %d Hz -> %d samples at 16 kHz", what, samples.shape[0], rate, out.size)
    return out


def trim_to_30s(audio: np.ndarray | torch.Tensor) -> tuple[np.ndarray | torch.Tensor, bool]:
    """Cut 16 kHz audio longer than 30 s (Whisper's window) and say whether it was cut."""
    n = int(audio.shape[-1])
    if n <= N_SAMPLES:
        return audio, False
    logger.warning(
        "input audio is %.2f s long; only the first %d s are used (the rest was cut)",
        n / WHISPER_SAMPLE_RATE,
        CHUNK_SECONDS,
    )
    return audio[..., :N_SAMPLES], True


def whisper_frame_count(num_samples_16k: int) -> int:
    """Number of Whisper encoder frames Mini-Omni keeps for audio of this many 16 kHz samples.

    Same arithmetic as Mini-Omni: ``int(duration_ms / 20) + 1``, capped at 1500.
    """
    n = int(num_samples_16k)
    if n < 0:
        raise ValueError(f"num_samples_16k must be >= 0, got {n}")
    duration_ms = (n / WHISPER_SAMPLE_RATE) * 1000
    return min(int(duration_ms / 20) + 1, MAX_WHISPER_FRAMES)


def encoder_mel_frames(num_samples_16k: int, context: str) -> int:
    """How many mel frames (of the 30 s-padded log-mel) the Whisper encoder reads for audio of this many samples.

    ``context`` is one of :data:`ENCODER_CONTEXTS`: ``"30"`` reads all 3000 frames (Whisper's
    30 s window, as the reference does); ``"10"`` and ``"5"`` read the frames the kept positions
    need (``2 * whisper_frame_count``) rounded up to a whole number of 10 s (1000 frames) or 5 s
    (500 frames) steps, at least one step and at most 3000; ``"audio"`` reads exactly the frames
    the kept positions need. The encoder gives one position for every two frames.
    """
    needed = 2 * whisper_frame_count(num_samples_16k)
    if context == "30":
        return N_FRAMES
    if context == "audio":
        return needed
    if context in ("10", "5"):
        step = int(context) * WHISPER_SAMPLE_RATE // HOP_LENGTH
        return min(-(-needed // step) * step, N_FRAMES)
    raise ValueError(f"encoder context {context!r} is not one of {', '.join(ENCODER_CONTEXTS)}")


# ---------------------------------------------------------------------------
# Log-mel spectrogram
# ---------------------------------------------------------------------------

# Slaney mel scale: linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    mels = freq / _F_SP
    high = freq >= _MIN_LOG_HZ
    mels = np.where(high, _MIN_LOG_MEL + np.log(np.maximum(freq, 1e-300) / _MIN_LOG_HZ) / _LOG_STEP, mels)
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freqs = _F_SP * mels
    high = mels >= _MIN_LOG_MEL
    return np.where(high, _MIN_LOG_HZ * np.exp(_LOG_STEP * (mels - _MIN_LOG_MEL)), freqs)


def _mel_filters_numpy(n_mels: int, sample_rate: int, n_fft: int) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filterbank, float32, shape (n_mels, n_fft//2+1).

    Geometry is computed in float64; the triangles are rounded to float32 before the
    float64 normalisation is applied, which is the rounding order librosa uses, so the
    result equals librosa's (and Whisper's bundled mel_filters.npz) bit for bit.
    """
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_min = _hz_to_mel_slaney(np.array(0.0))
    mel_max = _hz_to_mel_slaney(np.array(sample_rate / 2.0))
    # n_mels + 2 band edges evenly spaced on the mel scale, back in Hz.
    edges_hz = _mel_to_hz_slaney(np.linspace(mel_min, mel_max, n_mels + 2))
    widths = np.diff(edges_hz)
    # offsets[i, k] = edge_i - f_k
    offsets = edges_hz[:, None] - fft_freqs[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    # Slaney normalisation: each triangle has unit area in Hz.
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights


def mel_filters(n_mels: int = N_MELS, sample_rate: int = WHISPER_SAMPLE_RATE, n_fft: int = N_FFT) -> torch.Tensor:
    """Mel filterbank as librosa.filters.mel(sr, n_fft, n_mels) computes by default, float32 (n_mels, n_fft//2+1)."""
    if n_mels <= 0 or n_fft <= 0 or sample_rate <= 0:
        raise ValueError(
            f"mel_filters needs positive sizes, got n_mels={n_mels}, sample_rate={sample_rate}, n_fft={n_fft}"
        )
    return torch.from_numpy(_mel_filters_numpy(n_mels, sample_rate, n_fft))


@cache
def _cached_filters(device: str, n_mels: int) -> torch.Tensor:
    return mel_filters(n_mels).to(device)


@cache
def _cached_window(device: str) -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True).to(device)


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    padding_to_30s: bool = True,
    device: str | torch.device | None = None,
    n_mels: int = N_MELS,
) -> torch.Tensor:
    """Whisper's log-mel spectrogram of 16 kHz audio: float32 (n_mels, 3000).

    Same as openai-whisper's ``log_mel_spectrogram(pad_or_trim(audio))``. With
    ``padding_to_30s=False`` the waveform is used as is and the result has
    ``len(audio) // 160`` frames. A (B, n) batch gives (B, n_mels, frames), each
    item normalised on its own maximum.
    """
    if isinstance(audio, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    elif isinstance(audio, torch.Tensor):
        x = audio.detach()
    else:
        raise AudioError(f"log_mel_spectrogram needs a numpy array or torch tensor, got {type(audio).__name__}.")
    if x.ndim not in (1, 2):
        raise AudioError(f"log_mel_spectrogram needs 1-D audio or a (B, n) batch, got shape {tuple(x.shape)}.")
    if device is not None:
        x = x.to(device)
    x = x.to(torch.float32)

    if padding_to_30s:
        n = x.shape[-1]
        if n > N_SAMPLES:
            x = x[..., :N_SAMPLES]
        elif n < N_SAMPLES:
            x = torch.nn.functional.pad(x, (0, N_SAMPLES - n))
    elif x.shape[-1] < N_FFT // 2 + 1:
        raise AudioError(
            f"audio of {x.shape[-1]} samples is too short for a spectrogram without padding; "
            "use padding_to_30s=True."
        )

    dev = str(x.device)
    window = _cached_window(dev)
    filters = _cached_filters(dev, n_mels)
    spec = torch.stft(x, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec[..., :-1].abs() ** 2
    mel = filters @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def log_mel_numpy(audio: np.ndarray, n_mels: int = N_MELS) -> np.ndarray:
    """:func:`log_mel_spectrogram` of 16 kHz audio without padding to 30 s, in NumPy: float32 (n_mels, frames).

    For threads other than the one that computes the model: PyTorch's operations start an
    OpenMP thread team on each thread that calls them, and a second team on a machine with
    few cores makes every later operation of the first one slower. Computed in float64
    (as the reference feature extractors do), so it matches the PyTorch version to float32
    rounding.
    """
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    if x.size < N_FFT // 2 + 1:
        raise AudioError(f"audio of {x.size} samples is too short for a spectrogram without padding")
    x = np.pad(x, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP_LENGTH]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)[:-1]) ** 2  # (frames, N_FFT // 2 + 1), last one dropped
    mel = _mel_filters_numpy(n_mels, WHISPER_SAMPLE_RATE, N_FFT).astype(np.float64) @ power.T
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _to_mono_float(audio: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().float().numpy()
    array = np.asarray(audio)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise AudioError(f"expected 1-D (mono) audio to write, got shape {tuple(array.shape)}.")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise AudioError("audio to write contains NaN or Inf samples; the generator produced invalid output.")
    return array


def float_to_pcm16(audio: np.ndarray | torch.Tensor) -> bytes:
    """Float samples in [-1, 1] to little-endian 16-bit PCM bytes (clip, then round(x*32767))."""
    array = np.clip(_to_mono_float(audio), -1.0, 1.0)
    return np.round(array * 32767.0).astype("<i2").tobytes()


def write_wav(
    path_or_file: str | os.PathLike | BinaryIO,
    audio: np.ndarray | torch.Tensor,
    sample_rate: int = OUTPUT_SAMPLE_RATE,
) -> None:
    """Write mono float audio as a 16-bit PCM WAV file (samples clipped to [-1, 1])."""
    rate = _check_sample_rate(sample_rate, "write_wav")
    pcm = np.frombuffer(float_to_pcm16(audio), dtype="<i2")
    target = str(path_or_file) if isinstance(path_or_file, (str, os.PathLike)) else path_or_file
    sf.write(target, pcm, rate, subtype="PCM_16", format="WAV")
