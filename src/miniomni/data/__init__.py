"""Training data formats (one module each) and the ``miniomni data synth | inspect`` tools.

Every reader yields :class:`Record` s: :mod:`.voiceassistant` (VoiceAssistant-400K parquet, also
written by ``data synth``), :mod:`.librispeech` (ASR) and :mod:`.jsonl` (text pairs).
"""

from .jsonl import read_jsonl
from .librispeech import read_librispeech
from .record import Record
from .synth import SynthOptions, read_pairs, synthesize
from .tts import BACKENDS, EspeakBackend, PiperBackend, TTSBackend, get_backend
from .voiceassistant import read_voiceassistant, schema, stream_voiceassistant, voiceassistant_record

__all__ = [
    "BACKENDS",
    "EspeakBackend",
    "PiperBackend",
    "Record",
    "SynthOptions",
    "TTSBackend",
    "get_backend",
    "read_jsonl",
    "read_librispeech",
    "read_pairs",
    "read_voiceassistant",
    "schema",
    "stream_voiceassistant",
    "synthesize",
    "voiceassistant_record",
]
