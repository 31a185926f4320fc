"""The operator dashboard (GET /dashboard in headless Chromium via Playwright) and `tokenmill monitor`, against a
real `tokenmill serve` subprocess with a tiny random-weight Llama: real traffic, real /v1/monitor, no mocks.

One server is shared by the module. Its KV cache is tiny (--num-blocks) so that a flood of long requests forces
preemptions; the light traffic of the throughput test stays within it."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)

from server_process import ServerProcess, free_port  # noqa: E402

from tokenmill.serving.monitor_view import render_snapshot  # noqa: E402

MODEL = "tiny_llama"
NUM_BLOCKS = 12  # x 16 tokens: room for a few short requests, far too little for a flood of long ones
CHARTS = ("tokens", "latency", "queue", "kv", "cache")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tiny_model_factory):
    srv = ServerProcess("--model", tiny_model_factory("llama"), "--dtype", "float32", "--served-model-name", MODEL,
                        "--num-blocks", str(NUM_BLOCKS), "--max-num-seqs", "16", "--no-warmup")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    yield pg
    context.close()


def open_dashboard(page, server: ServerProcess, updates: int = 1):
    resp = page.goto(server.url + "/dashboard")
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/html")
    page.wait_for_function(f"window.tokenmillDashboard && window.tokenmillDashboard.updates >= {updates}",
                           timeout=15_000)


def chart(model: str, chart_id: str) -> str:
    return f'canvas[data-testid="chart:{model}:{chart_id}"]'


class Traffic:
    """`workers` threads sending completions back to back until stopped; every status code is kept."""

    def __init__(self, url: str, workers: int, prompt: str, max_tokens: int) -> None:
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.stop_event = threading.Event()
        self.statuses: list[int] = []
        self.pool = ThreadPoolExecutor(workers)
        self.futures = [self.pool.submit(self._worker, i) for i in range(workers)]

    def _worker(self, i: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while not self.stop_event.is_set():
                body = {"model": MODEL, "prompt": f"{i} {n} {self.prompt}", "max_tokens": self.max_tokens,
                        "temperature": 0, "ignore_eos": True}
                self.statuses.append(client.post(self.url + "/v1/completions", json=body).status_code)
                n += 1

    def stop(self) -> list[int]:
        self.stop_event.set()
        for f in self.futures:
            f.result()
        self.pool.shutdown()
        return self.statuses


# ---- the page -----------------------------------------------------------------------------------------------------
def test_page_is_self_contained(server):
    from importlib import resources

    html = resources.files("tokenmill.serving").joinpath("dashboard/index.html").read_text(encoding="utf-8")
    assert httpx.get(server.url + "/dashboard", timeout=10).text == html
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?\s*(https?:)?//""", html, re.I)  # no CDN, fonts, scripts
    assert "<script src" not in html and "@import" not in html


def test_page_loads_clean_with_health_cards(server, page):
    errors: list[str] = []
    failed: list[str] = []
    foreign: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
    page.on("request", lambda r: None if r.url.startswith((server.url + "/", "data:")) else foreign.append(r.url))
    open_dashboard(page, server, updates=2)

    card = page.locator(f'[data-testid=health-card][data-model="{MODEL}"]')
    sync_api.expect(card).to_have_attribute("data-status", "ok")
    sync_api.expect(card.locator("[data-testid=model-status]")).to_have_text("ok")
    sync_api.expect(card).to_contain_text("queue bound")
    sync_api.expect(page.locator("[data-testid=connection]")).to_have_text("live")
    assert page.get_attribute("[data-testid=overall-status]", "data-status") in ("ok", "attention")
    assert "updated" in page.inner_text("[data-testid=last-update]")
    for chart_id in CHARTS:
        assert page.locator(chart(MODEL, chart_id)).count() == 1, chart_id
    for chart_id in ("util", "memory"):
        assert page.locator(chart("system", chart_id)).count() == 1, chart_id
    # the memory chart has the server's RSS (psutil is a dependency): points and a positive last value
    assert float(page.get_attribute(chart("system", "memory"), "data-last") or 0) > 0
    # findings: rows in the server's order, or the explicit empty state
    last = page.evaluate("window.tokenmillDashboard.last")
    assert MODEL in last["models"]
    kinds = page.eval_on_selector_all("[data-testid=finding]", "rows => rows.map(r => r.dataset.kind)")
    if last["findings"]:
        assert kinds  # the page re-renders each second: the set may have moved on, but rows show
    else:
        sync_api.expect(page.locator("[data-testid=no-findings]")).to_be_visible()
    page.wait_for_timeout(1500)  # a couple more polls
    assert page.evaluate("window.tokenmillDashboard.errors") == 0
    assert not errors, errors
    assert not failed, failed
    assert not foreign, foreign


def test_tokens_chart_grows_under_traffic(server, page):
    open_dashboard(page, server)
    sel = chart(MODEL, "tokens")
    before = int(page.get_attribute(sel, "data-points"))
    traffic = Traffic(server.url, workers=3, prompt="The quick brown fox", max_tokens=32)
    try:
        page.wait_for_function(
            """([sel, before]) => { const c = document.querySelector(sel);
                                    return +c.dataset.points > before && +c.dataset.last > 0; }""",
            arg=[sel, before], timeout=20_000)
        # the chart draws exactly the JSON's non-null points, and its last value is the JSON's last one
        drawn, series = page.evaluate(
            """(sel) => [document.querySelector(sel).dataset,
                         window.tokenmillDashboard.last.models[%s].series.output_tokens_per_s]""" % json.dumps(MODEL),
            sel)
        values = [v for v in series if v is not None]
        assert int(drawn["points"]) == len(values)
        assert float(drawn["last"]) == pytest.approx(values[-1])
        assert float(drawn["max"]) == pytest.approx(max(values))
        # the running-batch chart and the health card saw the requests too
        page.wait_for_function(f"+document.querySelector('{chart(MODEL, 'queue')}').dataset.points > 0")
        sync_api.expect(page.locator(f'[data-testid=health-card][data-model="{MODEL}"]')).to_contain_text("tok/s")
    finally:
        statuses = traffic.stop()
    assert statuses and set(statuses) == {200}, statuses


def test_kv_pressure_shows_a_finding(server, page):
    open_dashboard(page, server)
    # unique long prompts (no prefix sharing) + 100 tokens each: ~9 blocks per sequence against 12 in the cache
    flood = Traffic(server.url, workers=10, prompt=" ".join(f"item{i}" for i in range(25)), max_tokens=100)
    selector = ("[data-testid=finding][data-kind=frequent_preemption], "
                "[data-testid=finding][data-kind=kv_cache_full]")
    try:
        row = page.wait_for_selector(selector, timeout=30_000)
        text = row.inner_text()
        assert row.get_attribute("data-model") == MODEL
        assert row.get_attribute("data-priority") in ("high", "medium")
        assert "cause" in text and "fix" in text and "kv_cache_usage" in text  # evidence chips
        # rows follow the server's order (high first) at the moment of one render
        order, last = page.evaluate("""() => [
            [...document.querySelectorAll('[data-testid=finding]')].map(r => r.dataset.kind + '/' + r.dataset.model),
            window.tokenmillDashboard.last.findings.map(f => f.kind + '/' + (f.model ?? ''))]""")
        assert order == last
        prios = page.eval_on_selector_all("[data-testid=finding]", "rows => rows.map(r => r.dataset.priority)")
        rank = {"high": 0, "medium": 1, "low": 2}
        assert [rank[p] for p in prios] == sorted(rank[p] for p in prios)
        assert page.get_attribute("[data-testid=overall-status]", "data-status") in ("attention", "ok")
        # the KV chart draws the JSON's series (instants a second apart: its peak need not be the finding's)
        drawn, series = page.evaluate(
            """(sel) => [document.querySelector(sel).dataset.max,
                         window.tokenmillDashboard.last.models[%s].series.kv_cache_usage]""" % json.dumps(MODEL),
            chart(MODEL, "kv"))
        assert float(drawn) == pytest.approx(max(v for v in series if v is not None)) and float(drawn) > 0
    finally:
        statuses = flood.stop()
    assert set(statuses) == {200}, statuses  # preemption is never an error


def test_disconnect_shows_and_recovers(server, page):
    open_dashboard(page, server)
    page.route("**/v1/monitor*", lambda route: route.abort())
    page.wait_for_function("window.tokenmillDashboard.errors >= 2", timeout=10_000)
    assert page.get_attribute("[data-testid=overall-status]", "data-status") == "disconnected"
    assert "disconnected" in page.inner_text("[data-testid=connection]")
    updates = page.evaluate("window.tokenmillDashboard.updates")
    page.unroute("**/v1/monitor*")  # it keeps retrying and comes back by itself
    page.wait_for_function(f"window.tokenmillDashboard.updates > {updates}", timeout=10_000)
    sync_api.expect(page.locator("[data-testid=connection]")).to_have_text("live")
    assert page.get_attribute("[data-testid=overall-status]", "data-status") != "disconnected"


# ---- the terminal view --------------------------------------------------------------------------------------------
def run_monitor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", "monitor", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "200"})


def test_monitor_once_table_json_and_unreachable(server):
    res = run_monitor(server.url, "--once", "--window", "60")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for word in (MODEL, "status", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "KV use", "preempt/min", "prefix hit",
                 "system", "CPU", "RSS", "window 60 s"):
        assert word in out, (word, out)
    assert "findings" in out

    res = run_monitor(server.url, "--once", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert MODEL in data["models"] and data["models"][MODEL]["health"]["status"] == "ok"
    assert {"time", "window_s", "interval_s", "system", "findings"} <= set(data)

    dead = f"http://127.0.0.1:{free_port()}"
    res = run_monitor(dead, "--once")
    assert res.returncode == 1
    assert "cannot reach" in res.stderr and dead in res.stderr and not res.stdout


def test_render_snapshot_of_live_json_and_of_nulls(server):
    from rich.console import Console

    def text(data: dict, width: int = 200) -> str:
        console = Console(record=True, width=width, color_system=None, file=io.StringIO())
        console.print(render_snapshot(data))
        return console.export_text()

    data = httpx.get(server.url + "/v1/monitor", timeout=10).json()
    out = text(data)
    assert MODEL in out and "ok" in out
    for f in data["findings"]:
        assert f["priority"] in out
    # a model with no data yet, every number null, a failed one with an error, a finding with null evidence
    blank = {"health": {"status": "loading", "error": None, "aliases": [], "fallback": None,
                        "max_queued_requests": None}, "current": {}, "series": {"t": []}}
    failed = {**blank, "health": {**blank["health"], "status": "failed", "error": "out of memory"}}
    nulls = {"time": time.time(), "window_s": 300, "interval_s": 1.0, "models": {"a": blank, "b": failed},
             "system": {"current": {}, "series": {}},
             "findings": [{"kind": "growing_queue", "model": None, "priority": "medium", "issue": "queue grows",
                           "cause": "c", "fix": "add a replica", "evidence": {"queue_slope_per_s": None}}]}
    out = text(nulls)
    assert "loading" in out and "failed" in out and "b: out of memory" in out and "add a replica" in out
    narrow = text(nulls, width=70)  # metrics become rows, one column per model
    assert "TTFT p99" in narrow and max(len(line) for line in narrow.splitlines()) <= 70
    assert "findings: none" in text({"models": {}, "findings": []})
