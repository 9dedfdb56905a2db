"""The rules of real time: what the compute thread does next, from how far each answer is ahead of its listener.

An answer's *lead* is the audio it has sent beyond what its listener has played, were
playback to start at the first byte (:meth:`AnswerJob.lead`). Two decisions follow, from
the leads of the answers being decoded and what their steps cost:

* **whether a newcomer's preparation block may run** instead of a decode step: only in the
  time the playing answers have to spare (:func:`block_may_run`), so a running answer never
  waits for a newcomer; on a machine too busy for both, the newcomer waits;
* **whether there is room for one more answer**: a newcomer is prepared only while a step
  with it is expected to cost at most 90 % of the speech it makes (:class:`StepCosts`,
  learnt from the steps so far), so answers already playing keep real time; beyond that
  the newcomer waits for one of them to end.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...audio import OUTPUT_SAMPLE_RATE
from ...tokens import SAMPLES_PER_FRAME
from .jobs import AnswerJob

# How much audio every playing answer must have ahead of its listener, after a preparation
# block's expected cost, before that block may run (seconds).
LEAD_FLOOR = 0.35
# A question waiting longer than this may take blocks down to the block's cost: the floor is
# no longer kept, and the listener's own buffer is the margin (seconds).
MAX_WAIT = 1.0
FRAME = SAMPLES_PER_FRAME / OUTPUT_SAMPLE_RATE  # the speech one decode step makes (seconds)
ROOM = 0.9  # a newcomer is prepared while a step with it is expected to cost at most this share of FRAME
# Steps averaged (the mean of the first ones, then a moving average of about as many): several codec
# cycles, since every fourth step or so also decodes each answer's audio and costs twice the others.
AVERAGED_STEPS = 16


class StepCosts:
    """What a decode step costs, by the number of answers it takes: running averages of the steps so far."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._counts: dict[int, int] = {}

    def add(self, answers: int, seconds: float) -> None:
        count = self._counts.get(answers, 0) + 1
        self._counts[answers] = count
        if count <= 2:  # the first step with this many answers may carry one-time set-up: the second replaces it
            self.seconds[answers] = seconds
            return
        old = self.seconds[answers]
        self.seconds[answers] = old + (seconds - old) / min(count - 1, AVERAGED_STEPS)

    def expected(self, answers: int) -> float | None:
        """A step's cost for ``answers`` answers: as measured, or extended in a line from the two largest below."""
        if answers in self.seconds:
            return self.seconds[answers]
        below = sorted(n for n in self.seconds if n < answers)[-2:]
        if len(below) < 2:
            return None  # not known yet: try it
        (n1, c1), (n2, c2) = ((n, self.seconds[n]) for n in below)
        return c2 + (c2 - c1) / (n2 - n1) * (answers - n2)

    def room_for_one_more(self, answers: int) -> bool:
        """Whether ``answers`` + 1 answers are expected to keep real time."""
        expected = self.expected(answers + 1)
        return expected is None or expected <= ROOM * FRAME


def block_may_run(active: Sequence[AnswerJob], now: float, waited: float, cost: float,
                  floor: float = LEAD_FLOOR, max_wait: float = MAX_WAIT) -> bool:
    """Whether a preparation block of expected ``cost`` runs now, for a question queued ``waited`` seconds ago."""
    floor = floor if waited <= max_wait else 0.0
    return all(_spares(job, now, cost + floor) for job in active)


def _speaks(job: AnswerJob) -> bool:
    return job.state.audio_out  # a text answer or a transcript has no player to keep fed


def _spares(job: AnswerJob, now: float, seconds: float) -> bool:
    if not _speaks(job):
        return True
    if not job.events.samples_out:
        return False  # an answer that has not spoken yet comes first
    if job.held:
        return True  # its first audio waits for the listener: nothing urgent
    return job.lead(now) >= seconds
