"""miniomni: Mini-Omni in plain PyTorch.

>>> import miniomni
>>> omni = miniomni.load("checkpoint")              # or a .safetensors bundle, or "gpt-omni/mini-omni"
>>> result = omni.generate(audio="question.wav")    # A1A2-batch: speech in, speech out
>>> result.text, result.audio                       # answer text, 24 kHz float32 waveform
"""

from .errors import AudioError, CheckpointError, ConfigError, MiniOmniError
from .generate import SamplingOptions
from .pipeline import GenerationResult, MiniOmni, load
from .streaming import AudioChunk, Done, TextDelta, Timings
from .tokens import Task

__version__ = "0.1.0"

__all__ = [
    "AudioChunk",
    "AudioError",
    "CheckpointError",
    "ConfigError",
    "Done",
    "GenerationResult",
    "MiniOmni",
    "MiniOmniError",
    "SamplingOptions",
    "Task",
    "TextDelta",
    "Timings",
    "load",
]
