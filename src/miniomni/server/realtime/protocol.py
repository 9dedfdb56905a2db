"""The OpenAI Realtime protocol as ``/v1/realtime`` speaks it: parsing client events and building server events.

Pure functions and plain data, no socket: what a client may send, how each field is
checked (a bad one raises :class:`ClientError`, which the connection turns into an
``error`` event), and the shapes of the objects the server sends back. GA event names;
the beta spellings of session fields are accepted too. ``docs/server.md`` lists it all.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import denoise
from .formats import PCM, AudioFormat, FormatError, decode_audio, parse_format, pcm16_to_float
from .formats import PROTOCOL_SAMPLE_RATE as PROTOCOL_SAMPLE_RATE  # the model's rate, both ways

PCM_FORMAT = PCM.shape()  # the model's format: 16-bit little-endian mono PCM at 24 kHz (G.711 converted)
API_KEY_PROTOCOL = "openai-insecure-api-key."
MAX_JSON_DEPTH = 32  # events nest a few levels; deeper is not an event, and could not be echoed back
MAX_TEXT_CHARS = 32_768  # far more than the 2048 positions of the context can hold
UNSUPPORTED_EVENTS = {
    "output_audio_buffer.clear": "output_audio_buffer.clear (WebRTC/SIP only); send response.cancel",
}


class ClientError(Exception):
    """A bad client event: becomes an ``error`` event; the connection stays open."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.kind = message, code, param, kind


def parse_json(text: str | bytes, what: str = "the message") -> Any:
    """JSON from a client, with errors that say what was wrong (never RecursionError or a digit-limit ValueError)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ClientError(f"{what} is nested too deeply; at most {MAX_JSON_DEPTH} levels",
                          code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ClientError(f"{what} is not valid JSON: send one JSON object", code="invalid_json") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ClientError(f"{what} holds a value JSON cannot be read into ({exc})", code="invalid_json") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ClientError(f"{what} is nested too deeply; at most {MAX_JSON_DEPTH} levels", code="invalid_json")
    return value


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                return level
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------- session configuration


EAGERNESS = ("low", "medium", "high", "auto")  # semantic VAD's; auto is medium
IDLE_TIMEOUT_MS = (5000, 30000)  # server VAD's idle_timeout_ms, as OpenAI bounds it


@dataclass
class TurnDetection:
    """Turn detection of a session: ``server_vad`` (silence ends a turn) or ``semantic_vad`` (a model decides).

    ``threshold`` and ``prefix_padding_ms`` serve both (semantic VAD keeps their defaults);
    ``silence_duration_ms`` and ``idle_timeout_ms`` are server VAD's, ``eagerness`` semantic VAD's.
    """

    type: str = "server_vad"
    threshold: float = 0.5
    silence_duration_ms: int = 500
    prefix_padding_ms: int = 300
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None
    eagerness: str = "auto"

    @property
    def semantic(self) -> bool:
        return self.type == "semantic_vad"

    def as_dict(self) -> dict[str, Any]:
        """The settings as OpenAI's session object shows them (each type with its own fields)."""
        common = {"create_response": self.create_response, "interrupt_response": self.interrupt_response}
        if self.semantic:
            return {"type": "semantic_vad", "eagerness": self.eagerness, **common}
        return {"type": "server_vad", "threshold": self.threshold, "silence_duration_ms": self.silence_duration_ms,
                "prefix_padding_ms": self.prefix_padding_ms, **common, "idle_timeout_ms": self.idle_timeout_ms}


@dataclass
class SessionConfig:
    """What ``session.update`` can change."""

    type: str = "realtime"  # or "transcription": spoken turns are transcribed, never answered
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    max_output_tokens: int | None = None  # None: "inf", i.e. the server's max_tokens_limit
    instructions: str = ""
    input_format: AudioFormat = PCM  # of input_audio_buffer.append and input_audio parts
    output_format: AudioFormat = PCM  # of response.output_audio.delta
    transcription: dict[str, Any] | None = None  # transcribe the user's spoken turns (with the model's asr task)
    tools: list[Any] = field(default_factory=list)  # kept and echoed as sent: this model never calls a tool
    tool_choice: Any = "auto"
    noise_reduction: str | None = None  # "near_field" or "far_field": the input runs through RNNoise first

    @property
    def transcribes(self) -> bool:
        return self.type == "transcription" or self.transcription is not None


def parse_transcription(value: Any, param: str) -> dict[str, Any] | None:
    """``{"model": ..., "language": ..., "prompt": ...}`` or null; the model's own asr task transcribes either way."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClientError(f"{param} must be an object (e.g. {{\"model\": \"mini-omni\"}}) or null", param=param)
    kept = {}
    for key in ("model", "language", "prompt"):
        if value.get(key) is not None:
            if not isinstance(value[key], str):
                raise ClientError(f"{param}.{key} must be a string", param=f"{param}.{key}")
            kept[key] = value[key]
    return kept


def parse_modalities(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not value or any(m not in ("audio", "text") for m in value):
        raise ClientError(f"{param} must be [\"audio\"] or [\"text\"], got {value!r}", param=param)
    # Audio always comes with its transcript; the beta default ["text", "audio"] means audio.
    return ["audio"] if "audio" in value else ["text"]


def check_format(value: Any, param: str) -> AudioFormat:
    """An audio format: 16-bit PCM at 24 kHz, or G.711 μ-law / A-law at 8 kHz (GA or beta shape)."""
    try:
        return parse_format(value, param)
    except FormatError as exc:
        raise ClientError(str(exc), code="unsupported_audio_format", param=param) from None


def check_noise_reduction(value: Any, param: str) -> str | None:
    """``noise_reduction``: null, near_field or far_field (:func:`.denoise.parse_noise_reduction`)."""
    try:
        return denoise.parse_noise_reduction(value, param)
    except denoise.NoiseReductionError as exc:
        raise ClientError(str(exc), code="unsupported_noise_reduction", param=param) from None


def parse_turn_detection(value: Any, param: str) -> TurnDetection | None:
    """``turn_detection``: a ``server_vad`` or ``semantic_vad`` object, or null (the client commits)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClientError(f"{param} must be an object or null", param=param)
    kind = value.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise ClientError(f"{param}.type {kind!r} is not supported; use \"server_vad\", \"semantic_vad\" or null",
                          param=f"{param}.type")
    td = TurnDetection(type=kind)
    if kind == "semantic_vad":
        eagerness = value.get("eagerness")
        if eagerness is not None:
            if eagerness not in EAGERNESS:
                raise ClientError(f"{param}.eagerness must be one of {', '.join(map(json.dumps, EAGERNESS))}; "
                                  f"got {eagerness!r}", param=f"{param}.eagerness")
            td.eagerness = eagerness
        if value.get("idle_timeout_ms") is not None:
            raise ClientError(f"{param}.idle_timeout_ms applies to \"server_vad\" only",
                              param=f"{param}.idle_timeout_ms")
    else:
        threshold = value.get("threshold")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
                raise ClientError(f"{param}.threshold must be a number from 0 to 1", param=f"{param}.threshold")
            td.threshold = float(threshold)
        for name, low, top in (("silence_duration_ms", 0, 10_000), ("prefix_padding_ms", 0, 10_000),
                               ("idle_timeout_ms", *IDLE_TIMEOUT_MS)):
            item = value.get(name)
            if item is not None:
                if not _is_int(item) or not low <= item <= top:
                    raise ClientError(f"{param}.{name} must be an integer from {low} to {top}"
                                      + (" or null" if name == "idle_timeout_ms" else ""), param=f"{param}.{name}")
                setattr(td, name, item)
    for name in ("create_response", "interrupt_response"):
        item = value.get(name)
        if item is not None:
            if not isinstance(item, bool):
                raise ClientError(f"{param}.{name} must be true or false", param=f"{param}.{name}")
            setattr(td, name, item)
    return td


def parse_max_tokens(value: Any, param: str, limit: int) -> int | None:
    """``"inf"`` or null: the server's limit; integers above it are capped (clients send 4096)."""
    if value is None or value == "inf":
        return None
    if not _is_int(value) or value < 1:
        raise ClientError(f"{param} must be a positive integer or \"inf\"", param=param)
    return min(value, limit)


def _parse_audio(audio: Any, config: SessionConfig) -> None:
    """GA ``session.audio``: each side's format; the input's turn detection, noise reduction and transcription."""
    if audio is None:
        return
    if not isinstance(audio, dict):
        raise ClientError("session.audio must be an object", param="session.audio")
    for side in ("input", "output"):
        part = audio.get(side)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise ClientError(f"session.audio.{side} must be an object", param=f"session.audio.{side}")
        if "format" in part:
            setattr(config, f"{side}_format", check_format(part["format"], f"session.audio.{side}.format"))
        if side == "input" and "turn_detection" in part:
            config.turn_detection = parse_turn_detection(part["turn_detection"], "session.audio.input.turn_detection")
        if side == "input" and "noise_reduction" in part:
            config.noise_reduction = check_noise_reduction(part["noise_reduction"],
                                                           "session.audio.input.noise_reduction")
        if side == "input" and "transcription" in part:
            config.transcription = parse_transcription(part["transcription"], "session.audio.input.transcription")


def parse_session_update(session: Any, current: SessionConfig, max_tokens_limit: int) -> SessionConfig:
    """The session configuration after a ``session.update`` (``current`` is left as it was)."""
    if not isinstance(session, dict):
        raise ClientError("session.update needs a \"session\" object", param="session")
    config = copy.deepcopy(current)
    kind = session.get("type")
    if kind not in (None, "realtime", "transcription"):
        raise ClientError(f"session.type {kind!r} is not supported; \"realtime\" or \"transcription\"",
                          param="session.type")
    if kind is not None:
        config.type = kind
    if "input_audio_transcription" in session:  # beta
        config.transcription = parse_transcription(session["input_audio_transcription"],
                                                   "session.input_audio_transcription")
    for key in ("output_modalities", "modalities"):  # GA, beta
        if key in session:
            config.output_modalities = parse_modalities(session[key], f"session.{key}")
    _parse_audio(session.get("audio"), config)
    if "input_audio_noise_reduction" in session:  # beta
        config.noise_reduction = check_noise_reduction(session["input_audio_noise_reduction"],
                                                       "session.input_audio_noise_reduction")
    for side in ("input", "output"):  # beta
        if f"{side}_audio_format" in session:
            setattr(config, f"{side}_format", check_format(session[f"{side}_audio_format"],
                                                          f"session.{side}_audio_format"))
    if "turn_detection" in session:  # beta
        config.turn_detection = parse_turn_detection(session["turn_detection"], "session.turn_detection")
    for key in ("max_output_tokens", "max_response_output_tokens"):  # GA, beta
        if key in session:
            config.max_output_tokens = parse_max_tokens(session[key], f"session.{key}", max_tokens_limit)
    if "tools" in session:
        if not isinstance(session["tools"], list) or not all(isinstance(t, dict) for t in session["tools"]):
            raise ClientError("session.tools must be a list of tool objects", param="session.tools")
        config.tools = copy.deepcopy(session["tools"])
    if "tool_choice" in session:
        if not isinstance(session["tool_choice"], (str, dict)):
            raise ClientError("session.tool_choice must be \"auto\", \"none\", \"required\" or an object",
                              param="session.tool_choice")
        config.tool_choice = copy.deepcopy(session["tool_choice"])
    if "instructions" in session:
        if not isinstance(session["instructions"], str):
            raise ClientError("session.instructions must be a string", param="session.instructions")
        config.instructions = session["instructions"]
    return config


@dataclass
class ResponseParams:
    """What a ``response.create`` asks for, resolved against the session."""

    output_modalities: list[str]
    max_output_tokens: int | None
    input_items: list[Any] | None
    metadata: Any = None
    conversation: str = "auto"  # "none": out of band, nothing is added to the conversation


def parse_response_create(params: Any, config: SessionConfig, max_tokens_limit: int) -> ResponseParams:
    """Resolve ``response.create``'s ``response`` object (modalities, token cap, explicit input)."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ClientError("response must be an object", param="response")
    modalities = config.output_modalities
    for key in ("output_modalities", "modalities"):
        if key in params:
            modalities = parse_modalities(params[key], f"response.{key}")
    max_tokens = config.max_output_tokens
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if key in params:
            max_tokens = parse_max_tokens(params[key], f"response.{key}", max_tokens_limit)
    items = params.get("input")
    if items is not None and not isinstance(items, list):
        raise ClientError("response.input must be a list of items", param="response.input")
    conversation = params.get("conversation", "auto")
    if conversation not in ("auto", "none"):
        raise ClientError(f"response.conversation must be \"auto\" (the session's conversation) or \"none\" "
                          f"(out of band: nothing is added to it), got {conversation!r}", param="response.conversation")
    return ResponseParams(modalities, max_tokens, items, params.get("metadata"), conversation)


# ---------------------------------------------------------------------- audio and items


def decode_pcm16(data: Any, param: str, fmt: AudioFormat = PCM) -> bytes:
    """A base64 field of audio in ``fmt`` -> its raw bytes (G.711 not yet converted)."""
    try:
        return decode_audio(data, param, fmt)
    except FormatError as exc:
        raise ClientError(str(exc), code="invalid_audio", param=param) from None


@dataclass
class UserInput:
    """The user message a response answers: text, or audio (float32 at 24 kHz)."""

    item_id: str
    text: str | None = None
    audio: np.ndarray | None = None
    pcm: bytes | None = None  # the audio as it arrived (16-bit PCM), for a committed spoken turn
    transcribed: bool = False  # its transcription has been started (on its own, or beside an answer)


def parse_message(item: Any, param: str, max_audio_bytes: int, max_audio_seconds: float,
                  to_pcm16: Callable[[Any, str], bytes] = decode_pcm16) -> tuple[UserInput | None, dict[str, Any]]:
    """A message item -> (the user input, or None for other roles; the item as echoed back).

    ``to_pcm16`` turns an ``input_audio`` part's base64 field into 24 kHz PCM (the session's input format).
    """
    if not isinstance(item, dict):
        raise ClientError(f"{param} must be an object", param=param)
    kind = item.get("type", "message")
    if kind != "message":
        raise ClientError(f"{param}.type {kind!r} is not supported; only \"message\" items", param=f"{param}.type")
    role = item.get("role")
    if role not in ("user", "system", "assistant"):
        raise ClientError(f"{param}.role must be \"user\", \"system\" or \"assistant\"", param=f"{param}.role")
    content = item.get("content")
    if not isinstance(content, list) or not all(isinstance(c, dict) for c in content):
        raise ClientError(f"{param}.content must be a list of content objects", param=f"{param}.content")
    item_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else new_id("item")
    echoed = {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed",
              "content": []}
    texts: list[str] = []
    audio = bytearray()
    for index, part in enumerate(content):
        part_type = part.get("type")
        where = f"{param}.content[{index}]"
        if part_type in ("input_text", "text", "output_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise ClientError(f"{where}.text must be a string", param=f"{where}.text")
            if len(text) > MAX_TEXT_CHARS:
                raise ClientError(f"{where}.text is {len(text)} characters long; at most {MAX_TEXT_CHARS} fit the "
                                  "model's context", code="input_text_too_long", param=f"{where}.text")
            texts.append(text)
            echoed["content"].append({"type": part_type, "text": text})
        elif part_type == "input_audio":
            audio += to_pcm16(part.get("audio"), f"{where}.audio")
            echoed["content"].append({"type": "input_audio", "transcript": part.get("transcript")})
        elif role != "user" and part_type in ("audio", "output_audio"):
            echoed["content"].append({"type": part_type, "transcript": part.get("transcript")})
        else:
            raise ClientError(f"{where}.type {part_type!r} is not supported; use input_text or input_audio",
                              param=f"{where}.type")
    if role != "user":
        return None, echoed
    if texts and audio:
        raise ClientError(f"{param}: this model takes text or audio in one message, not both", param=param)
    if audio:
        if len(audio) > max_audio_bytes:
            raise ClientError(f"{param}: the audio is longer than {max_audio_seconds:g} s",
                              code="input_audio_too_long", param=param)
        return UserInput(item_id, audio=pcm16_to_float(audio)), echoed
    text = "\n".join(texts)
    if not text.strip():
        raise ClientError(f"{param}: the message has no text or audio to answer", param=f"{param}.content")
    return UserInput(item_id, text=text), echoed


def user_audio_item(item_id: str, transcript: str | None = None) -> dict[str, Any]:
    """The conversation item of a committed spoken turn."""
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
            "status": "completed", "content": [{"type": "input_audio", "transcript": transcript}]}


def session_object(session_id: str, model: str, config: SessionConfig) -> dict[str, Any]:
    return {
        "type": config.type,
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": list(config.output_modalities),
        "instructions": config.instructions,
        "max_output_tokens": "inf" if config.max_output_tokens is None else config.max_output_tokens,
        "tools": copy.deepcopy(config.tools),
        "tool_choice": copy.deepcopy(config.tool_choice),
        "audio": {
            "input": {
                "format": config.input_format.shape(),
                "transcription": None if config.transcription is None else dict(config.transcription),
                "noise_reduction": None if config.noise_reduction is None else {"type": config.noise_reduction},
                "turn_detection": None if config.turn_detection is None else config.turn_detection.as_dict(),
            },
            "output": {"format": config.output_format.shape()},
        },
    }


@dataclass
class ResponseIds:
    """Who a response is, as every response event names it."""

    id: str
    item_id: str
    audio_out: bool
    max_output_tokens: int
    metadata: Any = None
    in_conversation: bool = True  # False: an out-of-band response (``conversation: "none"``)
    output_format: AudioFormat = PCM

    def where(self) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "audio", "transcript": text} if self.audio_out else {"type": "text", "text": text}

    def item(self, status: str, text: str | None) -> dict[str, Any]:
        """The assistant's conversation item (``text`` None: no content yet)."""
        content = []
        if text is not None:
            content = [{"type": "output_audio", "transcript": text} if self.audio_out
                       else {"type": "output_text", "text": text}]
        return {"id": self.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content}

    def response_object(self, conversation_id: str, status: str, output: list[dict[str, Any]],
                        details: Any = None, usage: Any = None) -> dict[str, Any]:
        return {
            "object": "realtime.response",
            "id": self.id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": conversation_id if self.in_conversation else None,
            "output_modalities": ["audio"] if self.audio_out else ["text"],
            "max_output_tokens": self.max_output_tokens,
            "audio": {"output": {"format": self.output_format.shape()}},
            "usage": usage,
            "metadata": self.metadata,
        }


def error_event(message: str, code: str | None = None, param: str | None = None,
                kind: str = "invalid_request_error", event_id: str | None = None) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}
