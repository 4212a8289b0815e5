"""Prometheus metrics of the server, per served model (the base or an adapter): requests, tokens, time to first
token, time per output token and request latency as histograms, and the engine's queue depth and running requests.

prometheus_client does the bookkeeping and the text format; each app has its own registry (no process-wide
state, so apps in tests do not share counts). Times come from the engine's events (Event.time, stamped when the
token was sampled) and the handle's submit time, not from when the HTTP side happened to read them.
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        label = ["model"]
        self.requests = Counter("lorakit_requests", "Choices finished, by finish reason", ["model", "finish_reason"],
                                registry=self.registry)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens of finished requests", label,
                                     registry=self.registry)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated", label,
                                         registry=self.registry)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "From submission to the first token", label,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("lorakit_time_per_output_token_seconds", "Between consecutive tokens of a choice",
                              label, buckets=TOKEN_BUCKETS, registry=self.registry)
        self.latency = Histogram("lorakit_request_seconds", "From submission to the last token", label,
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Gauge("lorakit_queue_length", "Requests waiting for a batch slot", registry=self.registry)
        self.running = Gauge("lorakit_requests_running", "Requests in the running batch", registry=self.registry)

    def finished(self, model: str, submitted: float, times: list[float], finish: str | None, prompt_tokens: int) \
            -> None:
        """One choice done: `times` are its events' times (one token each), `submitted` its handle's."""
        self.requests.labels(model, finish or "unknown").inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(len(times))
        if times:
            self.ttft.labels(model).observe(times[0] - submitted)
            self.latency.labels(model).observe(times[-1] - submitted)
            for before, after in zip(times, times[1:]):
                self.tpot.labels(model).observe(after - before)

    def exposition(self, engine_metrics: dict[str, Any]) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format, the engine's gauges read now."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.queue.set(engine_metrics.get("queue_length", 0))
        self.running.set(engine_metrics.get("requests_running", 0))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def wants_prometheus(accept: str) -> bool:
    """A Prometheus scraper asks for the text format (or OpenMetrics); anyone else gets the JSON summary."""
    return "text/plain" in accept or "openmetrics" in accept
