"""What ``miniomni serve`` lets an operator set: access, limits, the end-of-turn model."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MiniOmniError

log = logging.getLogger("miniomni")

# How much audio Whisper attends over when serving (see miniomni.audio.encoder_mel_frames): a question padded
# to the next 10 s, not to Whisper's whole 30 s window, for quicker first answers.
SERVE_ENCODER_CONTEXT = "10"


@dataclass
class ServerSettings:
    """Settings shared by the HTTP routes and the Realtime WebSocket."""

    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_audio_seconds: float = 30.0
    max_request_bytes: int = 64 * 1024 * 1024
    max_tokens_limit: int = 2048
    speculate: bool = True  # answer a spoken turn while the VAD makes sure it has ended (see turns.py)
    max_connections: int = 64  # open Realtime WebSocket connections, idle ones included
    max_message_bytes: int = 4 * 1024 * 1024  # the largest WebSocket message (30 s of PCM is under 2 MB)
    idle_timeout: float = 300.0  # seconds without a client event while no answer runs
    max_events_per_second: float = 200.0  # per connection, in bursts of up to twice that
    # The addresses a WebRTC answer announces (ICE host candidates); None: every address of the machine.
    webrtc_addresses: tuple[str, ...] | None = None
    webrtc_playout: float = 0.2  # seconds a WebRTC answer waits on the track after its first audio (a jitter buffer)
    turn_model: str | None = None  # semantic VAD's end-of-turn model file (None: the pipecat-ai wheel's copy, if any)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """``miniomni serve``'s flags for where it listens, who may talk to it, its limits and its end-of-turn model."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None,
                   help="require 'Authorization: Bearer KEY' on every request, KEY being this file's first line "
                        "(or set MINIOMNI_API_KEY)")
    p.add_argument("--api-key", default=None, help="the key itself (visible to every user of `ps`: prefer the file "
                                                   "or the environment variable)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)")
    p.add_argument("--max-audio-seconds", type=float, default=30.0, help="longest question accepted")
    p.add_argument("--max-connections", type=int, default=64,
                   help="open Realtime WebSocket connections, idle ones included (default 64)")
    p.add_argument("--max-message-mb", type=float, default=4.0, help="largest WebSocket message (default 4 MB)")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest HTTP request body (default 64 MB)")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="close a connection after this many seconds without an event while no answer runs")
    p.add_argument("--max-events-per-second", type=float, default=200.0,
                   help="per connection, in bursts of up to twice as many (default 200)")
    p.add_argument("--webrtc-playout-ms", type=float, default=200.0,
                   help="a WebRTC answer starts on its track this long after its first audio (default 200): the "
                        "jitter buffer a WebSocket client keeps itself; 0 starts at once, with gaps at the start")
    p.add_argument("--webrtc-address", action="append", default=None, metavar="ADDRESS",
                   help="an address WebRTC answers announce (repeatable); default: 127.0.0.1 alone when --host is a "
                        "loopback address, else every address of the machine")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS (browsers need it for the microphone)")
    p.add_argument("--ssl-keyfile", default=None)
    p.add_argument("--no-speculation", action="store_true",
                   help="do not start answering while the VAD makes sure a spoken turn has ended")
    p.add_argument("--turn-model", default=None,
                   help="semantic VAD's end-of-turn model (Smart Turn v3 ONNX); default: the one `miniomni download` "
                        "put in the --checkpoint directory, else the pipecat-ai wheel's copy")


def settings_from_args(args: argparse.Namespace, api_key: str | None, turn_model: str | None) -> ServerSettings:
    """The settings ``miniomni serve``'s flags ask for (the key and the model file resolved by the caller)."""
    return ServerSettings(api_key=api_key, cors_origins=args.cors_origin, max_audio_seconds=args.max_audio_seconds,
                          speculate=not args.no_speculation, max_connections=args.max_connections,
                          idle_timeout=args.idle_timeout, max_message_bytes=int(args.max_message_mb * 1024 * 1024),
                          max_request_bytes=int(args.max_request_mb * 1024 * 1024),
                          max_events_per_second=args.max_events_per_second, turn_model=turn_model,
                          webrtc_playout=args.webrtc_playout_ms / 1000, webrtc_addresses=webrtc_addresses(args))


def webrtc_addresses(args: argparse.Namespace) -> tuple[str, ...] | None:
    """``--webrtc-address``, else loopback alone for a server that listens on loopback, else None (every address)."""
    if args.webrtc_address:
        return tuple(args.webrtc_address)
    host = str(getattr(args, "host", "") or "")
    return ("127.0.0.1",) if host == "localhost" or host.startswith("127.") or host == "::1" else None


def api_key_from_args(args: argparse.Namespace) -> str | None:
    """The API key: --api-key-file, else MINIOMNI_API_KEY, else --api-key (which `ps` shows), else none."""
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except OSError as exc:
            raise MiniOmniError(f"--api-key-file {args.api_key_file} could not be read ({exc})") from exc
        key = lines[0].strip() if lines else ""
        if not key:
            raise MiniOmniError(f"--api-key-file {args.api_key_file} is empty; put the key on its first line")
        return key
    if os.environ.get("MINIOMNI_API_KEY"):
        return os.environ["MINIOMNI_API_KEY"].strip()
    if args.api_key:
        log.warning("--api-key is visible to every user of this machine (ps); prefer --api-key-file or "
                    "MINIOMNI_API_KEY")
    return args.api_key
