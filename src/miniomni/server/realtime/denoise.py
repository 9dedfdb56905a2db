"""Noise reduction of a session's input audio: RNNoise, the recurrent denoiser from Xiph.Org, at 48 kHz.

A session asks for it with ``noise_reduction`` ``{"type": "near_field"}`` or ``"far_field"``;
RNNoise has one model, which serves both. It runs on the input before the VAD and the model
hear it, as the Realtime API describes its own noise reduction. The 24 kHz input is resampled
to RNNoise's 48 kHz and back with streaming resamplers, 10 ms at a time.

The library comes with the ``pyrnnoise`` package, installed without its declared dependencies
(an FFmpeg binding and matplotlib, which only its own command line needs):
``pip install --no-deps pyrnnoise``. It is loaded by path; the package itself is not imported.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import platform
from pathlib import Path

import numpy as np

RNNOISE_RATE = 48000
INPUT_RATE = 24000
INSTALL_HINT = "pip install --no-deps pyrnnoise"
NOISE_REDUCTION = ("near_field", "far_field")  # the Realtime API's types; RNNoise's one model serves both
# Zeros fed after the last input when a stream ends, so that the frame and the resamplers give back
# the delayed end of the speech (the output trails the input by 20 ms, measured).
TAIL_FRAMES = 2
# What a chunk's output may exceed its input by: the samples held from earlier chunks (bytes at 24 kHz).
MAX_RELEASE_BYTES = INPUT_RATE * 2 // 20  # 50 ms
_LIBRARY_NAMES = {"Linux": "librnnoise.so", "Darwin": "librnnoise.dylib", "Windows": "rnnoise.dll"}


class DenoiserUnavailable(RuntimeError):
    """RNNoise's library is not installed (or does not load); the message says how to install it."""


class NoiseReductionError(ValueError):
    """A ``noise_reduction`` setting that cannot be used; the message says why and what to send."""


def parse_noise_reduction(value: object, param: str) -> str | None:
    """``{"type": "near_field"}`` or ``{"type": "far_field"}`` (both run RNNoise), or null.

    Refused when RNNoise is not installed."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in NOISE_REDUCTION:
        raise NoiseReductionError(f'{param} must be {{"type": "near_field"}}, {{"type": "far_field"}} or null; '
                                  f"got {value!r}")
    if not available():
        raise NoiseReductionError(f"{param}: noise reduction runs RNNoise, which this server does not have (its "
                                  f"operator can add it: {INSTALL_HINT}); send null to have the audio heard as "
                                  "it arrives")
    return kind


def library_path() -> Path | None:
    """Where the installed ``pyrnnoise`` package keeps RNNoise's library, or None."""
    spec = importlib.util.find_spec("pyrnnoise")
    name = _LIBRARY_NAMES.get(platform.system())
    if spec is None or not spec.submodule_search_locations or name is None:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _library() -> ctypes.CDLL:
    path = library_path()
    if path is None:
        raise DenoiserUnavailable(f"noise reduction runs RNNoise, which is not installed here: {INSTALL_HINT}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise DenoiserUnavailable(f"RNNoise's library {path} does not load ({exc}); reinstall it: "
                                  f"{INSTALL_HINT}") from None
    lib.rnnoise_create.argtypes = [ctypes.c_void_p]
    lib.rnnoise_create.restype = ctypes.c_void_p
    lib.rnnoise_destroy.argtypes = [ctypes.c_void_p]
    lib.rnnoise_get_frame_size.restype = ctypes.c_int
    floats = ctypes.POINTER(ctypes.c_float)
    lib.rnnoise_process_frame.argtypes = [ctypes.c_void_p, floats, floats]
    lib.rnnoise_process_frame.restype = ctypes.c_float
    return lib


def available() -> bool:
    """Whether RNNoise is installed and loads."""
    try:
        _library()
    except DenoiserUnavailable:
        return False
    return True


class Denoiser:
    """One stream's noise reduction: 24 kHz 16-bit PCM in, the same out, chunk after chunk.

    The output trails the input by RNNoise's frame and the resamplers' delay (tens of
    milliseconds, measured in ``benchmarks/denoise.py``); :meth:`flush` gives back what is held
    and ends the stream. It runs where it is called (a session's input: the event loop, 3.4 %
    of a core per stream).
    """

    def __init__(self) -> None:
        import soxr

        self._lib = _library()
        self._frame = int(self._lib.rnnoise_get_frame_size())
        self._state: int | None = self._lib.rnnoise_create(None)
        self._up = soxr.ResampleStream(INPUT_RATE, RNNOISE_RATE, 1, dtype="float32")
        self._down = soxr.ResampleStream(RNNOISE_RATE, INPUT_RATE, 1, dtype="float32")
        self._held = np.zeros(0, dtype=np.float32)  # 48 kHz samples short of a whole frame

    def process(self, pcm: bytes) -> bytes:
        """Denoise a chunk of 16-bit little-endian PCM at 24 kHz; returns what is ready (possibly empty)."""
        if self._state is None:
            raise RuntimeError("this denoiser's stream has ended (flush or close): start a new one")
        samples = np.frombuffer(bytes(pcm), dtype="<i2").astype(np.float32)
        return self._run(self._up.resample_chunk(samples), last=False)

    def flush(self) -> bytes:
        """Everything still held, the delayed end of the speech included (so the whole output is up to
        30 ms longer than the input); the denoiser is then spent."""
        tail = self._up.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        length = len(self._held) + len(tail)
        zeros = np.zeros(-length % self._frame + TAIL_FRAMES * self._frame, dtype=np.float32)
        out = self._run(np.concatenate([tail, zeros]), last=True)
        self.close()
        return out

    def _run(self, upsampled: np.ndarray, last: bool) -> bytes:
        held = np.concatenate([self._held, upsampled.astype(np.float32, copy=False)])
        whole = len(held) - len(held) % self._frame
        frames = np.ascontiguousarray(held[:whole])  # RNNoise reads and writes 16-bit-scaled floats
        self._held = held[whole:].copy()
        pointer = ctypes.POINTER(ctypes.c_float)
        for start in range(0, whole, self._frame):
            view = frames[start:start + self._frame]
            address = view.ctypes.data_as(pointer)
            self._lib.rnnoise_process_frame(self._state, address, address)
        down = self._down.resample_chunk(frames, last=last)
        return np.clip(np.rint(down), -32768, 32767).astype("<i2").tobytes()

    def close(self) -> None:
        """Free RNNoise's state (also done when the object goes)."""
        if getattr(self, "_state", None) is not None:
            self._lib.rnnoise_destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()
