"""The compute side of serving: one model, many answers, one compute thread.

:mod:`.scheduler` holds the :class:`Engine` (batched decode steps, preparation in blocks, slots),
:mod:`.policy` the rules of real time (when a newcomer's preparation block may run),
:mod:`.jobs` one answer as it runs (:class:`AnswerJob`) and what goes in and out of it,
:mod:`.stats` what the engine counts.
"""

from .jobs import AnswerJob, AnswerRequest, ErrorEvent, JobOwner, TranscriptDelta, TranscriptDone, TranscriptFailed
from .policy import LEAD_FLOOR, MAX_WAIT
from .scheduler import TRANSCRIPT_TOKENS, Engine, EngineBusy
from .stats import EngineStats

__all__ = [
    "LEAD_FLOOR",
    "MAX_WAIT",
    "TRANSCRIPT_TOKENS",
    "AnswerJob",
    "AnswerRequest",
    "Engine",
    "EngineBusy",
    "EngineStats",
    "ErrorEvent",
    "JobOwner",
    "TranscriptDelta",
    "TranscriptDone",
    "TranscriptFailed",
]
