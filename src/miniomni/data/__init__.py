"""Synthetic spoken QA data in the VoiceAssistant-400K layout (``miniomni data synth | inspect``)."""

from .schema import schema
from .synth import SynthOptions, read_pairs, synthesize
from .tts import BACKENDS, EspeakBackend, PiperBackend, TTSBackend, get_backend

__all__ = [
    "BACKENDS",
    "EspeakBackend",
    "PiperBackend",
    "SynthOptions",
    "TTSBackend",
    "get_backend",
    "read_pairs",
    "schema",
    "synthesize",
]
