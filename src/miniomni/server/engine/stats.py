"""What the engine counts of its steps and answers (the server's metrics read it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Counters of the engine's decode steps and answers."""

    steps: int = 0
    step_seconds_total: float = 0.0
    last_step_ms: float = 0.0
    job_seconds_total: float = 0.0
    first_audio_ms_total: float = 0.0
    first_audio_count: int = 0
    answers_started: int = 0
    answers_finished: int = 0
    answers_failed: int = 0
    rejected_busy: int = 0
    speculative_started: int = 0
    speculative_used: int = 0
    speculative_dropped: int = 0
