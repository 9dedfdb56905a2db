"""Turn-taking on one Realtime connection: the input audio buffer and the VAD state machine.

Audio arrives as 16-bit PCM at 24 kHz. Without turn detection it collects until the client
commits or clears it. With server VAD, speech detected by the VAD opens a turn (starting
``prefix_padding_ms`` early) and ``silence_duration_ms`` of silence closes it. The turn's
audio ends :data:`TURN_TAIL_MS` after the silence began, so it is known the moment that
much silence has arrived: :class:`TurnMayEnd` offers it then, while the VAD is still
making sure, and :class:`TurnResumed` withdraws it if speech comes back. The committed
turn (:class:`TurnEnded`) holds exactly the audio that was offered.

With semantic VAD the turn's audio ends where the silence begins, so it is offered at the
first quiet window. After :data:`QUIET_MS` of silence a :class:`TurnCheck` asks the
end-of-turn model about the turn so far; its answer comes back through
:meth:`InputTurns.on_end_of_turn`: complete ends the turn at once, incomplete keeps
listening (the next pause is checked again), and the VAD itself ends the turn after the
eagerness cap of silence (:data:`EAGERNESS_CAP_MS`).

Server VAD's ``idle_timeout_ms``: that long without speech once the last answer has played
out, the silence is committed as a turn of its own (:class:`TimeoutTriggered`).

No socket and no model here: the VAD's events and the model's probabilities come in as
data, turn events go out as data, so the whole state machine can be driven by arrays in tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..realtime.protocol import PROTOCOL_SAMPLE_RATE, ClientError, TurnDetection, new_id
from .vad import VAD_SAMPLE_RATE, VADEvent

# The silence kept at the end of a spoken turn: one VAD window (at most silence_duration_ms; none
# with semantic VAD), so the turn is offered as soon as the VAD has heard its first quiet window.
TURN_TAIL_MS = 32
QUIET_MS = 200  # semantic VAD asks the end-of-turn model after this much silence
EAGERNESS_CAP_MS = {"low": 8000, "medium": 4000, "high": 2000, "auto": 4000}  # silence that ends a turn anyway
COMPLETE = 0.5  # the end-of-turn model's probability above which the turn is over


@dataclass
class SpeechStarted:
    item_id: str
    audio_start_ms: int


@dataclass
class SpeechStopped:
    item_id: str
    audio_end_ms: int


@dataclass
class TurnEnded:
    """A spoken turn taken by the VAD: its audio (16-bit PCM at 24 kHz), never empty."""

    item_id: str
    pcm: bytes


@dataclass
class TurnMayEnd:
    """The silence has begun: if it lasts, the turn will be exactly this audio."""

    item_id: str
    pcm: bytes


@dataclass
class TurnResumed:
    """Speech came back before the silence was long enough: the offered turn goes on."""

    item_id: str


@dataclass
class TurnCheck:
    """Semantic VAD: the speaker has paused; is the turn over? ``pcm`` is the turn so far, pause included."""

    item_id: str
    pcm: bytes
    silence_start: int  # stream position where the pause began (the check's identity)


@dataclass
class TimeoutTriggered:
    """Nobody spoke for ``idle_timeout_ms``: the silence becomes a turn (a :class:`TurnEnded` follows)."""

    item_id: str
    audio_start_ms: int
    audio_end_ms: int


TurnEvent = SpeechStarted | SpeechStopped | TurnEnded | TurnMayEnd | TurnResumed | TurnCheck | TimeoutTriggered


def _ms(samples: int) -> int:
    return samples * 1000 // PROTOCOL_SAMPLE_RATE


def vad_settings(turn_detection: TurnDetection) -> tuple[float, int]:
    """The VAD's (threshold, silence_duration_ms): with semantic VAD the VAD's silence is the eagerness cap."""
    if turn_detection.semantic:
        return turn_detection.threshold, EAGERNESS_CAP_MS[turn_detection.eagerness]
    return turn_detection.threshold, turn_detection.silence_duration_ms


class InputTurns:
    """The input audio buffer of one connection and, with ``turn_detection``, who has the turn.

    Positions are counted in 24 kHz samples from the first sample of the connection.
    """

    def __init__(self, max_audio_seconds: float, turn_detection: TurnDetection | None = None) -> None:
        self.max_audio_seconds = max_audio_seconds
        self.max_buffer_bytes = int(max_audio_seconds * PROTOCOL_SAMPLE_RATE) * 2
        self.turn_detection = turn_detection
        self.buffer = bytearray()  # uncommitted input audio
        self.buffer_start = 0  # stream position of the buffer's first sample
        self.stream_samples = 0  # every sample appended so far
        self.vad = None  # a StreamingVAD once server VAD has heard audio
        self.vad_base = 0  # stream position where the VAD started listening
        self.speech_start: int | None = None  # stream position where the current turn starts
        self.speech_item_id: str | None = None
        self.turn_end: int | None = None  # where the turn ends if the current silence lasts
        self.offered = False  # a TurnMayEnd for turn_end went out
        self.checked = False  # a TurnCheck for the current silence went out (semantic VAD)
        self.idle_start = 0  # stream position from which idle_timeout_ms counts
        self.responding = False  # an answer runs: no idle timeout
        self.response_start = 0  # stream position where the running answer began

    @property
    def detecting(self) -> bool:
        return self.turn_detection is not None

    def configure(self, turn_detection: TurnDetection | None) -> None:
        """New turn-detection settings (None turns the VAD off and forgets it); the idle timeout counts from now."""
        self.turn_detection = turn_detection
        self.idle_start = self.stream_samples
        if turn_detection is None:
            self.vad = None
            self.speech_start = self.speech_item_id = self.turn_end = None
            self.offered = self.checked = False
        elif self.vad is not None:
            self.vad.configure(*vad_settings(turn_detection))

    def check_room(self, count: int, rolling: bool = False) -> None:
        """Refuse ``count`` more bytes when they would overfill the buffer and it may not roll."""
        if not rolling and not self.detecting and len(self.buffer) + count > self.max_buffer_bytes:
            raise ClientError(f"the input audio buffer holds at most {self.max_audio_seconds:g} s; "
                              "commit or clear it first", code="input_audio_buffer_full", param="audio")

    def append(self, pcm: bytes, rolling: bool = False) -> None:
        """Add audio; without turn detection a full buffer is the client's error, or with ``rolling`` (a
        microphone that never stops) keeps the latest ``max_audio_seconds``."""
        self.check_room(len(pcm), rolling)
        self.stream_samples += len(pcm) // 2
        if not self.detecting and len(self.buffer) + len(pcm) > self.max_buffer_bytes:
            del self.buffer[: max(0, len(self.buffer) + len(pcm) - self.max_buffer_bytes)]
            pcm = pcm[-self.max_buffer_bytes :]
        self.buffer += pcm

    def start_vad(self, vad: object, first_sample: int) -> None:
        """Server VAD listens from stream position ``first_sample`` on."""
        self.vad = vad
        self.vad_base = first_sample

    def on_vad(self, events: Sequence[VADEvent]) -> list[TurnEvent]:
        """What the VAD heard in the latest audio -> turn events, in order."""
        out: list[TurnEvent] = []
        for event in events:
            position = min(self.vad_base + event.sample * PROTOCOL_SAMPLE_RATE // VAD_SAMPLE_RATE,
                           self.stream_samples)
            if event.kind == "speech_started":
                out += self._speech_started(position)
            elif event.kind == "silence_started":
                if self.speech_start is not None:
                    self.turn_end, self.checked = position + self._tail_samples(), False
            elif event.kind == "speech_resumed":
                if self.offered:
                    out.append(TurnResumed(self.speech_item_id))
                self.turn_end, self.offered, self.checked = None, False, False
            else:
                out += self._speech_stopped(position)
        if self.turn_end is not None and not self.offered and self.stream_samples >= self.turn_end:
            self.offered = True
            out.append(TurnMayEnd(self.speech_item_id, self._turn_audio(self.turn_end)))
        if self.turn_detection.semantic and self.turn_end is not None and not self.checked and \
                self.stream_samples >= self.turn_end + QUIET_MS * PROTOCOL_SAMPLE_RATE // 1000 and \
                self.vad.silence_heard:  # not while only the room's level says it is quiet
            self.checked = True
            out.append(TurnCheck(self.speech_item_id, self._turn_audio(self.stream_samples), self.turn_end))
        if self.speech_start is not None and \
                self.stream_samples - max(self.speech_start, self.buffer_start) >= self.max_buffer_bytes // 2:
            self.vad.end_speech()  # a monologue past max_audio_seconds: take the turn now
            out += self._speech_stopped(self.stream_samples, self.stream_samples)
        timeout = self.turn_detection.idle_timeout_ms
        if timeout and self.speech_start is None and not self.responding and \
                self.stream_samples - self.idle_start >= timeout * PROTOCOL_SAMPLE_RATE // 1000:
            out += self._timed_out()
        if self.speech_start is None and len(self.buffer) > self.max_buffer_bytes:
            drop = len(self.buffer) - self.max_buffer_bytes  # no speech going on: keep a rolling window
            del self.buffer[:drop]
            self.buffer_start += drop // 2
        return out

    def on_end_of_turn(self, check: TurnCheck, probability: float | None) -> list[TurnEvent]:
        """The end-of-turn model's answer to ``check`` (None: it failed; the eagerness cap still ends the turn).

        Complete (above :data:`COMPLETE`) ends the turn now, with the audio offered at the pause;
        a stale answer (speech came back, or the turn ended meanwhile) changes nothing.
        """
        if probability is None or probability <= COMPLETE or self.turn_detection is None or \
                check.item_id != self.speech_item_id or check.silence_start != self.turn_end:
            return []
        if self.vad is not None:
            self.vad.end_speech()
        return self._speech_stopped(self.stream_samples)

    def pause_idle(self) -> None:
        """An answer starts: no idle timeout while it runs."""
        self.responding, self.response_start = True, self.stream_samples

    def resume_idle(self, answer_samples: int) -> None:
        """The answer ended after ``answer_samples`` of audio: the idle timeout counts once they have played."""
        self.responding = False
        self.idle_start = max(self.stream_samples, self.response_start + answer_samples)

    def _timed_out(self) -> list[TurnEvent]:
        """The idle timeout: the silence since it began (what the buffer still holds) is committed."""
        start = max(self.idle_start, self.buffer_start)
        item_id = new_id("item")
        pcm = bytes(self.buffer[(start - self.buffer_start) * 2 :])
        self._end_turn()
        out: list[TurnEvent] = [TimeoutTriggered(item_id, _ms(start), _ms(self.stream_samples))]
        if pcm:
            out.append(TurnEnded(item_id, pcm))
        return out

    def _tail_samples(self) -> int:
        if self.turn_detection.semantic:
            return 0
        return min(TURN_TAIL_MS, self.turn_detection.silence_duration_ms) * PROTOCOL_SAMPLE_RATE // 1000

    def _turn_audio(self, end: int) -> bytes:
        """The buffered audio from the turn's start to stream position ``end``."""
        begin = (max(self.speech_start, self.buffer_start) - self.buffer_start) * 2
        return bytes(self.buffer[begin : max(begin, (end - self.buffer_start) * 2)])

    def _speech_started(self, position: int) -> list[TurnEvent]:
        start = max(0, position - self.turn_detection.prefix_padding_ms * PROTOCOL_SAMPLE_RATE // 1000)
        self.speech_start = start
        self.speech_item_id = new_id("item")
        return [SpeechStarted(self.speech_item_id, _ms(start))]

    def _speech_stopped(self, position: int, turn_end: int | None = None) -> list[TurnEvent]:
        """The turn ends at ``turn_end`` (default: the offered end, else ``position``).

        The buffer up to ``position`` goes with it.
        """
        if self.speech_start is None:
            return []
        item_id = self.speech_item_id or new_id("item")
        if turn_end is None:
            turn_end = self.turn_end if self.turn_end is not None else position
        pcm = self._turn_audio(min(turn_end, position))
        self.speech_start = self.speech_item_id = self.turn_end = None
        self.offered = self.checked = False
        self.idle_start = position
        out: list[TurnEvent] = [SpeechStopped(item_id, _ms(position))]
        del self.buffer[: max(0, (position - self.buffer_start) * 2)]
        self.buffer_start = max(position, self.buffer_start)
        if pcm:
            out.append(TurnEnded(item_id, pcm))
        return out

    def commit(self) -> TurnEnded:
        """The client commits the whole buffer as a turn."""
        if not self.buffer:
            raise ClientError("the input audio buffer is empty: append audio before committing",
                              code="input_audio_buffer_commit_empty")
        pcm = bytes(self.buffer)
        item_id = self._end_turn() or new_id("item")
        return TurnEnded(item_id, pcm)

    def clear(self) -> None:
        """The client drops the buffer."""
        self._end_turn()

    def _end_turn(self) -> str | None:
        item_id = self.speech_item_id
        self.buffer_start += len(self.buffer) // 2
        self.buffer.clear()
        self.speech_start = self.speech_item_id = self.turn_end = None
        self.offered = self.checked = False
        self.idle_start = self.stream_samples
        if self.vad is not None:
            self.vad.end_speech()
        return item_id
