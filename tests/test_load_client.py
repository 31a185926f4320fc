"""The streaming load client (tokenmill.bench.load_client) against real HTTP servers.

1. A stub OpenAI-style SSE server (starlette + uvicorn on a free port, in a thread) that emits tokens
   with known timings: TTFT, ITL, TPOT, e2e, token counts, throughput, concurrency limit, failures
   and goodput are checked against them.
2. The real ``tokenmill serve`` on a tiny random-weight model, when the serve command exists.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tokenmill.bench import load_client
from tokenmill.bench.load_client import RequestSpec, run_benchmark, stats

TTFT = 0.20  # stub: delay before the first token
ITL = 0.04  # stub: delay between tokens
NTOK = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stub:
    """Counts requests in flight; the app answers /v1/completions with a timed SSE stream."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.payloads: list[dict] = []
        self.models_503 = 0  # /v1/models answers 503 ("loading") this many more times
        self.models_calls = 0

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        async def completions(request):
            body = await request.json()
            self.payloads.append(body)
            if body.get("prompt") == "fail":
                return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
            n = body["max_tokens"]
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            plen = len(body["prompt"]) if isinstance(body["prompt"], list) else len(body["prompt"].split())

            async def gen():
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    yield ": ping\n\n"  # an SSE comment, as llama-cpp-python sends
                    await asyncio.sleep(TTFT)
                    for i in range(n):
                        if i:
                            await asyncio.sleep(ITL)
                        chunk = {"object": "text_completion",
                                 "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    # an empty closing chunk (llama-cpp-python style): not a token
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}) \
                        + "\n\n"
                    if usage:
                        yield "data: " + json.dumps({"choices": [], "usage": {
                            "prompt_tokens": plen, "completion_tokens": n, "total_tokens": plen + n}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(gen(), media_type="text/event-stream")

        async def models(request):  # no /health route: like llama-cpp-python's server
            self.models_calls += 1
            if self.models_503 > 0:
                self.models_503 -= 1
                return JSONResponse({"error": {"message": "loading", "type": "unavailable"}}, status_code=503)
            return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})

        return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/v1/models", models, methods=["GET"])])


@pytest.fixture(scope="module")
def stub_server():
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    stub = _Stub()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(stub.app(), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 15
    while not server.started:
        assert time.time() < deadline, "stub server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", stub
    server.should_exit = True
    th.join(timeout=5)


def _specs(n: int, max_tokens: int = NTOK) -> list[RequestSpec]:
    return [RequestSpec(prompt=list(range(10 + i)), prompt_len=10 + i, max_tokens=max_tokens) for i in range(n)]


def test_stats_percentiles():
    s = stats([4.0, 1.0, 3.0, 2.0])
    assert s["mean"] == 2.5 and s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["p99"] == pytest.approx(3.97)
    assert s["p90"] == pytest.approx(3.7)
    assert stats([])["median"] is None


def test_timings_against_known_stream(stub_server):
    url, stub = stub_server
    stub.max_in_flight = 0
    res = run_benchmark(url, _specs(8), concurrency=2, progress=False)
    assert res.completed == 8 and res.failed == 0
    assert res.output_tokens_sources == {"usage": 8}
    assert res.total_output_tokens == 8 * NTOK
    assert res.total_input_tokens == sum(10 + i for i in range(8))
    assert stub.max_in_flight == 2  # the concurrency limit holds, and is used
    # the payload: streaming, greedy, usage asked for, ignore_eos, max_tokens
    p = stub.payloads[-1]
    assert p["stream"] is True and p["temperature"] == 0.0 and p["ignore_eos"] is True
    assert p["stream_options"] == {"include_usage": True} and p["max_tokens"] == NTOK
    assert "min_tokens" not in p

    slack = 0.15  # scheduling noise on a busy 2-core machine; timings are never below the stub's delays
    e2e_expected = TTFT + (NTOK - 1) * ITL
    for r in res.requests:
        assert r.success and r.output_tokens == NTOK and r.num_chunks == NTOK
        assert TTFT - 0.01 <= r.ttft <= TTFT + slack
        assert len(r.itl) == NTOK - 1
        # the last token cannot arrive before the stub sent it; the gaps add up to its arrival time
        assert e2e_expected - 0.01 <= r.ttft + sum(r.itl) <= r.e2e
        assert e2e_expected - 0.01 <= r.e2e <= e2e_expected + 2 * slack
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / (NTOK - 1))
        assert r.finish_reason == "length"
        assert r.text == "".join(f" t{i}" for i in range(NTOK))
    assert ITL - 0.01 <= res.itl["median"] <= ITL + 0.03
    assert ITL - 0.01 <= res.tpot["median"] <= ITL + 0.03
    assert TTFT - 0.01 <= res.ttft["median"] <= TTFT + slack
    # 8 requests, 2 at a time: 4 waves of one request's e2e
    assert res.duration >= 4 * e2e_expected - 0.02
    assert res.output_throughput == pytest.approx(res.total_output_tokens / res.duration)
    assert res.request_throughput == pytest.approx(8 / res.duration)
    assert res.total_token_throughput == pytest.approx((res.total_input_tokens + res.total_output_tokens)
                                                       / res.duration)
    assert res.output_throughput <= 8 * NTOK / (4 * e2e_expected) * 1.03
    d = json.loads(json.dumps(res.to_dict()))  # JSON-serialisable
    assert d["completed"] == 8 and len(d["requests"]) == 8 and d["request_rate"] == "inf"
    assert "text" not in d["requests"][0]
    assert res.summary_lines()


def test_token_count_without_usage(stub_server):
    url, stub = stub_server
    res = run_benchmark(url, _specs(2, 5), concurrency=2, include_usage=False, progress=False)
    assert "stream_options" not in stub.payloads[-1]
    assert res.output_tokens_sources == {"chunks": 2} and res.total_output_tokens == 10
    # re-tokenising the text: each " tN" is one "token" for this whitespace tokenizer
    res = run_benchmark(url, _specs(2, 5), concurrency=2, include_usage=False, progress=False,
                        tokenizer=lambda text: text.split(), min_tokens=True, ignore_eos=False)
    assert res.output_tokens_sources == {"tokenizer": 2} and res.total_output_tokens == 10
    p = stub.payloads[-1]
    assert p["min_tokens"] == 5 and "ignore_eos" not in p


def test_failures_and_goodput(stub_server):
    url, _ = stub_server
    specs = _specs(3, 4) + [RequestSpec(prompt="fail", prompt_len=1, max_tokens=4)]
    res = run_benchmark(url, specs, concurrency=4, progress=False, slo_ttft=5.0, slo_tpot=1.0)
    assert res.completed == 3 and res.failed == 1
    assert any("HTTP 500" in e for e in res.errors)
    assert res.good_requests == 3 and res.goodput == pytest.approx(3 / res.duration)
    res = run_benchmark(url, _specs(3, 4), concurrency=4, progress=False, slo_ttft=0.01)
    assert res.completed == 3 and res.good_requests == 0 and res.goodput == 0.0
    # end-to-end SLO: every given SLO must hold
    res = run_benchmark(url, _specs(3, 4), concurrency=4, progress=False, slo_ttft=5.0, slo_e2e=60.0)
    assert res.good_requests == 3 and res.slo == {"ttft": 5.0, "tpot": None, "e2e": 60.0}
    res = run_benchmark(url, _specs(3, 4), concurrency=4, progress=False, slo_ttft=5.0, slo_e2e=0.01)
    assert res.good_requests == 0 and "e2e <= 10 ms" in "\n".join(res.summary_lines())
    # nothing listening: every request fails cleanly, no exception
    res = run_benchmark(f"http://127.0.0.1:{_free_port()}", _specs(2, 4), concurrency=2, progress=False)
    assert res.completed == 0 and res.failed == 2 and res.errors


def test_wait_for_server_waits_out_loading_and_falls_back_to_models(stub_server):
    url, stub = stub_server
    stub.models_503, stub.models_calls = 2, 0
    waited = load_client.wait_for_server(url, timeout=30, interval=0.05)
    assert stub.models_calls == 3 and stub.models_503 == 0  # /health is 404 here: polled /v1/models to its 200
    assert waited >= 0.1
    stub.models_503 = 10**6
    with pytest.raises(TimeoutError, match="/v1/models not ready"):
        load_client.wait_for_server(url, timeout=0.3, interval=0.05)
    stub.models_503 = 0


def test_request_rate_spreads_arrivals(stub_server):
    url, stub = stub_server
    stub.max_in_flight = 0
    res = run_benchmark(url, _specs(4, 2), request_rate=20.0, progress=False, seed=1)
    assert res.completed == 4 and res.request_rate == 20.0
    starts = [r.start for r in res.requests]
    assert starts == sorted(starts) and starts[-1] > starts[0]
    assert res.to_dict(include_requests=False)["request_rate"] == 20.0
    with pytest.raises(ValueError):
        run_benchmark(url, _specs(1), request_rate=0.0, progress=False)
    assert math.isinf(run_benchmark(url, _specs(1, 2), progress=False).request_rate)


# --------------------------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def tokenmill_server(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("llama")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--kv-cache-bytes", str(16 * 2**20), "--no-prefix-caching"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            load_client.wait_for_server(base, "/health", timeout=120, proc=proc)
        except RuntimeError:
            out = log_path.read_text(errors="replace")
            if "invalid choice: 'serve'" in out:
                pytest.skip("`tokenmill serve` is not available")
            raise AssertionError(f"tokenmill serve did not start:\n{out[-3000:]}") from None
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_against_tokenmill_server(tokenmill_server):
    model = load_client.served_model_id(tokenmill_server)
    assert model
    specs = [RequestSpec(prompt=list(range(100, 110 + 3 * i)), prompt_len=10 + 3 * i, max_tokens=8) for i in range(6)]
    res = run_benchmark(tokenmill_server, specs, model=model, concurrency=3, progress=False)
    assert res.failed == 0, res.errors
    assert res.completed == 6
    assert res.output_tokens_sources == {"usage": 6}
    assert res.total_output_tokens == 6 * 8  # ignore_eos honoured
    assert res.total_input_tokens == sum(s.prompt_len for s in specs)
    for r in res.requests:
        assert r.ttft > 0 and r.e2e >= r.ttft and r.tpot is not None and r.tpot > 0
        assert len(r.itl) == r.num_chunks - 1 and r.num_chunks >= 1
    assert res.output_throughput > 0
    # text prompts and the tokenizer path work too
    res = run_benchmark(tokenmill_server, [RequestSpec("Hello there, how are you", 6, 4)], model=model,
                        include_usage=False, progress=False)
    assert res.completed == 1 and res.output_tokens_sources in ({"chunks": 1}, {"tokenizer": 1})
