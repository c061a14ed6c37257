"""Prometheus metrics of one app, in their own registry (two apps in a process never mix counts)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latencies of a diffusion server run from milliseconds (errors, 429s) to minutes (big batches).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)

ROUTES = ("/health", "/ready", "/metrics", "/v1/models", "/v1/models/{model}", "/v1/images/generations")


class Metrics:
    """Counters, gauges and histograms the server updates; ``render()`` is the /metrics body.

    Names: ``smash_requests_total{route,method,status}``, ``smash_request_duration_seconds{route}``,
    ``smash_queue_depth``, ``smash_generations_in_progress``, ``smash_images_generated_total``,
    ``smash_generation_duration_seconds``, ``smash_jobs_total{outcome}``, ``smash_ready``,
    ``smash_load_seconds``, ``smash_warmup_seconds``.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "smash_requests", "HTTP requests answered, by route and status code.", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "smash_request_duration_seconds", "Time from request to response, by route.", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("smash_queue_depth", "Generation requests waiting for the worker.", registry=r)
        self.in_progress = Gauge("smash_generations_in_progress", "Generations running now (0 or 1).", registry=r)
        self.images = Counter("smash_images_generated", "Images generated for requests (not warm-up).", registry=r)
        self.generation = Histogram(
            "smash_generation_duration_seconds", "Time the worker spent on one request's batch.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.jobs = Counter(
            "smash_jobs", "Generation jobs by outcome: completed, failed, cancelled (never ran), "
            "discarded (ran, but the request had timed out or gone).", ["outcome"], registry=r,
        )
        self.ready = Gauge("smash_ready", "1 when the server is ready to generate.", registry=r)
        self.load_seconds = Gauge("smash_load_seconds", "Seconds spent loading the artifact.", registry=r)
        self.warmup_seconds = Gauge("smash_warmup_seconds", "Seconds spent in warm-up.", registry=r)

    @staticmethod
    def route_label(path: str) -> str:
        """The route template for a path; unknown paths share one label so scanners cannot blow up cardinality."""
        if path in ROUTES:
            return path
        if path.startswith("/v1/models/") and path.count("/") == 3:
            return "/v1/models/{model}"
        return "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
