"""``/metrics``: what an operator watches, in the Prometheus format (``prometheus_client``).

Histograms of the time to first audio and of the decode step (so p50 and p99 can be
read), answers by outcome, open connections, the engine's counters, and the process
metrics ``prometheus_client`` provides on Linux (resident memory, CPU seconds, open
files). Each app has its own registry, so several servers can live in one process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector(Collector):
    """The engine's own counters and gauges, read when /metrics is."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine, stats = self.engine, self.engine.stats
        yield GaugeMetricFamily("miniomni_active_answers", "Answers being prepared, decoded or finished off.",
                                value=engine.active_answers)
        yield GaugeMetricFamily("miniomni_queued_answers", "Answers waiting for their prompt to be prepared.",
                                value=engine.queued_answers)
        yield GaugeMetricFamily("miniomni_max_answers", "Concurrent answers allowed.", value=engine.max_answers)
        yield GaugeMetricFamily("miniomni_free_slots", "Answer slots free now.", value=len(engine.free_slots))
        yield CounterMetricFamily("miniomni_decode_steps", "Batched decode steps run.", value=stats.steps)
        yield CounterMetricFamily("miniomni_preparation_seconds",
                                  "Time spent preparing questions (Whisper, prefill).", value=stats.job_seconds_total)
        answers = CounterMetricFamily("miniomni_answers", "Answers by outcome.", labels=["result"])
        for result, value in (("finished", stats.answers_finished), ("failed", stats.answers_failed),
                              ("rejected_busy", stats.rejected_busy)):
            answers.add_metric([result], value)
        yield answers
        speculative = CounterMetricFamily(
            "miniomni_speculative_answers", "Answers prepared while the VAD made sure a turn had ended, by outcome.",
            labels=["result"])
        for result, value in (("started", stats.speculative_started), ("used", stats.speculative_used),
                              ("dropped", stats.speculative_dropped)):
            speculative.add_metric([result], value)
        yield speculative


class ServerMetrics:
    """The registry behind ``/metrics``; the engine reports step times and first audio to it."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        self.step_seconds = Histogram(
            "miniomni_decode_step_seconds", "Duration of a batched decode step (sampling and the codec included).",
            buckets=(0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0), registry=self.registry)
        self.first_audio_seconds = Histogram(
            "miniomni_time_to_first_audio_seconds",
            "From an answer's start (its commit, for one prepared during the VAD's silence) to its first audio.",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0), registry=self.registry)
        self.connections = Gauge("miniomni_open_connections", "Open Realtime WebSocket connections.",
                                 registry=self.registry)
        self.refused = Counter("miniomni_refused_connections", "Realtime connections refused, by reason.",
                               ["reason"], registry=self.registry)
        engine.observers.append(self)

    def step(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def first_audio(self, seconds: float) -> None:
        self.first_audio_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
