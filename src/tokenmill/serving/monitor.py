"""Performance monitor: rolling per-model series sampled once an interval (output tokens/s, TTFT, ITL, queue depth,
running batch, KV-cache use, preemptions, prefix-cache and response-cache hit rates, speculative acceptance) and
system ones (CPU or GPU utilisation, memory), plus an analyser that turns the latest window into findings: what is
wrong, the likely cause, the fix, a priority, and the numbers that triggered it. Served as GET /v1/monitor."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from .metrics import ModelMetrics, gpu_readings

if TYPE_CHECKING:
    from .registry import ModelRegistry

logger = logging.getLogger(__name__)

SERIES = ("output_tokens_per_s", "requests_per_s", "ttft_p50_s", "itl_p50_s", "queue_depth", "running",
          "kv_cache_usage", "preemptions_per_min", "prefix_cache_hit_rate", "response_cache_hit_rate",
          "spec_acceptance_rate")
_PRIORITY = {"high": 0, "medium": 1, "low": 2}


@dataclass
class MonitorThresholds:
    """When the analyser reports a finding; every threshold can be set in models.yaml's `monitor` section."""

    window_s: float = 30.0  # the window the findings and the "current" values look at
    min_tokens_per_s: float = 10.0  # low throughput: below this while requests run
    ttft_high_s: float = 2.0  # high TTFT: median above this
    low_utilization: float = 0.5  # low utilisation: CPU/GPU busy below this while requests run
    queue_min_depth: int = 4  # growing queue: at least this deep and rising
    preemptions_per_min: float = 5.0  # frequent preemption: more than this
    kv_cache_full: float = 0.9  # KV cache near full: usage at or above this
    prefix_shared_min: float = 0.5  # low prefix-cache hits: at least this share of prompts share a prefix ...
    prefix_hit_low: float = 0.2  # ... and the prefix cache finds less than this share of prompt tokens
    spec_acceptance_low: float = 0.3  # speculation accepting less than this share of proposals
    min_requests: int = 3  # request-statistics findings need this many requests in the window

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"monitor window_s must be positive, got {self.window_s}")
        for name in ("low_utilization", "kv_cache_full", "prefix_shared_min", "prefix_hit_low", "spec_acceptance_low"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"monitor {name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class Finding:
    kind: str
    priority: str  # high | medium | low
    issue: str
    cause: str
    fix: str
    evidence: dict[str, Any]
    model: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median(values: list[float]) -> float | None:
    return _percentile(values, 0.5)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


@dataclass
class _ModelHistory:
    samples: deque  # of dicts: t, mono, counters and the SERIES values
    last: dict[str, float] = field(default_factory=dict)  # counters at the previous sample


class PerformanceMonitor:
    """Samples every model of the registry each `interval_s` and keeps `history_s` of series."""

    def __init__(self, registry: "ModelRegistry", thresholds: MonitorThresholds | None = None,
                 interval_s: float = 1.0, history_s: float = 300.0) -> None:
        self.registry = registry
        self.thresholds = thresholds or MonitorThresholds()
        self.interval_s = interval_s
        self.history_s = history_s
        n = max(2, int(history_s / interval_s))
        self._models: dict[str, _ModelHistory] = {}
        self._system: deque = deque(maxlen=n)
        self._maxlen = n
        self._task: asyncio.Task | None = None
        self._proc: Any = None
        self._last_mono: float | None = None

    # ---- sampling ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        self.sample()  # the baseline for the first interval's rates
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.sample()
            except Exception:
                logger.exception("monitor sample failed")

    def sample(self) -> None:
        now_mono, now = time.monotonic(), time.time()
        since = self._last_mono
        dt = now_mono - since if since is not None else None
        self._last_mono = now_mono
        for m in self.registry.models.values():
            if m.metrics is None or m.engine is None:
                continue
            hist = self._models.get(m.name)
            if hist is None:
                hist = self._models[m.name] = _ModelHistory(deque(maxlen=self._maxlen))
                hist.last = {k: float(v) for k, v in m.metrics.baseline.items()}
            hist.samples.append(self._model_sample(m.metrics, m.engine.stats(), hist, now, now_mono, since, dt))
        self._system.append(self._system_sample(now))

    def _model_sample(self, metrics: ModelMetrics, s: dict[str, float], hist: _ModelHistory, now: float,
                      now_mono: float, since: float | None, dt: float | None) -> dict[str, Any]:
        counters = {k: float(s.get(k, 0.0)) for k in (
            "generation_tokens", "num_preemptions", "prefix_cache_queries", "prefix_cache_hits",
            "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")}
        d = {k: v - hist.last.get(k, v) for k, v in counters.items()}
        hist.last = counters

        def recent(events: deque) -> list:  # events of this interval (none before the first interval)
            return [e for e in list(events) if e[0] > since] if since is not None else []

        ttfts = [v for _, v in recent(metrics.recent_ttft)]
        itls = [v for _, v in recent(metrics.recent_itl)]
        finished = len(recent(metrics.recent_finished))
        lookups = recent(metrics.recent_cache)
        hits = sum(1 for _, hit in lookups if hit)
        prefixes = recent(metrics.recent_prefixes)
        rate = (lambda x: x / dt) if dt else (lambda x: None)
        return {
            "t": now, "mono": now_mono, "dt": dt or 0.0, "tokens": d["generation_tokens"], "finished": finished,
            "ttfts": ttfts, "preemptions": d["num_preemptions"],
            "prefix_queries": d["prefix_cache_queries"], "prefix_hits": d["prefix_cache_hits"],
            "cache_lookups": len(lookups), "cache_hits": hits,
            "prompts": len(prefixes), "shared_prompts": sum(1 for _, shared in prefixes if shared),
            "spec_drafted": d["spec_decode_num_draft_tokens"], "spec_accepted": d["spec_decode_num_accepted_tokens"],
            "output_tokens_per_s": rate(d["generation_tokens"]),
            "requests_per_s": rate(finished),
            "ttft_p50_s": _median(ttfts),
            "itl_p50_s": _median(itls),
            "queue_depth": int(s.get("num_waiting", 0)),
            "running": int(s.get("num_running", 0)),
            "kv_cache_usage": float(s.get("kv_cache_usage", 0.0)),
            "preemptions_per_min": (d["num_preemptions"] * 60.0 / dt) if dt else None,
            "prefix_cache_hit_rate": _ratio(d["prefix_cache_hits"], d["prefix_cache_queries"]),
            "response_cache_hit_rate": _ratio(hits, len(lookups)),
            "spec_acceptance_rate": _ratio(d["spec_decode_num_accepted_tokens"], d["spec_decode_num_draft_tokens"]),
        }

    def _system_sample(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"t": now, "cpu_util": None, "memory_rss_bytes": None, "memory_total_bytes": None,
                               "gpu_util": None, "gpu_memory_used_bytes": None}
        try:
            if self._proc is None:
                self._proc = psutil.Process()
                psutil.cpu_percent(None)  # the first call only starts the measurement
            else:
                out["cpu_util"] = psutil.cpu_percent(None) / 100.0
            rss = self._proc.memory_info().rss
            for child in self._proc.children(recursive=True):  # the engine processes
                try:
                    rss += child.memory_info().rss
                except psutil.Error:
                    pass
            out["memory_rss_bytes"] = rss
            out["memory_total_bytes"] = psutil.virtual_memory().total
        except (psutil.Error, OSError):  # a platform psutil cannot read
            pass
        gpus = gpu_readings()
        if gpus:
            out["gpu_util"] = sum(g["util"] for g in gpus) / len(gpus)
            out["gpu_memory_used_bytes"] = sum(g["memory_used"] for g in gpus)
        return out

    # ---- reading ----------------------------------------------------------------------------------------------
    def snapshot(self, window_s: float | None = None) -> dict[str, Any]:
        """The JSON of GET /v1/monitor: per model health, current values and series; system; findings."""
        window_s = min(float(window_s), self.history_s) if window_s else self.history_s
        now = time.time()
        models: dict[str, Any] = {}
        for m in self.registry.models.values():
            samples = [s for s in self._samples(m.name) if s["t"] >= now - window_s]
            models[m.name] = {
                "health": m.health(),
                "current": self.current(m.name),
                "series": {"t": [s["t"] for s in samples], **{k: [s[k] for s in samples] for k in SERIES}},
            }
        sys_samples = [s for s in self._system if s["t"] >= now - window_s]
        keys = ("cpu_util", "memory_rss_bytes", "memory_total_bytes", "gpu_util", "gpu_memory_used_bytes")
        system = {"current": {k: (sys_samples[-1][k] if sys_samples else None) for k in keys},
                  "series": {"t": [s["t"] for s in sys_samples],
                             **{k: [s[k] for s in sys_samples] for k in ("cpu_util", "memory_rss_bytes", "gpu_util")}}}
        return {"time": now, "window_s": window_s, "interval_s": self.interval_s, "models": models, "system": system,
                "findings": [f.as_dict() for f in self.findings()]}

    def _samples(self, name: str) -> list[dict[str, Any]]:
        hist = self._models.get(name)
        return list(hist.samples) if hist is not None else []

    def _window(self, name: str) -> list[dict[str, Any]]:
        cutoff = time.monotonic() - self.thresholds.window_s
        return [s for s in self._samples(name) if s["mono"] >= cutoff and s["dt"] > 0]

    def current(self, name: str) -> dict[str, Any]:
        """The model's values over the analysis window (rates, percentiles) or at the latest sample (gauges)."""
        w = self._window(name)
        span = sum(s["dt"] for s in w)
        ttfts = [v for s in w for v in s["ttfts"]]
        last = w[-1] if w else None
        return {
            "output_tokens_per_s": _ratio(sum(s["tokens"] for s in w), span),
            "requests_per_s": _ratio(sum(s["finished"] for s in w), span),
            "ttft_p50_s": _median(ttfts),
            "ttft_p99_s": _percentile(ttfts, 0.99),
            "itl_p50_s": _median([s["itl_p50_s"] for s in w if s["itl_p50_s"] is not None]),
            "queue_depth": last["queue_depth"] if last else 0,
            "running": last["running"] if last else 0,
            "kv_cache_usage": last["kv_cache_usage"] if last else 0.0,
            "preemptions_per_min": _ratio(sum(s["preemptions"] for s in w) * 60.0, span),
            "prefix_cache_hit_rate": _ratio(sum(s["prefix_hits"] for s in w), sum(s["prefix_queries"] for s in w)),
            "response_cache_hit_rate": _ratio(sum(s["cache_hits"] for s in w), sum(s["cache_lookups"] for s in w)),
            "spec_acceptance_rate": _ratio(sum(s["spec_accepted"] for s in w), sum(s["spec_drafted"] for s in w)),
            "requests_in_window": sum(s["finished"] for s in w),
            "prompts_in_window": sum(s["prompts"] for s in w),
            "shared_prefix_share": _ratio(sum(s["shared_prompts"] for s in w), sum(s["prompts"] for s in w)),
            "mean_running": _mean([s["running"] for s in w]),
            "queue_slope_per_s": _slope([(s["mono"], s["queue_depth"]) for s in w]),
        }

    def findings(self) -> list[Finding]:
        """Every model's findings and the system's, highest priority first."""
        cutoff = time.time() - self.thresholds.window_s
        sys_w = [s for s in self._system if s["t"] >= cutoff]
        util_key = "gpu_util" if any(s["gpu_util"] is not None for s in sys_w) else "cpu_util"
        util = _mean([s[util_key] for s in sys_w])
        out: list[Finding] = []
        for m in self.registry.models.values():
            if m.metrics is None:
                continue
            bound = m.spec.max_queued_requests
            out += analyse(m.name, self.current(m.name), self.thresholds, util, util_key, bound)
        out.sort(key=lambda f: _PRIORITY[f.priority])
        return out


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t, y), per second."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var > 0 else None


def _r(x: float | None, nd: int = 3) -> float | None:
    return round(x, nd) if x is not None else None


def analyse(model: str, c: dict[str, Any], th: MonitorThresholds, util: float | None = None,
            util_key: str = "cpu_util", queue_bound: int | None = None) -> list[Finding]:
    """Findings for one model from its current window (`PerformanceMonitor.current`) and the system utilisation."""
    out: list[Finding] = []

    def add(kind: str, priority: str, issue: str, cause: str, fix: str, **evidence: Any) -> None:
        out.append(Finding(kind, priority, issue, cause, fix, {k: _r(v) if isinstance(v, float) else v
                                                              for k, v in evidence.items() if v is not None}, model))

    running = c["mean_running"] or 0.0
    kv = c["kv_cache_usage"]
    pre = c["preemptions_per_min"] or 0.0
    if pre > th.preemptions_per_min:
        add("frequent_preemption", "high",
            f"{pre:.1f} preemptions per minute (threshold {th.preemptions_per_min:g})",
            "the KV cache cannot hold every running sequence, so the newest are evicted and recomputed later",
            "give the model a larger KV-cache budget (memory / --kv-cache-bytes), store the cache in int8 "
            "(--kv-cache-dtype int8), or lower max_num_seqs",
            preemptions_per_min=pre, threshold=th.preemptions_per_min, kv_cache_usage=kv)
    if kv >= th.kv_cache_full:
        add("kv_cache_full", "high" if pre > 0 else "medium",
            f"KV cache {kv:.0%} full (threshold {th.kv_cache_full:.0%})",
            "long or many concurrent sequences fill the cache; new requests wait for blocks and running ones may "
            "be preempted",
            "raise the KV-cache budget, use --kv-cache-dtype int8 (about 2x the blocks), cap max_tokens, or add "
            "a replica", kv_cache_usage=kv, threshold=th.kv_cache_full, preemptions_per_min=pre)
    queue = c["queue_depth"]
    slope = c["queue_slope_per_s"]
    if queue >= th.queue_min_depth and (slope is None or slope > 0 or (queue_bound and queue >= queue_bound / 2)):
        near_full = bool(queue_bound) and queue >= queue_bound / 2
        add("growing_queue", "high" if near_full else "medium",
            f"{queue} requests waiting and the queue is {'growing' if (slope or 0) > 0 else 'not draining'}",
            "requests arrive faster than the engine finishes them (or the running batch is capped by max_num_seqs "
            "or the KV cache)",
            "raise max_num_seqs if the KV cache has room, route cheap requests to a smaller model (router rules / "
            "fallback), or add a replica; lower the queue bound to fail fast",
            queue_depth=queue, queue_slope_per_s=slope, max_queued_requests=queue_bound, running=c["running"])
    ttft = c["ttft_p50_s"]
    if ttft is not None and ttft > th.ttft_high_s and c["requests_in_window"] >= th.min_requests:
        queued = queue > 0 or (slope or 0) > 0
        add("high_ttft", "high" if ttft > 2 * th.ttft_high_s else "medium",
            f"median time to first token {ttft:.2f} s (threshold {th.ttft_high_s:g} s)",
            "requests wait in the queue before their prefill" if queued else
            "prefills are long or share steps with a large decode batch",
            "add capacity or shed load (queue bound, fallback model)" if queued else
            "lower max_num_batched_tokens so prefill chunks interleave with decodes, enable prefix caching for "
            "shared prompts, or route long prompts to a faster model",
            ttft_p50_s=ttft, ttft_p99_s=c["ttft_p99_s"], threshold_s=th.ttft_high_s, queue_depth=queue)
    tps = c["output_tokens_per_s"]
    if running >= 1 and tps is not None and tps < th.min_tokens_per_s:
        add("low_throughput", "medium",
            f"{tps:.1f} output tokens/s with {running:.1f} requests running (threshold {th.min_tokens_per_s:g})",
            "decode steps are slow: a model too large for the hardware, long prefills stalling decodes, or a busy "
            "machine",
            "quantise the weights (int8/int4), use a smaller model for easy requests, or check what else runs on "
            "the machine", output_tokens_per_s=tps, mean_running=running, threshold=th.min_tokens_per_s)
    if util is not None and running >= 1 and util < th.low_utilization:
        add("low_utilization", "medium" if queue > 0 else "low",
            f"{'GPU' if util_key == 'gpu_util' else 'CPU'} busy {util:.0%} while requests run "
            f"(threshold {th.low_utilization:.0%})",
            "the batch is too small to use the hardware (few concurrent requests, or max_num_seqs / the KV cache "
            "caps it), or per-step overhead dominates",
            "raise max_num_seqs and max_num_batched_tokens, send more concurrent requests, enable CUDA graphs / "
            "compile on GPU", **{util_key: util}, mean_running=running, queue_depth=queue,
            threshold=th.low_utilization)
    shared, hit = c["shared_prefix_share"], c["prefix_cache_hit_rate"]
    if shared is not None and shared >= th.prefix_shared_min and c["prompts_in_window"] >= th.min_requests \
            and (hit is None or hit < th.prefix_hit_low):
        add("low_prefix_cache_hits", "medium",
            f"{shared:.0%} of prompts share a prefix but the prefix cache finds {hit or 0:.0%} of prompt tokens",
            "prefix caching is off, or cached blocks are evicted before they are reused (KV cache too small)",
            "enable prefix caching (drop --no-prefix-caching), give the KV cache more memory, and keep shared "
            "system prompts byte-identical", shared_prefix_share=shared, prefix_cache_hit_rate=hit,
            threshold=th.prefix_hit_low)
    acc = c["spec_acceptance_rate"]
    if acc is not None and acc < th.spec_acceptance_low:
        add("low_spec_acceptance", "low",
            f"speculative decoding accepts {acc:.0%} of proposed tokens (threshold {th.spec_acceptance_low:.0%})",
            "the draft (or n-gram lookup) rarely predicts this traffic, so verification work is wasted",
            "use fewer speculative tokens (--num-speculative-tokens), another method or draft model, or turn "
            "speculation off for this traffic", spec_acceptance_rate=acc, threshold=th.spec_acceptance_low)
    return out
