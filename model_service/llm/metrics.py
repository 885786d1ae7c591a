"""Prometheus metrics of the engine, with the names vLLM and TGI users already chart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, model_name: str = "") -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.time_to_first_token = Histogram(
            "model_service_time_to_first_token_seconds", "Time from arrival to the first generated token.",
            labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.inter_token_latency = Histogram(
            "model_service_inter_token_latency_seconds", "Time between consecutive tokens of one request.",
            labels, buckets=_TOKEN_BUCKETS, registry=r).labels(model_name)
        self.e2e_request_latency = Histogram(
            "model_service_e2e_request_latency_seconds", "Time from arrival to the end of a request.",
            labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.request_queue_time = Histogram(
            "model_service_request_queue_time_seconds", "Time a request waited before its prefill.",
            labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.num_requests_running = Gauge(
            "model_service_num_requests_running", "Sequences in the running batch.", labels,
            registry=r).labels(model_name)
        self.num_requests_waiting = Gauge(
            "model_service_num_requests_waiting", "Requests queued for admission to the batch.", labels,
            registry=r).labels(model_name)
        self.kv_cache_usage = Gauge(
            "model_service_kv_cache_usage_perc", "Share of the KV cache slots (--max-running-requests) held by "
            "requests being prefilled or generating, 0 to 1 (vLLM's kv_cache_usage_perc).", labels,
            registry=r).labels(model_name)
        self.prompt_tokens = Counter(
            "model_service_prompt_tokens", "Prompt tokens prefilled.", labels, registry=r).labels(model_name)
        self.generation_tokens = Counter(
            "model_service_generation_tokens", "Tokens generated.", labels, registry=r).labels(model_name)
        self._finished = Counter(
            "model_service_requests_finished", "Requests ended, by finish reason.",
            labels + ["finish_reason"], registry=r)
        self._rejected = Counter(
            "model_service_requests_rejected", "Requests refused at admission, by reason.",
            labels + ["reason"], registry=r)
        self.batch_size = Histogram(
            "model_service_batch_size", "Sequences per decode step.", labels,
            buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128), registry=r).labels(model_name)
        self._model_name = model_name

    def finished(self, reason: str) -> None:
        self._finished.labels(self._model_name, reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self._model_name, reason).inc()
