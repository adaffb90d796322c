"""The server's Prometheus metrics (`GET /metrics`), each app with a registry of its own.

Requests are counted by an ASGI middleware (`CountRequests`, the status the response
started with); token latencies are measured from the arrival times of each request's
events (`RequestTimer`); the engine's queue, running sequences and stage busy fractions are
read from `Engine.stats()` at each scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ppinfer.pipeline.sequence import Event, Finished
from ppinfer.serving.engine import Engine

CONTENT_TYPE = CONTENT_TYPE_LATEST
CLIENT_GONE = 499
"""The status counted for a request whose client left before its answer was complete."""
ABANDONED = "ppinfer_abandoned"
"""Set in a request's state (`request.state`) when its client left a stream before its end."""
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ppinfer_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("ppinfer_prompt_tokens", "Prompt tokens of accepted requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("ppinfer_generation_tokens", "Tokens generated.", registry=self.registry)
        self.time_to_first_token = Histogram(
            "ppinfer_time_to_first_token_seconds", "From a request's arrival to its first generated text.",
            buckets=TTFT_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "ppinfer_inter_token_latency_seconds", "Between two generated tokens of one request.",
            buckets=ITL_BUCKETS, registry=self.registry)

    def watch(self, engine: Engine) -> None:
        """Read the engine's gauges at every scrape."""
        self.registry.register(_EngineGauges(engine))

    def timer(self, arrived: float) -> RequestTimer:
        """The latency observer of a request that arrived at `arrived` (time.monotonic)."""
        return RequestTimer(self, arrived)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one request's events, in order, from the engine's thread (`bridge.Observer`).
    k tokens arriving together after a gap of t count as k inter-token latencies of t/k; the
    first of a request counts as its time to first token instead (t). A `Finished` carries
    the tokens no delta did (held-back text, or the token that ended the request)."""

    def __init__(self, metrics: ServerMetrics, arrived: float) -> None:
        self._metrics, self._last = metrics, arrived
        self._seen = 0  # tokens observed so far

    def __call__(self, event: Event, now: float) -> None:
        if isinstance(event, Finished):
            # The tokens no delta carried (held back, or the one that ended the request).
            self._observe(event.completion_tokens - self._seen, now)
            self._metrics.generation_tokens.inc(event.completion_tokens)
        else:
            self._observe(len(event.token_ids), now)

    def _observe(self, tokens: int, now: float) -> None:
        """`tokens` more arrived at `now`: the first of a request is its time to first token."""
        if tokens <= 0:
            return
        gaps = tokens
        if self._seen == 0:
            self._metrics.time_to_first_token.observe(now - self._last)
            gaps -= 1
        for _ in range(gaps):
            self._metrics.inter_token_latency.observe((now - self._last) / tokens)
        self._seen += tokens
        self._last = now


class _EngineGauges(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        yield GaugeMetricFamily("ppinfer_queue_length", "Requests waiting for a slot.", value=stats.waiting)
        yield GaugeMetricFamily("ppinfer_running_sequences", "Sequences being generated.", value=stats.running)
        yield GaugeMetricFamily("ppinfer_kv_blocks_used", "KV cache blocks held by sequences (each stage alike).",
                                value=stats.kv.blocks_used)
        yield GaugeMetricFamily("ppinfer_kv_blocks_total", "KV cache blocks of each stage's pool.",
                                value=stats.kv.blocks_total)
        yield GaugeMetricFamily("ppinfer_prefix_cache_hit_rate",
                                "Share of admitted prompt tokens found in cached KV blocks.",
                                value=stats.kv.prefix_hit_rate)
        yield CounterMetricFamily("ppinfer_kv_preemptions", "Sequences preempted for want of KV blocks "
                                  "(their blocks freed, recomputed later).", value=stats.kv.preemptions)
        busy = GaugeMetricFamily("ppinfer_stage_busy_fraction",
                                 "Fraction of the uptime each pipeline stage spent computing.", labels=["stage"])
        for stage, seconds in enumerate(stats.stage_busy_seconds):
            busy.add_metric([str(stage)], seconds / stats.uptime_s if stats.uptime_s > 0 else 0.0)
        yield busy


class CountRequests:
    """ASGI middleware: counts each request to a /v1 route by its route and response status
    (499 when the client left before a response started, or left a stream before its end)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = CLIENT_GONE

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = 500
            raise
        finally:
            if scope.get("state", {}).get(ABANDONED):
                status = CLIENT_GONE
            route = scope.get("route")
            endpoint = getattr(route, "path", "")
            if endpoint.startswith("/v1/"):
                self.metrics.requests.labels(endpoint, str(status)).inc()
