"""Several models in one server: config, routing rules, fallback, the response cache and the performance monitor.
Unit tests for the pure parts, then real `tokenmill serve --config` processes with two tiny models."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time

import httpx
import openai
import pytest
import yaml

from server_process import ServerProcess, free_port
from tokenmill import SamplingParams
from tokenmill.serving.monitor import MonitorThresholds, analyse
from tokenmill.serving.registry import RegistryConfig, parse_size
from tokenmill.serving.response_cache import (
    MemoryResponseCache,
    ResponseCacheConfig,
    cache_key,
    is_cacheable,
    replay_chunks,
)
from tokenmill.serving.routing import RequestFeatures, RouteRule, RouterConfig, difficulty_score


# ---- config ------------------------------------------------------------------------------------------------------
def _cfg(**extra) -> dict:
    base = {"models": [{"name": "small", "aliases": ["cheap"], "fallback": "large"}, {"name": "large"}]}
    base.update(extra)
    return base


def test_config_memory_shares_aliases_and_router():
    cfg = RegistryConfig.from_dict(_cfg(memory_budget="100MiB", router={"default": "cheap", "rules": [
        {"model": "large", "min_prompt_tokens": 100}]}))
    assert cfg.default == "small" and cfg.router.default == "small"
    assert cfg.models[0].engine.kv_cache_bytes is None
    data = _cfg(memory_budget="100MiB")
    data["models"][0]["memory"] = 0.25
    data["models"][1]["memory"] = "10MiB"
    cfg = RegistryConfig.from_dict(data)
    assert cfg.models[0].engine.kv_cache_bytes == 25 * 2**20
    assert cfg.models[1].engine.kv_cache_bytes == 10 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size(4096) == 4096


def test_models_share_the_cores_unless_told():
    cores = len(os.sched_getaffinity(0))
    data = _cfg()
    data["models"][1]["engine"] = {"num_threads": 3}
    cfg = RegistryConfig.from_dict(data)
    assert cfg.models[0].engine.num_threads == max(1, cores // 2) and cfg.models[1].engine.num_threads == 3
    assert RegistryConfig.from_dict({"models": [{"name": "only"}]}).models[0].engine.num_threads is None


@pytest.mark.parametrize("data, message", [
    ({"models": []}, "non-empty `models`"),
    ({"models": [{"name": "a"}, {"name": "a"}]}, "used twice"),
    ({"models": [{"name": "a", "aliases": ["b"]}, {"name": "b"}]}, "used twice"),
    ({"models": [{"name": "a", "fallback": "zzz"}]}, "fallback 'zzz' is not a model"),
    ({"models": [{"name": "a", "fallback": "a"}]}, "its own fallback"),
    ({"models": [{"name": "a", "memory": 0.5}]}, "memory_budget, which is not set"),
    ({"models": [{"name": "a", "memory": 1}], "memory_budget": 10**9}, "read as bytes"),
    ({"models": [{"name": "a", "memory": 0.7}, {"name": "b", "memory": 0.7}], "memory_budget": 10**9}, "more than 1"),
    ({"models": [{"name": "a", "engine": {"dtypo": "float32"}}]}, "unknown engine option(s) dtypo"),
    ({"models": [{"name": "a"}], "routr": {}}, "unknown key(s) routr"),
    ({"models": [{"name": "a"}], "router": {"default": "a", "rules": [{"model": "b"}]}}, "model 'b' is not a model"),
    ({"models": [{"name": "auto"}], "router": {"default": "auto"}}, "router's name 'auto' is also a model"),
    ({"models": [{"name": "a"}], "response_cache": {"backend": "memcached://x"}}, "redis:// URL"),
])
def test_config_errors_are_clear(data, message):
    with pytest.raises(ValueError, match=None) as e:
        RegistryConfig.from_dict(data)
    assert message in str(e.value)


def test_config_from_yaml_resolves_relative_model_paths(tmp_path):
    (tmp_path / "m1").mkdir()
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [{"name": "x", "model": "m1"}]}))
    cfg = RegistryConfig.from_yaml(str(tmp_path / "models.yaml"))
    assert cfg.models[0].engine.model == str(tmp_path / "m1")
    (tmp_path / "bad.yaml").write_text("models: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        RegistryConfig.from_yaml(str(tmp_path / "bad.yaml"))


# ---- routing -----------------------------------------------------------------------------------------------------
def _features(prompt_tokens=10, max_tokens=16, headers=None, metadata=None, difficulty=0.0) -> RequestFeatures:
    return RequestFeatures(prompt_tokens, max_tokens, headers or {}, metadata or {}, difficulty)


def test_rules_first_match_wins():
    router = RouterConfig(default="small", rules=[
        RouteRule(model="large", name="premium", header={"X-Tier": "premium"}),
        RouteRule(model="large", name="code", metadata={"task": "code"}),
        RouteRule(model="large", name="long", min_prompt_tokens=100),
        RouteRule(model="medium", name="big-output", min_max_tokens=200),
        RouteRule(model="large", name="hard", min_difficulty=0.4),
        RouteRule(model="tagged", name="any-tag", header={"x-team": "*"}),
    ])
    assert router.route(_features()) == ("small", "default")
    assert router.route(_features(headers={"x-tier": "premium"})) == ("large", "premium")
    assert router.route(_features(headers={"x-tier": "basic"})) == ("small", "default")
    assert router.route(_features(metadata={"task": "code"})) == ("large", "code")
    assert router.route(_features(prompt_tokens=100)) == ("large", "long")
    assert router.route(_features(max_tokens=500)) == ("medium", "big-output")
    assert router.route(_features(max_tokens=None)) == ("small", "default")  # unknown max_tokens matches no bound
    assert router.route(_features(prompt_tokens=500, max_tokens=500)) == ("large", "long")  # first match
    assert router.route(_features(difficulty=0.9)) == ("large", "hard")
    assert router.route(_features(headers={"x-team": "anything"})) == ("tagged", "any-tag")
    with pytest.raises(ValueError, match="above"):
        RouteRule(model="x", min_prompt_tokens=10, max_prompt_tokens=5)


def test_difficulty_score_orders_prompts():
    easy = difficulty_score("Hi there!", 3)
    code = difficulty_score("Why does this fail? Explain step by step.\n```python\ndef f(x):\n    return x/0\n```", 30)
    math = difficulty_score("Prove the theorem: 3 + 4 = 7 and derive 12 * 12 = 144. Why?", 25)
    assert 0 <= easy < 0.05 < min(code, math) and max(code, math) <= 1
    assert difficulty_score("word " * 2000, 2000) > difficulty_score("word " * 20, 20)


# ---- response cache (unit) -------------------------------------------------------------------------------------
def test_cacheable_only_when_deterministic_and_key_covers_every_output_field():
    assert is_cacheable(SamplingParams(temperature=0))
    assert is_cacheable(SamplingParams(temperature=0.8, seed=3))
    assert not is_cacheable(SamplingParams(temperature=0.8))
    base = SamplingParams(temperature=0, max_tokens=8)
    k = cache_key("m", "chat", [[1, 2, 3]], base)
    assert k == cache_key("m", "chat", [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, timeout=5.0))
    for other in (cache_key("m2", "chat", [[1, 2, 3]], base), cache_key("m", "completion", [[1, 2, 3]], base),
                  cache_key("m", "chat", [[1, 2, 4]], base),
                  cache_key("m", "chat", [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=9)),
                  cache_key("m", "chat", [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, stop=["x"])),
                  cache_key("m", "chat", [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, logprobs=2)),
                  cache_key("m", "chat", [[1, 2, 3]], base, echo=True)):
        assert other != k


def test_memory_cache_lru_byte_bound_and_ttl():
    async def main():
        cache = MemoryResponseCache(ResponseCacheConfig("memory", max_bytes=500, ttl_s=0.3))
        for i in range(4):
            await cache.put(f"k{i}", {"v": "x" * 100})
        assert await cache.get("k0") is not None  # k0 becomes the most recently used
        await cache.put("k4", {"v": "x" * 100})  # over 500 bytes: evicts the least recently used (k1)
        st = cache.stats()
        assert st["bytes"] <= 500 and st["evictions"] >= 1
        assert await cache.get("k1") is None and await cache.get("k0") is not None
        await cache.put("huge", {"v": "x" * 1000})  # larger than the whole cache: not stored
        assert await cache.get("huge") is None
        time.sleep(0.35)
        assert await cache.get("k0") is None  # expired
        assert cache.stats()["hits"] == 2

    asyncio.run(main())


def test_replay_chunks_shape():
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "logprobs": None,
                         "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    chunks = replay_chunks(body, include_usage=True)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "hello"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 3


# ---- analyser (unit) ---------------------------------------------------------------------------------------------
def _current(**kw) -> dict:
    c = {"output_tokens_per_s": 100.0, "requests_per_s": 1.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "itl_p50_s": 0.02,
         "queue_depth": 0, "running": 2, "kv_cache_usage": 0.3, "preemptions_per_min": 0.0,
         "prefix_cache_hit_rate": 0.5, "response_cache_hit_rate": None, "spec_acceptance_rate": None,
         "requests_in_window": 10, "prompts_in_window": 10, "shared_prefix_share": 0.0, "mean_running": 2.0,
         "queue_slope_per_s": 0.0}
    c.update(kw)
    return c


@pytest.mark.parametrize("kw, kind", [
    ({"preemptions_per_min": 30.0}, "frequent_preemption"),
    ({"kv_cache_usage": 0.97}, "kv_cache_full"),
    ({"queue_depth": 20, "queue_slope_per_s": 1.5}, "growing_queue"),
    ({"ttft_p50_s": 5.0}, "high_ttft"),
    ({"output_tokens_per_s": 2.0}, "low_throughput"),
    ({"shared_prefix_share": 0.9, "prefix_cache_hit_rate": 0.0}, "low_prefix_cache_hits"),
    ({"spec_acceptance_rate": 0.1}, "low_spec_acceptance"),
])
def test_analyser_findings(kw, kind):
    th = MonitorThresholds()
    assert analyse("m", _current(), th, util=0.9) == []  # a healthy window has no findings
    found = analyse("m", _current(**kw), th, util=0.9, queue_bound=64)
    assert [f.kind for f in found] == [kind]
    f = found[0]
    assert f.model == "m" and f.issue and f.cause and f.fix and f.priority in ("high", "medium", "low")
    assert f.evidence  # the numbers that triggered it
    assert [x.kind for x in analyse("m", _current(), th, util=0.1)] == ["low_utilization"]
    relaxed = MonitorThresholds(preemptions_per_min=100, kv_cache_full=0.99, queue_min_depth=50, ttft_high_s=10,
                                min_tokens_per_s=1, prefix_shared_min=1.0, spec_acceptance_low=0.0)
    assert analyse("m", _current(**kw), relaxed, util=0.9) == []


# ---- real servers with two models --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_models(tiny_model_factory) -> tuple[str, str]:
    return tiny_model_factory("llama"), tiny_model_factory("qwen2")


def _write_config(tmp_path, data: dict) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def multi(two_models, tmp_path_factory):
    small, large = two_models
    data = {
        "default": "small",
        "router": {"name": "auto", "default": "small", "rules": [
            {"name": "premium", "model": "large", "header": {"x-tier": "premium"}},
            {"name": "code", "model": "large", "metadata": {"task": "code"}},
            {"name": "long", "model": "big", "min_prompt_tokens": 40},
        ]},
        "memory_budget": "64MiB",
        "models": [
            {"name": "small", "model": small, "aliases": ["cheap"], "memory": 0.5, "max_queued_requests": 1,
             "fallback": "large", "engine": {"dtype": "float32", "max_num_seqs": 1}},
            {"name": "large", "model": large, "aliases": ["big"], "memory": 0.5,
             "engine": {"dtype": "float32"}},
        ],
        "monitor": {"window_s": 10},
    }
    srv = ServerProcess("--config", _write_config(tmp_path_factory.mktemp("multi"), data))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def mclient(multi):
    return openai.OpenAI(base_url=multi.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_listed_unknown_model_404(multi, mclient):
    ids = [m.id for m in mclient.models.list().data]
    assert ids == ["small", "large", "auto"]
    cards = httpx.get(multi.url + "/v1/models").json()["data"]
    assert cards[0]["aliases"] == ["cheap"] and cards[2]["owned_by"] == "tokenmill-router"
    with pytest.raises(openai.NotFoundError) as e:
        mclient.completions.create(model="nope", prompt="hi", max_tokens=2)
    msg = str(e.value)
    for name in ("small", "cheap", "large", "big", "auto"):
        assert name in msg
    health = httpx.get(multi.url + "/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"small", "large"}
    assert health["models"]["small"]["fallback"] == "large"


def test_explicit_alias_and_routed_requests_name_the_serving_model(multi, mclient):
    def post(body, headers=None):
        r = httpx.post(multi.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3, **body},
                       headers=headers or {}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-tokenmill-model"] == r.json()["model"]
        return r.json()["model"], r.headers["x-tokenmill-route"]

    assert post({}) == ("small", "default")
    assert post({"model": "cheap"}) == ("small", "alias")
    assert post({"model": "large"}) == ("large", "explicit")
    assert post({"model": "auto"}) == ("small", "default")
    assert post({"model": "auto"}, {"X-Tier": "premium"}) == ("large", "premium")
    assert post({"model": "auto", "metadata": {"task": "code"}}) == ("large", "code")
    assert post({"model": "auto", "prompt": "word " * 60}) == ("large", "long")
    chat = mclient.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_headers={"x-tier": "premium"})
    assert chat.model == "large"
    assert multi.sample("tokenmill:requests_routed_total", model_name="large", route="premium") >= 2


def test_full_queue_falls_back_instead_of_failing(multi):
    # small: one running sequence and a queue of one; a flood must overflow to `large`, and nothing may fail
    body = {"model": "small", "prompt": "Flood", "max_tokens": 48, "ignore_eos": True, "temperature": 0.7}

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(multi.url + "/v1/completions", json=body) for _ in range(8)))

    results = asyncio.run(main())
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    served = [r.json()["model"] for r in results]
    assert "small" in served and "large" in served
    assert {r.headers["x-tokenmill-route"] for r in results if r.json()["model"] == "large"} == {"fallback"}
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in results)
    assert multi.sample("tokenmill:requests_routed_total", model_name="large", route="fallback") >= 1


def test_cache_hit_identical_and_faster_never_for_unseeded_sampling(multi, mclient):
    body = {"model": "large", "prompt": "The cache test prompt", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    t0 = time.perf_counter()
    first = httpx.post(multi.url + "/v1/completions", json=body, timeout=60)
    t_miss = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = httpx.post(multi.url + "/v1/completions", json=body, timeout=60)
    t_hit = time.perf_counter() - t0
    assert first.headers["x-tokenmill-cache"] == "miss" and second.headers["x-tokenmill-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"] and second.json()["id"] != first.json()["id"]
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == first.json()["usage"]["prompt_tokens"]
    assert t_hit < t_miss
    # the same request through the openai client, streamed: replayed from the cache
    stream = mclient.completions.create(stream=True, extra_body={"ignore_eos": True},
                                        **{k: v for k, v in body.items() if k != "ignore_eos"})
    assert "".join(c.choices[0].text for c in stream if c.choices) == first.json()["choices"][0]["text"]
    # no-cache: looked up never, answered by the engine (and equal, being greedy)
    fresh = httpx.post(multi.url + "/v1/completions", json=body, headers={"Cache-Control": "no-cache"}, timeout=60)
    assert fresh.headers["x-tokenmill-cache"] == "bypass" and fresh.json()["choices"] == first.json()["choices"]
    # sampled without a seed: never cached; with a seed: cached
    sampled = {**body, "temperature": 0.9}
    for _ in range(2):
        r = httpx.post(multi.url + "/v1/completions", json=sampled, timeout=60)
        assert "x-tokenmill-cache" not in r.headers
    seeded = {**sampled, "seed": 7}
    a = httpx.post(multi.url + "/v1/completions", json=seeded, timeout=60)
    b = httpx.post(multi.url + "/v1/completions", json=seeded, timeout=60)
    assert (a.headers["x-tokenmill-cache"], b.headers["x-tokenmill-cache"]) == ("miss", "hit")
    assert a.json()["choices"] == b.json()["choices"]
    # a streamed miss is stored too: the next non-streamed request hits
    chat = {"model": "small", "messages": [{"role": "user", "content": "stream then cache"}], "max_tokens": 6,
            "temperature": 0}
    streamed = "".join(c.choices[0].delta.content or "" for c in mclient.chat.completions.create(stream=True, **chat)
                       if c.choices)
    r = httpx.post(multi.url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.headers["x-tokenmill-cache"] == "hit" and r.json()["choices"][0]["message"]["content"] == streamed
    assert multi.sample("tokenmill:response_cache_hits_total", backend="memory") >= 3
    assert multi.sample("tokenmill:response_cache_bytes", backend="memory") > 0


def test_monitor_reports_series_and_health(multi):
    httpx.post(multi.url + "/v1/completions", json={"model": "large", "prompt": "monitor", "max_tokens": 16,
                                                    "ignore_eos": True, "temperature": 0.5}, timeout=60)
    time.sleep(2.5)
    snap = httpx.get(multi.url + "/v1/monitor", params={"window": 60}).json()
    assert set(snap["models"]) == {"small", "large"}
    large = snap["models"]["large"]
    assert large["health"]["status"] == "ok"
    series = large["series"]
    assert len(series["t"]) >= 2 and all(len(series[k]) == len(series["t"]) for k in series)
    assert max(v or 0 for v in series["output_tokens_per_s"]) > 0
    assert snap["system"]["current"]["memory_rss_bytes"] > 0
    assert isinstance(snap["findings"], list)
    assert httpx.get(multi.url + "/v1/monitor", params={"window": -1}).status_code == 400


def test_killed_model_degrades_to_fallback(two_models, tmp_path):
    small, large = two_models
    data = {"models": [
        {"name": "small", "model": small, "fallback": "large", "engine": {"dtype": "float32", "num_blocks": 64}},
        {"name": "large", "model": large, "engine": {"dtype": "float32", "num_blocks": 64}}]}
    srv = ServerProcess("--config", _write_config(tmp_path, data), "--response-cache", "off")
    try:
        pid = httpx.get(srv.url + "/health").json()["models"]["small"]["engine_pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(srv.url + "/health").json()["models"]["small"]["status"] != "dead":
            assert time.monotonic() < deadline, "the dead engine was not noticed"
            httpx.post(srv.url + "/v1/completions", json={"model": "small", "prompt": "x", "max_tokens": 1}, timeout=30)
            time.sleep(0.2)
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        r = httpx.post(srv.url + "/v1/completions", json={"model": "small", "prompt": "still served", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "large"
        # no model left that can take it: a clear 503, and /health says so
        os.kill(httpx.get(srv.url + "/health").json()["models"]["large"]["engine_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(srv.url + "/health").status_code != 503:
            assert time.monotonic() < deadline, "the second dead engine was not noticed"
            time.sleep(0.2)
        r = httpx.post(srv.url + "/v1/completions", json={"model": "small", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    finally:
        assert srv.stop() == 0


# ---- forced conditions -> findings -------------------------------------------------------------------------------
def _flood(url: str, n: int, body: dict) -> list[httpx.Response]:
    async def main():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=n + 4)) as c:
            return await asyncio.gather(*(c.post(url + "/v1/completions", json=body) for _ in range(n)))

    return asyncio.run(main())


def _wait_finding(url: str, kinds: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = [f for f in httpx.get(url + "/v1/monitor", params={"window": 30}).json()["findings"]
                 if f["kind"] in kinds]
        if found or time.monotonic() > deadline:
            return found[0] if found else {}
        time.sleep(0.5)


def test_tiny_kv_cache_gives_a_preemption_finding(two_models):
    srv = ServerProcess("--model", two_models[0], "--dtype", "float32", "--block-size", "4", "--num-blocks", "12",
                        "--response-cache", "off")
    try:
        body = {"prompt": "Preempt me please", "max_tokens": 24, "ignore_eos": True, "temperature": 0.8}

        async def main():
            async with httpx.AsyncClient(timeout=300) as c:
                tasks = [asyncio.ensure_future(c.post(srv.url + "/v1/completions", json=body)) for _ in range(8)]
                finding = await asyncio.to_thread(_wait_finding, srv.url, {"frequent_preemption"}, 60)
                results = await asyncio.gather(*tasks)
                return finding, results

        finding, results = asyncio.run(main())
        assert all(r.status_code == 200 for r in results)
        assert finding, "no preemption finding"
        assert finding["priority"] == "high" and finding["evidence"]["preemptions_per_min"] > 5
        assert "KV" in finding["cause"] and finding["fix"]
    finally:
        srv.stop()


def test_flood_gives_a_queue_finding(two_models):
    srv = ServerProcess("--model", two_models[0], "--dtype", "float32", "--max-num-seqs", "1",
                        "--max-queued-requests", "64", "--response-cache", "off")
    try:
        body = {"prompt": "Queue", "max_tokens": 64, "ignore_eos": True, "temperature": 0.8}

        async def main():
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=40)) as c:
                watch = asyncio.ensure_future(asyncio.to_thread(_wait_finding, srv.url, {"growing_queue"}, 30))
                tasks = []
                for _ in range(8):  # arrivals keep coming faster than one sequence at a time drains them
                    tasks += [asyncio.ensure_future(c.post(srv.url + "/v1/completions", json=body)) for _ in range(4)]
                    await asyncio.sleep(0.4)
                finding = await watch
                results = await asyncio.gather(*tasks)
                return finding, results

        finding, results = asyncio.run(main())
        assert all(r.status_code == 200 for r in results)
        assert finding, "no queue finding"
        assert finding["evidence"]["queue_depth"] >= 4 and finding["model"]
    finally:
        srv.stop()


# ---- Redis: one cache shared by two servers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url():
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def test_redis_cache_shared_by_two_servers(two_models, redis_url):
    args = ("--model", two_models[0], "--dtype", "float32", "--served-model-name", "shared",
            "--response-cache", redis_url)
    a = ServerProcess(*args)
    b = ServerProcess(*args)
    try:
        body = {"model": "shared", "messages": [{"role": "user", "content": "Shared cache?"}], "max_tokens": 12,
                "temperature": 0}
        ra = httpx.post(a.url + "/v1/chat/completions", json=body, timeout=60)
        rb = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=60)
        assert ra.headers["x-tokenmill-cache"] == "miss" and rb.headers["x-tokenmill-cache"] == "hit"
        assert ra.json()["choices"] == rb.json()["choices"]
        assert b.sample("tokenmill:response_cache_entries", backend="redis") >= 1
        import redis

        keys = redis.Redis.from_url(redis_url).keys("tokenmill:rc:*")
        assert len(keys) == 1 and 0 < redis.Redis.from_url(redis_url).pttl(keys[0]) <= 3600 * 1000
    finally:
        a.stop()
        b.stop()
