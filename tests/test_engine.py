"""The serving engine driven step by step with a scripted clock: scheduling, held answers, slots."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import speech_like

from miniomni.audio import float_to_pcm16
from miniomni.server.engine import TRANSCRIPT_TOKENS, AnswerRequest, Engine, EngineBusy
from miniomni.streaming import AudioChunk, Done, TextDelta


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def question(seconds: float = 1.0, steps: int = 24, seed: int = 0) -> AnswerRequest:
    return AnswerRequest(task="A1A2-batch", audio=speech_like(seconds, seed=seed), sample_rate=16000,
                         max_new_tokens=steps, max_chunk=4)


def drain(engine: Engine, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not engine.run_once():
            return
    raise AssertionError("the engine never went idle")


def audio_of(events: list) -> bytes:
    return b"".join(float_to_pcm16(e.audio) for e in events if isinstance(e, AudioChunk))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def engine(omni, clock):
    engine = Engine(omni, max_answers=3, clock=clock, start=False)
    yield engine
    engine.close()


def test_engine_answer_equals_a_local_stream(omni, engine):
    request = question()
    local = list(omni.stream("A1A2-batch", audio=request.audio, sample_rate=16000, max_new_tokens=24, max_chunk=4))
    events: list = []
    engine.open(request, events.append)
    drain(engine)
    assert audio_of(events) == audio_of(local) and audio_of(events)
    assert events[-1].text_tokens == local[-1].text_tokens and events[-1].audio_tokens == local[-1].audio_tokens


def test_a_simulated_text_end_ends_the_text_there_and_skips_the_text_head_after(omni, clock, monkeypatch):
    from miniomni.tokens import EOT, PAD_T

    with pytest.raises(ValueError, match="fraction"):
        Engine(omni, start=False, text_end=1.5)
    engine = Engine(omni, max_answers=1, clock=clock, start=False, text_end=0.25)
    rows = []
    text_logits = omni.model.text_logits
    monkeypatch.setattr(omni.model, "text_logits", lambda hidden: rows.append(len(hidden)) or text_logits(hidden))
    events: list = []
    engine.open(question(steps=24), events.append)
    drain(engine)
    engine.close()
    tokens = events[-1].text_tokens
    assert len(tokens) == 24 and tokens[6] == EOT and set(tokens[7:]) == {PAD_T}
    assert EOT not in tokens[1:6] and rows == [1] * 6  # the text head ran for steps 0 to 5 only
    assert audio_of(events)


def test_a_held_answer_waits_for_release_and_then_equals_an_open_one(engine):
    alone: list = []
    engine.open(question(), alone.append)
    drain(engine)
    held_events: list = []
    held = engine.open(question(), held_events.append, hold=True)
    drain(engine)  # prepared, decoded and finished while held
    assert held_events == [] and engine.stats.speculative_started == 1
    started = engine.stats.answers_started
    held.release()
    assert audio_of(held_events) == audio_of(alone)
    assert held_events[-1].text_tokens == alone[-1].text_tokens
    assert engine.stats.speculative_used == 1 and engine.stats.answers_started == started + 1


def test_a_cancelled_held_answer_says_nothing_and_frees_its_slot_at_once(engine):
    events: list = []
    sessions = [engine.open(question(), events.append, hold=True) for _ in range(3)]
    with pytest.raises(EngineBusy):
        engine.open(question(), events.append)
    engine.run_once()
    engine.run_once()  # its preparation is under way
    sessions[0].cancel()
    assert 0 in engine.free_slots  # free for the next answer before the compute thread looks
    engine.open(question(), events.append)
    for session in sessions[1:]:
        session.cancel()
    drain(engine)
    assert events and all(not isinstance(e, Done) or e.text_tokens for e in events)
    assert engine.stats.speculative_dropped == 3 and engine.stats.speculative_used == 0
    assert engine.active_answers == 0 and sorted(engine.free_slots) == [0, 1, 2]


def playing_answer(engine: Engine, clock: Clock) -> tuple[object, list]:
    """An answer that has started to speak (its first audio delivered)."""
    events: list = []
    session = engine.open(question(steps=400), events.append)
    while not any(isinstance(e, AudioChunk) for e in events):
        assert engine.run_once()
    return session, events


def test_a_newcomer_waits_while_a_playing_answer_is_short_of_audio(engine, clock):
    session, _ = playing_answer(engine, clock)
    newcomer = engine.open(question(seed=1), lambda e: None)
    # The listener has played all that was sent: nothing ahead, so only decode steps run.
    clock.now = session.first_audio_at + session.audio_out
    for _ in range(3):
        steps, jobs = engine.stats.steps, engine.stats.job_seconds_total
        engine.run_once()
        assert engine.stats.steps == steps + 1 and engine.stats.job_seconds_total == jobs
        clock.now = session.first_audio_at + session.audio_out  # still nothing ahead
    assert newcomer.state is None
    # Seconds ahead: the newcomer's preparation goes on, block by block, between steps as needed.
    clock.now = session.first_audio_at + session.audio_out - 5.0
    steps = engine.stats.steps
    while newcomer.state is None or newcomer not in engine.active:
        assert session.lead(clock.now) - engine.unit_cost >= engine.lead_floor
        engine.run_once()
    assert engine.stats.steps == steps  # no step was needed meanwhile
    session.cancel()
    newcomer.cancel()
    drain(engine)


def test_a_block_never_runs_into_the_lead_floor(engine, clock):
    """Whatever the clock says, a preparation block only starts when the lead covers it (no waiting rule)."""
    engine.max_wait = float("inf")
    session, _ = playing_answer(engine, clock)
    engine.open(question(seed=2), lambda e: None)
    rng = np.random.default_rng(0)
    for _ in range(60):
        clock.now = session.first_audio_at + session.audio_out - rng.uniform(-0.5, 1.5)
        lead, cost = session.lead(clock.now), engine.unit_cost
        jobs = engine.stats.job_seconds_total
        engine.run_once()
        ran_a_block = engine.stats.job_seconds_total != jobs
        assert not ran_a_block or lead - cost >= engine.lead_floor
    for open_job in list(engine.jobs.values()):
        open_job.cancel()
    drain(engine)


def test_a_newcomer_never_takes_a_playing_answers_turn_and_after_waiting_uses_every_spare_moment(engine, clock):
    """Past max_wait a question takes blocks down to a lead of the block's cost, never below: it waits instead."""
    session, _ = playing_answer(engine, clock)
    newcomer = engine.open(question(seed=5), lambda e: None)
    clock.now = session.first_audio_at + session.audio_out  # the listener is never ahead
    engine.run_once()  # admitted now
    waited = newcomer.queued_at + engine.max_wait + 0.1
    for _ in range(20):  # long past max_wait, nothing ahead: only steps
        clock.now = max(waited, session.first_audio_at + session.audio_out)
        steps = engine.stats.steps
        engine.run_once()
        assert engine.stats.steps == steps + 1 and newcomer.state is None
    # Ahead by less than the floor but more than a block: before max_wait only steps, after it blocks too.
    session_lead = engine.lead_floor / 2
    decisions = []
    while newcomer not in engine.active and len(decisions) < 500:
        clock.now = waited if len(decisions) >= 4 else newcomer.queued_at + 0.5
        session.first_audio_at = clock.now + session_lead - session.audio_out
        assert engine.unit_cost < session_lead
        steps = engine.stats.steps
        engine.run_once()
        decisions.append("step" if engine.stats.steps > steps else "block")
    assert newcomer in engine.active
    assert set(decisions[:4]) == {"step"}  # within max_wait the floor holds
    assert set(decisions[4:]) == {"block"}  # after it, the spare lead goes to the newcomer
    session.cancel()
    newcomer.cancel()
    drain(engine)


def test_step_costs_learn_and_extend_in_a_line():
    from miniomni.server.engine.policy import FRAME, ROOM, StepCosts

    costs = StepCosts()
    assert costs.expected(1) is None and costs.room_for_one_more(0)  # nothing known: try
    costs.add(1, 0.040)
    assert costs.expected(2) is None and costs.room_for_one_more(1)
    costs.add(2, 0.500)  # the first step with two answers (one-time set-up): replaced by the second
    costs.add(2, 0.055)
    costs.add(2, 0.060)  # a running average
    assert costs.expected(2) == pytest.approx(0.0575)
    assert costs.expected(4) == pytest.approx(0.0575 + 2 * 0.0175)  # the line through 1 and 2 answers
    assert costs.room_for_one_more(2) == (costs.expected(3) <= ROOM * FRAME)
    costs.add(3, 0.080)
    assert not costs.room_for_one_more(2) and not costs.room_for_one_more(3)


def test_step_costs_average_over_codec_cycles_not_the_last_few_steps():
    from miniomni.server.engine.policy import AVERAGED_STEPS, StepCosts

    costs = StepCosts()
    cycle = [0.045, 0.045, 0.045, 0.125]  # every fourth step also decodes the answers' audio
    for step in range(3 * AVERAGED_STEPS):
        costs.add(2, cycle[step % len(cycle)])
        if step >= AVERAGED_STEPS:  # the mean, wherever the cycle stands (the last step moved it 4 ms at most)
            assert costs.expected(2) == pytest.approx(0.065, abs=0.005)
    costs.add(2, 0.5)  # one outlier moves it by a sixteenth
    assert costs.expected(2) == pytest.approx(0.065 + (0.5 - 0.065) / AVERAGED_STEPS, abs=0.006)


def test_a_newcomer_waits_while_one_more_answer_would_break_real_time_and_never_when_alone(engine, clock):
    from miniomni.server.engine.policy import FRAME

    engine.step_costs.add(1, 0.9 * FRAME)
    engine.step_costs.add(2, 1.5 * FRAME)  # two answers at once would not keep real time here
    session, _ = playing_answer(engine, clock)  # alone, it was prepared anyway
    newcomer = engine.open(question(seed=7), lambda e: None)
    for _ in range(30):
        clock.now = session.first_audio_at + session.audio_out - 10.0  # lead to spare: only room is missing
        steps = engine.stats.steps
        engine.run_once()
        assert engine.stats.steps == steps + 1 and newcomer.state is None  # decode steps only
    session.cancel()
    while newcomer not in engine.active:  # the answer ended: the newcomer is prepared
        assert engine.run_once()
    newcomer.cancel()
    drain(engine)


def test_an_answer_that_has_not_spoken_comes_before_preparation(engine, clock):
    first: list = []
    session = engine.open(question(), first.append)
    while session.state is None or session not in engine.active:
        engine.run_once()
    newcomer = engine.open(question(seed=3), lambda e: None)
    while not any(isinstance(e, AudioChunk) for e in first):
        engine.run_once()
        assert newcomer.state is None  # not a single block before the first answer spoke
    newcomer.cancel()
    drain(engine)


def test_preparation_between_other_steps_gives_the_same_answer(omni, engine, clock):
    alone: list = []
    engine.open(question(seed=4), alone.append)
    drain(engine)
    session, _ = playing_answer(engine, clock)
    interleaved: list = []
    engine.open(question(seed=4), interleaved.append)
    rng = np.random.default_rng(1)
    while not any(isinstance(e, Done) for e in interleaved):
        clock.now = session.first_audio_at + session.audio_out - rng.uniform(-0.5, 2.0)
        engine.run_once()
    assert interleaved[-1].text_tokens == alone[-1].text_tokens
    assert interleaved[-1].audio_tokens == alone[-1].audio_tokens
    assert audio_of(interleaved) == audio_of(alone)
    text = "".join(e.text for e in interleaved if isinstance(e, TextDelta))
    assert text == interleaved[-1].text
    session.cancel()
    drain(engine)


def test_a_transcript_row_beside_the_answer_equals_the_asr_task(omni, engine):
    from miniomni.server.engine import TranscriptDelta, TranscriptDone

    request = question(seed=6)
    request.transcribe = True
    events: list = []
    engine.open(request, events.append)
    assert len(engine.free_slots) == 1  # the answer's slot and the transcript's
    drain(engine)
    done = [e for e in events if isinstance(e, TranscriptDone)]
    expected = omni.generate("asr", audio=request.audio, sample_rate=16000, max_new_tokens=TRANSCRIPT_TOKENS).text
    assert len(done) == 1 and done[0].text == expected
    assert "".join(e.text for e in events if isinstance(e, TranscriptDelta)) == expected
    answer = [e for e in events if isinstance(e, Done)]
    assert len(answer) == 1 and audio_of(events)  # the answer itself, as usual
    assert engine.active_answers == 0 and sorted(engine.free_slots) == [0, 1, 2]


def test_a_transcript_outlives_its_interrupted_answer_and_dies_with_a_dropped_one(omni, engine):
    from miniomni.server.engine import TranscriptDone

    request = question(seed=7)
    request.transcribe = True
    events: list = []
    session = engine.open(request, events.append)
    while session not in engine.active:
        engine.run_once()
    session.cancel(keep_transcript=True)  # the listener interrupted the answer
    drain(engine)
    assert [e.text for e in events if isinstance(e, TranscriptDone)] == \
        [omni.generate("asr", audio=request.audio, sample_rate=16000, max_new_tokens=TRANSCRIPT_TOKENS).text]
    dropped: list = []
    held = engine.open(request, dropped.append, hold=True)
    engine.run_once()
    held.cancel()  # a speculation dropped before it was prepared: its transcript row goes too
    drain(engine)
    assert dropped == [] and engine.active_answers == 0 and sorted(engine.free_slots) == [0, 1, 2]


def test_a_finished_answer_is_freed_without_waiting_for_the_garbage_collector(engine):
    """Callers' emits point back at their session (a cycle): the engine lets go of it, or memory climbs."""
    import gc
    import weakref

    class Caller:  # as a connection's response does: it holds the session, the session's emit holds it
        pass

    gc.disable()
    try:
        refs = []
        for seed in range(3):
            caller = Caller()
            caller.job = engine.open(question(seed=seed, steps=10), lambda event, caller=caller: None)
            refs.append(weakref.ref(caller.job))
            drain(engine)
            del caller
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()


@pytest.mark.parametrize("kernels", ["weight-only", "int8 activations"])
def test_answers_batched_equal_answers_alone(checkpoint_dir, kernels):
    """Eight answers at once (16 rows in a decode step) each equal the same answer alone: tokens and PCM."""
    import miniomni
    from miniomni import int8act

    if kernels == "int8 activations" and not int8act.available():
        pytest.skip("fbgemm's int8 products need an x86 PyTorch")
    omni = miniomni.load(checkpoint_dir, device="cpu", quantize="int8",
                         int8_activations="on" if kernels == "int8 activations" else "off")
    requests = [question(steps=20, seed=seed) for seed in range(8)]
    engine = Engine(omni, max_answers=8, start=False)
    try:
        together: list[list] = [[] for _ in requests]
        for request, sink in zip(requests, together, strict=True):
            engine.open(request, sink.append)
        drain(engine)
        assert engine.stats.steps < 8 * 20  # the answers did share decode steps
        for request, batched in zip(requests, together, strict=True):
            alone: list = []
            engine.open(request, alone.append)
            drain(engine)
            assert batched[-1].text_tokens == alone[-1].text_tokens
            assert batched[-1].audio_tokens == alone[-1].audio_tokens
            assert audio_of(batched) == audio_of(alone) and audio_of(alone)
    finally:
        engine.close()


def test_the_warm_up_learns_what_a_step_for_one_and_for_two_answers_costs(omni):
    engine = Engine(omni, max_answers=3, start=False)
    timings = engine.warm_up(seconds=0.5, steps=12)
    assert timings.steps == 12 and timings.step_ms_median > 0
    assert set(engine.step_costs.seconds) == {1, 2} and min(engine.step_costs.seconds.values()) > 0
    assert engine.stats.steps == 0 and engine.stats.answers_started == 0  # the counters start afresh
    assert sorted(engine.free_slots) == [0, 1, 2] and not engine.jobs
    engine.close()
