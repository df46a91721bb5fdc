"""The gateway's Prometheus metrics, in a registry of its own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FIRST_AUDIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gateway_requests", "HTTP requests answered", ["route", "status"], registry=self.registry)
        self.errors = Counter("gateway_errors", "requests answered with an error body", ["status"], registry=self.registry)
        self.first_audio = Histogram(
            "gateway_time_to_first_audio_seconds", "from a request's arrival to its first audio chunk from Triton", ["route"],
            buckets=FIRST_AUDIO_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.audio_seconds = Counter("gateway_audio_seconds", "seconds of audio received from Triton", registry=self.registry)
        self.streams = Gauge("gateway_streams", "requests generating now", registry=self.registry)
        self.cancelled = Counter("gateway_cancelled_streams", "streams whose client went away before their end", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
