"""A Realtime session's ear: input audio in, turn detection, and what a turn's start and end set off."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from ..turns.endofturn import EndOfTurnModel
from ..turns.taking import (
    SpeechStarted,
    SpeechStopped,
    TimeoutTriggered,
    TurnCheck,
    TurnEnded,
    TurnEvent,
    TurnMayEnd,
    TurnResumed,
    vad_settings,
)
from ..turns.vad import StreamingVAD
from .answers import Answers
from .context import SessionContext
from .conversation import Conversation
from .denoise import MAX_RELEASE_BYTES, Denoiser
from .formats import InputConverter
from .protocol import PROTOCOL_SAMPLE_RATE, UNSUPPORTED_EVENTS, ClientError, decode_pcm16, pcm16_to_float
from .transcripts import Transcripts


class Listening:
    """The ``input_audio_buffer.*`` events of one session and the turns its VAD finds."""

    def __init__(self, session: SessionContext, conversation: Conversation, transcripts: Transcripts,
                 answers: Answers) -> None:
        self.session = session
        self.conversation = conversation
        self.transcripts = transcripts
        self.answers = answers
        self.input_converter = InputConverter(session.config.input_format)
        self.end_of_turn: EndOfTurnModel | None = None  # semantic VAD's model, loaded when a session asks for it
        self.denoiser: Denoiser | None = None  # while the session asks for noise reduction

    async def on_append(self, event: dict[str, Any]) -> None:
        fmt = self.session.config.input_format
        if self.input_converter.format != fmt:  # a new format: a new resampler
            self.input_converter = InputConverter(fmt)
        await self.append_audio(self.input_converter.to_pcm16(decode_pcm16(event.get("audio"), "audio", fmt)))

    async def append_audio(self, pcm: bytes, rolling: bool = False) -> None:
        """Add 24 kHz mono 16-bit input audio (an append event's, or with ``rolling`` a media track's, which keeps
        the latest audio when the buffer is full) and run turn detection."""
        session = self.session
        if not pcm or session.closing:
            return
        turns = session.turns
        if self.denoiser is not None:  # a full buffer is refused before the denoiser takes any of it
            turns.check_room(len(pcm) + MAX_RELEASE_BYTES, rolling)
        pcm = self._denoised(pcm)
        if not pcm:
            return  # held by the denoiser until a whole 10 ms frame is there
        turns.append(pcm, rolling)
        if not turns.detecting:
            return
        if turns.vad is None:
            td = session.config.turn_detection
            first = turns.stream_samples - len(pcm) // 2
            vad = await run_in_threadpool(StreamingVAD, *vad_settings(td), PROTOCOL_SAMPLE_RATE)
            if not turns.detecting or session.closing:  # turned off while the VAD was being loaded
                return
            turns.start_vad(vad, first)
        # NumPy, a fraction of a millisecond per 32 ms window: inline, no thread hop.
        self.on_turn_events(turns.on_vad(turns.vad.process(pcm16_to_float(pcm))))

    def _denoised(self, pcm: bytes) -> bytes:
        """The input after the session's noise reduction (as it is when that is off)."""
        wanted = self.session.config.noise_reduction is not None
        if wanted and self.denoiser is None:
            self.denoiser = Denoiser()
        elif not wanted and self.denoiser is not None:  # turned off: what it held comes first
            held, self.denoiser = self.denoiser.flush(), None
            pcm = held + pcm
        return pcm if self.denoiser is None else self.denoiser.process(pcm)

    def close(self) -> None:
        """The session is closing: free the denoiser's state now rather than when it is collected."""
        if self.denoiser is not None:
            self.denoiser.close()
            self.denoiser = None

    def on_turn_events(self, events: list[TurnEvent]) -> None:
        for event in events:
            if not self.session.closing:  # (an end-of-turn decision may come back after the connection closed)
                self.on_turn_event(event)

    def on_turn_event(self, event: TurnEvent) -> None:
        session, answers = self.session, self.answers
        if isinstance(event, SpeechStarted):
            session.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": event.audio_start_ms,
                          "item_id": event.item_id})
            if answers.response is not None and session.config.turn_detection.interrupt_response:
                answers.cancel_response("turn_detected")  # barge-in: stopped within one decode step
        elif isinstance(event, SpeechStopped):
            session.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": event.audio_end_ms,
                          "item_id": event.item_id})
        elif isinstance(event, TurnMayEnd):
            answers.speculate(event)
        elif isinstance(event, TurnResumed):
            answers.drop_speculation()
        elif isinstance(event, TurnCheck):  # semantic VAD: the end-of-turn model decides, off the event loop
            self.end_of_turn.ask(event.pcm, lambda p: self.on_turn_events(session.turns.on_end_of_turn(event, p)))
        elif isinstance(event, TimeoutTriggered):
            session.send({"type": "input_audio_buffer.timeout_triggered", "audio_start_ms": event.audio_start_ms,
                          "audio_end_ms": event.audio_end_ms, "item_id": event.item_id})
        elif isinstance(event, TurnEnded):
            self.take_turn(event)

    def take_turn(self, turn: TurnEnded) -> None:
        """The VAD ended a turn: it is committed, then answered when the session says so (else transcribed)."""
        config = self.session.config
        td = config.turn_detection
        answering = config.type == "realtime" and td is not None and td.create_response
        self.add_user_audio(turn, transcribe_here=not answering)
        if answering:
            try:
                self.answers.start_response({})
            except ClientError as exc:  # busy, or a response still running (interrupt_response false)
                self.session.error(exc.message, exc.code, exc.param, exc.kind)
                if config.transcribes:
                    self.transcripts.transcribe(self.conversation.last_user)  # not answered, but still transcribed
        self.answers.drop_speculation()  # unused (the turn or the session changed meanwhile)

    def add_user_audio(self, turn: TurnEnded, transcribe_here: bool) -> None:
        """A committed spoken turn; transcribed on its own now if asked and ``transcribe_here`` (else by its answer)."""
        user = self.conversation.add_user_audio(turn)
        if transcribe_here and self.session.config.transcribes:
            self.transcripts.transcribe(user)

    async def on_commit(self, event: dict[str, Any]) -> None:
        turns = self.session.turns
        if self.denoiser is not None and not turns.detecting:  # what the denoiser holds ends this turn
            held, self.denoiser = self.denoiser.flush(), None
            turns.append(held, rolling=True)  # never refused: at most 50 ms beyond what was accepted
        self.add_user_audio(self.session.turns.commit(), transcribe_here=True)

    async def on_clear(self, event: dict[str, Any]) -> None:
        self.close()  # what the denoiser held is cleared too
        self.session.turns.clear()
        self.session.send({"type": "input_audio_buffer.cleared"})

    async def on_output_audio_clear(self, event: dict[str, Any]) -> None:
        """WebRTC only: drop the answer audio queued on the track (the answer itself goes on; cancel it apart)."""
        if not self.session.plays_audio:
            raise ClientError(f"output_audio_buffer.clear is not supported by this server "
                              f"({UNSUPPORTED_EVENTS['output_audio_buffer.clear']})", code="unsupported_event",
                              param="type")
        self.answers.clear_played_audio()
