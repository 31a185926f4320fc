"""Prometheus metrics with vLLM's names under the `tokenmill:` prefix, so existing vLLM dashboards fit.

Engine gauges and counters are read from the AsyncEngine's stats snapshot at scrape time; histograms are fed by
the engine thread (through EngineObserver) and by the HTTP layer (rejections). Each server owns its own registry.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.async_engine import EngineObserver
from ..engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

PREFIX = "tokenmill:"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class _EngineCollector(Collector):
    """Gauges and counters computed from the engine's stats snapshot."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, float]]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator:
        s = self.stats()
        label = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        yield gauge("num_requests_running", "Number of requests in the running batch.", s.get("num_running", 0))
        yield gauge("num_requests_waiting", "Number of requests waiting to be scheduled.", s.get("num_waiting", 0))
        yield gauge("kv_cache_usage_perc", "KV-cache usage: 1 means all blocks are in use.", s.get("kv_cache_usage", 0))
        yield gauge("num_kv_blocks", "Number of KV-cache blocks.", s.get("num_blocks", 0))
        yield gauge("num_free_kv_blocks", "Free KV-cache blocks (cached blocks included).", s.get("num_free_blocks", 0))
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.get("prefix_cache_queries", 0))
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.get("prefix_cache_hits", 0))
        yield counter("num_preemptions", "Sequences preempted (recomputed later).", s.get("num_preemptions", 0))
        yield counter("prompt_tokens", "Prompt tokens accepted.", s.get("prompt_tokens", 0))
        yield counter("generation_tokens", "Tokens generated.", s.get("generation_tokens", 0))
        if "spec_decode_num_drafts" in s:  # speculative decoding on
            yield counter("spec_decode_num_drafts", "Speculative verifications (one per sequence per step).",
                          s["spec_decode_num_drafts"])
            yield counter("spec_decode_num_draft_tokens", "Proposed tokens verified by the target model.",
                          s["spec_decode_num_draft_tokens"])
            yield counter("spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                          s["spec_decode_num_accepted_tokens"])
            yield gauge("spec_decode_acceptance_rate", "Accepted / proposed tokens since start.",
                        s["spec_decode_acceptance_rate"])
            yield gauge("spec_decode_mean_accepted_length", "Tokens produced per verification (accepted + 1).",
                        s["spec_decode_mean_accepted_length"])
        rss = _process_rss_bytes()
        if rss is not None:
            yield gauge("process_memory_bytes", "Resident memory of the server process.", rss)
        yield from _nvml_metrics(self.model_name)


class ServerMetrics(EngineObserver):
    """All metrics of one server (one model)."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, float]]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(model_name, stats))
        try:
            ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, fds
        except Exception:  # not on Linux
            logger.debug("process metrics unavailable", exc_info=True)
        labels = ["model_name"]
        reg = self.registry

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens.", _LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Time a request waited before its first step.", _LATENCY_BUCKETS)
        self.iteration_tokens = hist("iteration_tokens_total", "Tokens computed per engine step.", _TOKEN_BUCKETS)
        self.prompt_len = hist("request_prompt_tokens", "Prompt length of finished requests.", _TOKEN_BUCKETS)
        self.gen_len = hist("request_generation_tokens", "Generated tokens of finished requests.", _TOKEN_BUCKETS)
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=reg)
        self.rejected = Counter(PREFIX + "request_rejected", "Requests refused before reaching the engine, by reason.",
                                ["model_name", "reason"], registry=reg)
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP API responses by endpoint and status.",
                                     ["model_name", "endpoint", "status"], registry=reg)

    # ---- EngineObserver (engine thread) -----------------------------------------------------------------------
    def on_step(self, num_tokens: int, duration_s: float, stats: dict[str, float]) -> None:
        if num_tokens:
            self.iteration_tokens.observe(num_tokens)

    def on_new_tokens(self, request_id: str, num_tokens: int, interval_s: float) -> None:
        self.itl.observe(interval_s)

    def on_request_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.queue_time is not None:
            self.queue_time.observe(m.queue_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        self.prompt_len.observe(len(output.prompt_token_ids))
        self.gen_len.observe(sum(len(c.token_ids) for c in output.outputs))
        reasons = {c.finish_reason or "abort" for c in output.outputs}
        reason = next(iter(reasons)) if len(reasons) == 1 else "stop" if reasons <= {"stop", "length"} else "abort"
        self.success.labels(self.model_name, reason).inc()

    # ---- HTTP layer -----------------------------------------------------------------------------------------
    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def http_response(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(self.model_name, endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _process_rss_bytes() -> float | None:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return float(psutil.Process().memory_info().rss)
        except Exception:
            return None


_nvml_state: dict[str, object] = {}


def _nvml_handles() -> list:
    """NVML device handles, or [] when pynvml is missing or there is no NVIDIA GPU (checked once)."""
    if "handles" not in _nvml_state:
        handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:
            handles = []
        _nvml_state["handles"] = handles
    return _nvml_state["handles"]  # type: ignore[return-value]


def _nvml_metrics(model_name: str) -> Iterator[GaugeMetricFamily]:
    handles = _nvml_handles()
    if not handles:
        return
    import pynvml

    util = GaugeMetricFamily(PREFIX + "gpu_utilization_perc", "GPU utilisation (0-1).", labels=["model_name", "gpu"])
    used = GaugeMetricFamily(PREFIX + "gpu_memory_used_bytes", "GPU memory in use.", labels=["model_name", "gpu"])
    total = GaugeMetricFamily(PREFIX + "gpu_memory_total_bytes", "GPU memory.", labels=["model_name", "gpu"])
    for i, h in enumerate(handles):
        try:
            u = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        except Exception:
            continue
        util.add_metric([model_name, str(i)], u.gpu / 100.0)
        used.add_metric([model_name, str(i)], mem.used)
        total.add_metric([model_name, str(i)], mem.total)
    yield util
    yield used
    yield total
