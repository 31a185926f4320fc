"""Prometheus metrics with vLLM's names under the `tokenmill:` prefix, so existing vLLM dashboards fit.

One registry per server; every model's samples carry a `model_name` label. Engine gauges and counters are read
from each engine's stats snapshot at scrape time; histograms are fed by the engines (through EngineObserver) and by
the HTTP layer (rejections, routing, response-cache lookups). Each server owns its own registry.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any

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
    """Gauges and counters computed from each model's engine stats snapshot (one sample per model)."""

    def __init__(self, metrics: "ServerMetrics") -> None:
        self.metrics = metrics

    def collect(self) -> Iterator:
        snapshots = [(name, m.stats()) for name, m in self.metrics.models.items()]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

        def add(kind: type, name: str, doc: str, model: str, value: float) -> None:
            fam = families.get(name)
            if fam is None:
                fam = families[name] = kind(PREFIX + name, doc, labels=["model_name"])
            fam.add_metric([model], value)

        for model, s in snapshots:
            add(GaugeMetricFamily, "num_requests_running", "Number of requests in the running batch.", model,
                s.get("num_running", 0))
            add(GaugeMetricFamily, "num_requests_waiting", "Number of requests waiting to be scheduled.", model,
                s.get("num_waiting", 0))
            add(GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache usage: 1 means all blocks are in use.", model,
                s.get("kv_cache_usage", 0))
            add(GaugeMetricFamily, "num_kv_blocks", "Number of KV-cache blocks.", model, s.get("num_blocks", 0))
            add(GaugeMetricFamily, "num_free_kv_blocks", "Free KV-cache blocks (cached blocks included).", model,
                s.get("num_free_blocks", 0))
            add(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", model,
                s.get("prefix_cache_queries", 0))
            add(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.", model,
                s.get("prefix_cache_hits", 0))
            add(CounterMetricFamily, "num_preemptions", "Sequences preempted (recomputed later).", model,
                s.get("num_preemptions", 0))
            add(CounterMetricFamily, "prompt_tokens", "Prompt tokens accepted.", model, s.get("prompt_tokens", 0))
            add(CounterMetricFamily, "generation_tokens", "Tokens generated.", model, s.get("generation_tokens", 0))
            if "async_steps" in s:  # async scheduling on
                add(CounterMetricFamily, "async_steps",
                    "Decode steps launched before the previous step's tokens reached the host.", model, s["async_steps"])
            if "spec_decode_num_drafts" in s:  # speculative decoding on
                add(CounterMetricFamily, "spec_decode_num_drafts",
                    "Speculative verifications (one per sequence per step).", model, s["spec_decode_num_drafts"])
                add(CounterMetricFamily, "spec_decode_num_draft_tokens", "Proposed tokens verified by the target model.",
                    model, s["spec_decode_num_draft_tokens"])
                add(CounterMetricFamily, "spec_decode_num_accepted_tokens", "Proposed tokens accepted.", model,
                    s["spec_decode_num_accepted_tokens"])
                add(GaugeMetricFamily, "spec_decode_acceptance_rate", "Accepted / proposed tokens since start.", model,
                    s["spec_decode_acceptance_rate"])
                add(GaugeMetricFamily, "spec_decode_mean_accepted_length",
                    "Tokens produced per verification (accepted + 1).", model, s["spec_decode_mean_accepted_length"])
        yield from families.values()
        cache = self.metrics.response_cache
        if cache is not None:
            st = cache.stats()
            for name, doc, kind in (("response_cache_hits", "Requests answered from the response cache.", CounterMetricFamily),
                                    ("response_cache_misses", "Cacheable requests not found in the response cache.", CounterMetricFamily),
                                    ("response_cache_evictions", "Entries evicted from the response cache (LRU or TTL).", CounterMetricFamily),
                                    ("response_cache_bytes", "Bytes held by the response cache.", GaugeMetricFamily),
                                    ("response_cache_entries", "Entries in the response cache.", GaugeMetricFamily)):
                fam = kind(PREFIX + name, doc, labels=["backend"])
                fam.add_metric([cache.backend_name], st[name.removeprefix("response_cache_")])
                yield fam
        rss = _process_rss_bytes()
        if rss is not None:
            g = GaugeMetricFamily(PREFIX + "process_memory_bytes", "Resident memory of the server process.")
            g.add_metric([], rss)
            yield g
        yield from _nvml_metrics()


class ServerMetrics:
    """All metrics of one server: one Prometheus registry, every sample labelled with its model's name. Each model
    gets a ModelMetrics (its engine's observer) from `add_model`."""

    def __init__(self) -> None:
        self.models: dict[str, ModelMetrics] = {}
        self.response_cache: Any = None  # a ResponseCache, when the server has one
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(self))
        try:
            ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, fds
        except Exception:  # not on Linux
            logger.debug("process metrics unavailable", exc_info=True)
        labels = ["model_name"]
        reg = self.registry

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=reg)

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
        self.routed = Counter(PREFIX + "requests_routed", "Requests sent to a model, by how it was chosen "
                              "(explicit, alias, rule name, default, fallback).", ["model_name", "route"], registry=reg)
        self.response_cache_lookups = Counter(PREFIX + "response_cache_lookups", "Response-cache lookups by result.",
                                              ["model_name", "result"], registry=reg)

    def add_model(self, name: str, stats: Callable[[], dict[str, float]]) -> "ModelMetrics":
        m = ModelMetrics(self, name, stats)
        self.models[name] = m
        return m

    def reject(self, model: str, reason: str) -> None:
        self.rejected.labels(model, reason).inc()

    def http_response(self, model: str, endpoint: str, status: int) -> None:
        self.http_requests.labels(model, endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics(EngineObserver):
    """One model's view of the server metrics: the observer of its engine, and what the HTTP layer reports for it.
    Also keeps the recent raw events (TTFT, ITL, finished requests, response-cache lookups, prompt prefixes) that
    the performance monitor reads."""

    RECENT = 4096  # events kept per kind for the monitor

    def __init__(self, parent: ServerMetrics, name: str, stats: Callable[[], dict[str, float]]) -> None:
        self.parent = parent
        self.model_name = name
        self.stats = stats
        self.baseline = dict(stats())  # counters when the model started serving: the monitor's first deltas
        p = parent
        self.ttft = p.ttft.labels(name)
        self.itl = p.itl.labels(name)
        self.e2e = p.e2e.labels(name)
        self.queue_time = p.queue_time.labels(name)
        self.iteration_tokens = p.iteration_tokens.labels(name)
        self.prompt_len = p.prompt_len.labels(name)
        self.gen_len = p.gen_len.labels(name)
        # (monotonic time, value) events for the monitor; deques are thread-safe for append/iteration snapshots
        self.recent_ttft: deque[tuple[float, float]] = deque(maxlen=self.RECENT)
        self.recent_itl: deque[tuple[float, float]] = deque(maxlen=self.RECENT)
        self.recent_finished: deque[tuple[float, int]] = deque(maxlen=self.RECENT)  # (t, output tokens)
        self.recent_cache: deque[tuple[float, bool]] = deque(maxlen=self.RECENT)  # (t, hit)
        self.recent_prefixes: deque[tuple[float, bool]] = deque(maxlen=self.RECENT)  # (t, shared a prefix)
        self._seen_prefixes: OrderedDict[int, None] = OrderedDict()

    # ---- EngineObserver (engine thread, or replayed from the engine process) --------------------------------
    def on_step(self, num_tokens: int, duration_s: float, stats: dict[str, float]) -> None:
        if num_tokens:
            self.iteration_tokens.observe(num_tokens)

    def on_new_tokens(self, request_id: str, num_tokens: int, interval_s: float) -> None:
        self.itl.observe(interval_s)
        self.recent_itl.append((time.monotonic(), interval_s))

    def on_request_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        now = time.monotonic()
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
            self.recent_ttft.append((now, m.ttft))
        if m.queue_time is not None:
            self.queue_time.observe(m.queue_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        generated = sum(len(c.token_ids) for c in output.outputs)
        self.prompt_len.observe(len(output.prompt_token_ids))
        self.gen_len.observe(generated)
        reasons = {c.finish_reason or "abort" for c in output.outputs}
        reason = next(iter(reasons)) if len(reasons) == 1 else "stop" if reasons <= {"stop", "length"} else "abort"
        self.parent.success.labels(self.model_name, reason).inc()
        self.recent_finished.append((now, generated))

    # ---- HTTP layer -----------------------------------------------------------------------------------------
    def reject(self, reason: str) -> None:
        self.parent.reject(self.model_name, reason)

    def routed(self, route: str) -> None:
        self.parent.routed.labels(self.model_name, route).inc()

    def cache_lookup(self, result: str) -> None:
        """result: hit | miss | bypass."""
        self.parent.response_cache_lookups.labels(self.model_name, result).inc()
        if result != "bypass":
            self.recent_cache.append((time.monotonic(), result == "hit"))

    def prompt_seen(self, token_ids: list[int], prefix_tokens: int = 32) -> None:
        """Notes whether the prompt's first `prefix_tokens` tokens were seen in a recent prompt (the monitor
        compares that with the prefix cache's hit rate)."""
        if len(token_ids) < prefix_tokens:
            return
        h = hash(tuple(token_ids[:prefix_tokens]))
        shared = h in self._seen_prefixes
        self._seen_prefixes[h] = None
        self._seen_prefixes.move_to_end(h)
        if len(self._seen_prefixes) > self.RECENT:
            self._seen_prefixes.popitem(last=False)
        self.recent_prefixes.append((time.monotonic(), shared))


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


def gpu_readings() -> list[dict[str, float]]:
    """Per NVIDIA GPU: utilisation (0-1), memory used and total (bytes); [] without NVML or a GPU."""
    handles = _nvml_handles()
    if not handles:
        return []
    import pynvml

    out = []
    for h in handles:
        try:
            u = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        except Exception:
            continue
        out.append({"util": u.gpu / 100.0, "memory_used": float(mem.used), "memory_total": float(mem.total)})
    return out


def _nvml_metrics() -> Iterator[GaugeMetricFamily]:
    readings = gpu_readings()
    if not readings:
        return
    util = GaugeMetricFamily(PREFIX + "gpu_utilization_perc", "GPU utilisation (0-1).", labels=["gpu"])
    used = GaugeMetricFamily(PREFIX + "gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
    total = GaugeMetricFamily(PREFIX + "gpu_memory_total_bytes", "GPU memory.", labels=["gpu"])
    for i, r in enumerate(readings):
        util.add_metric([str(i)], r["util"])
        used.add_metric([str(i)], r["memory_used"])
        total.add_metric([str(i)], r["memory_total"])
    yield util
    yield used
    yield total
