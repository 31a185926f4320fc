"""The OpenAI-compatible server as users run it: `tokenmill serve` in a subprocess on 127.0.0.1, driven by the
official `openai` client and raw httpx. One server (tiny random Llama, float32) is shared by most tests."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from server_process import ServerProcess  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402

MODEL = "tiny_llama"


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess("--model", model_dir, "--dtype", "float32", "--served-model-name", MODEL,
                        "--max-body-bytes", str(1 << 20))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model=model_dir, dtype="float32")


def wait_idle(server: ServerProcess, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = m["tokenmill:num_requests_running"] == 0 and m["tokenmill:num_requests_waiting"] == 0
        if idle and m["tokenmill:kv_cache_usage_perc"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):"]


# ---- the openai client --------------------------------------------------------------------------------------------
def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["models"][MODEL]["status"] == "ok"
    assert httpx.get(server.url + "/version").json()["version"]


def test_completions_greedy_equal_offline(client, offline):
    refs = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    res = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(res.choices, key=lambda c: c.index)] == [r.outputs[0].text for r in refs]
    assert all(c.finish_reason == "length" for c in res.choices)
    assert res.usage.completion_tokens == 48
    assert res.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)
    # token-id prompts give the same result
    ids = refs[0].prompt_token_ids
    res_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert res_ids.choices[0].text == refs[0].outputs[0].text


def test_chat_greedy_equal_offline(client, offline):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert res.object == "chat.completion"
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == ref.text
    assert res.choices[0].finish_reason == ref.finish_reason
    # content as a list of text parts is the same conversation
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    res2 = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=12, temperature=0)
    assert res2.choices[0].message.content == ref.text


def test_streaming_completion_and_usage(client, offline):
    ref = offline.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_streaming_chat_role_first_done_last(server, offline):
    messages = [{"role": "user", "content": "Count to five."}]
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    body = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ref.text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(ref.token_ids)


def test_n_seed_and_stop(client, offline):
    res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=1.0, n=3, seed=7,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in res.choices) == [0, 1, 2]
    again = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=1.0, n=3, seed=7,
                                      extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(res.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]  # same seed, same samples
    ref = offline.generate(PROMPTS[0], SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=10, ignore_eos=True),
                           use_tqdm=False)[0]
    assert texts == [c.text for c in ref.outputs]
    # stop: cut a greedy output at a substring of itself
    full = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and full.startswith(cut.text) and stop not in cut.text
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                              stop=[stop], stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_logprobs_completion_and_chat(client):
    res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset == sorted(lp.text_offset)
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tlp <= 0 and 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(tlp)  # greedy: the best
    echo = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2,
                                     echo=True, extra_body={"ignore_eos": True})
    assert echo.choices[0].text == PROMPTS[0] + res.choices[0].text
    assert echo.choices[0].logprobs.token_logprobs[0] is None and len(echo.choices[0].logprobs.tokens) > 5
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2,
                                            echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == echo.choices[0].text
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert offsets == echo.choices[0].logprobs.text_offset and tokens == echo.choices[0].logprobs.tokens
    assert offsets == sorted(offsets)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token


def test_metrics_and_request_log(server, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4, user="alice", extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    for name in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                 "request_success_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket",
                 "iteration_tokens_total_bucket"]:
        assert f"tokenmill:{name}{{" in text, name
    assert "tokenmill:process_memory_bytes " in text
    assert f'model_name="{MODEL}"' in text and "process_resident_memory_bytes" in text
    assert server.sample("tokenmill:generation_tokens_total") >= 4
    log = server.output()
    line = next(x for x in log.splitlines() if "tokenmill.requests" in x and "user=alice" in x)
    assert "status=200" in line and "completion_tokens=4" in line and f"model={MODEL}" in line


# ---- load, cancellation, timeouts -----------------------------------------------------------------------------
def test_32_concurrent_streams(server, offline):
    prompts = [f"Request number {i} says" for i in range(32)]
    refs = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    texts = asyncio.run(main())
    assert texts == [r.outputs[0].text for r in refs]
    m = wait_idle(server)
    assert m["tokenmill:kv_cache_usage_perc"] == 0


def _maps_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch_cpu" in f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_http_process_never_loads_torch(server, client):
    """The HTTP process hands the model to its engine process; after serving completions, chat, streams and
    logprobs (the tests above) it has still not loaded torch (~200 MB of resident memory), while the engine has."""
    psutil = pytest.importorskip("psutil")
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logprobs=2)
    engines = psutil.Process(server.proc.pid).children()
    assert any(_maps_torch(p.pid) for p in engines)
    assert not _maps_torch(server.proc.pid)


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    aborted_before = server.sample("tokenmill:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "A very long story:", "max_tokens": 230, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break
    # the response is closed: the connection is gone
    m = wait_idle(server)
    assert m["tokenmill:num_requests_running"] == 0 and m["tokenmill:kv_cache_usage_perc"] == 0
    aborted = server.sample("tokenmill:request_success_total", finished_reason="abort")
    assert aborted == aborted_before + 1


def test_non_streaming_disconnect_aborts(server):
    before = server.sample("tokenmill:request_success_total", finished_reason="abort")
    body = json.dumps({"model": MODEL, "prompt": "Another long story:", "max_tokens": 230, "temperature": 0,
                       "n": 8, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 10
    while server.sample("tokenmill:num_requests_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    sock.close()  # the client goes away before the response
    m = wait_idle(server)
    assert m["tokenmill:kv_cache_usage_perc"] == 0
    after = server.sample("tokenmill:request_success_total", finished_reason="abort")
    assert after == before + 1


def test_request_timeout(server, client):
    body = {"model": MODEL, "prompt": "Slow", "max_tokens": 230, "n": 4, "ignore_eos": True, "timeout": 0.05}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    chunks = list(client.completions.create(model=MODEL, prompt="Slow", max_tokens=230, n=4, stream=True,
                                            extra_body={"ignore_eos": True, "timeout": 0.05}))
    reasons = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert reasons and set(reasons) == {"timeout"}
    assert wait_idle(server)["tokenmill:kv_cache_usage_perc"] == 0


# ---- bad requests ---------------------------------------------------------------------------------------------
LONG_PROMPT = "word " * 400  # > 256 tokens of context

BAD_REQUESTS = [
    ("bad json", "/v1/completions", b'{"model": "tiny_llama", "prompt": "hi", ', 400, None),
    ("not an object", "/v1/completions", b'[1, 2, 3]', 400, None),
    ("wrong type", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("wrong prompt type", "/v1/completions", {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("negative max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ("NaN temperature", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("negative temperature", "/v1/completions", {"prompt": "hi", "temperature": -1.0}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "hi", "top_p": 0.0}, 400, "top_p"),
    ("prompt over context", "/v1/completions", {"prompt": LONG_PROMPT}, 400, "prompt"),
    ("token id out of range", "/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("unknown model", "/v1/completions", {"model": "gpt-17", "prompt": "hi"}, 404, "model"),
    ("n huge", "/v1/completions", {"prompt": "hi", "n": 10**6}, 400, "n"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("chat over context", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     "messages"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("logit_bias", "/v1/completions", {"prompt": "hi", "logit_bias": {"50": 100}}, 400, "logit_bias"),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                       "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("10 MB body", "/v1/completions", {"prompt": "x" * (10 * 2**20)}, 413, None),
    ("unknown route", "/v1/embeddings", {"input": "hi"}, 404, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_clear_error_and_server_stays_healthy(server, client, name, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    assert httpx.get(server.url + "/health").status_code == 200
    res = client.completions.create(model=MODEL, prompt="still fine?", max_tokens=3, extra_body={"ignore_eos": True})
    assert res.choices[0].finish_reason == "length" and res.usage.completion_tokens == 3


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10**9)
    assert "context length" in str(e.value)


# ---- a second server: queue bound and API key ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(model_dir):
    srv = ServerProcess("--model", model_dir, "--dtype", "float32", "--max-num-seqs", "1", "--max-queued-requests",
                        "2", "--served-model-name", MODEL, env={"TOKENMILL_API_KEY": "sekret"})
    yield srv
    assert srv.stop() == 0


def test_api_key(small_server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    r = httpx.post(small_server.url + "/v1/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(small_server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(small_server.url + "/v1/models").status_code == 401
    assert httpx.get(small_server.url + "/health").status_code == 200
    c = openai.OpenAI(base_url=small_server.url + "/v1", api_key="sekret", max_retries=0)
    assert c.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=small_server.url + "/v1", api_key="bad", max_retries=0).models.list()


def test_overload_gets_429_fast_and_accepted_complete(small_server):
    headers = {"Authorization": "Bearer sekret"}
    body = {"model": MODEL, "prompt": "Overload", "max_tokens": 200, "temperature": 0, "ignore_eos": True}

    async def one(c: httpx.AsyncClient):
        t0 = time.monotonic()
        r = await c.post(small_server.url + "/v1/completions", json=body, headers=headers)
        return r, time.monotonic() - t0

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=20)) as c:
            return await asyncio.gather(*(one(c) for _ in range(12)))

    results = asyncio.run(main())
    refused = [(r, dt) for r, dt in results if r.status_code == 429]
    accepted = [r for r, _ in results if r.status_code == 200]
    assert len(refused) + len(accepted) == 12
    assert refused and accepted
    for r, dt in refused:
        assert dt < 2.0 and r.headers.get("retry-after") and r.json()["error"]["code"] == "queue_full"
    assert all(r.json()["usage"]["completion_tokens"] == 200 for r in accepted)
    assert small_server.sample("tokenmill:request_rejected_total", reason="queue_full") == len(refused)


# ---- graceful shutdown ---------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_and_refuses_new(model_dir):
    srv = ServerProcess("--model", model_dir, "--dtype", "float32", "--max-num-seqs", "1",
                        "--served-model-name", MODEL, "--shutdown-timeout", "60")
    try:
        body = {"model": MODEL, "prompt": "Drain me", "max_tokens": 200, "temperature": 0, "ignore_eos": True}

        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                # three requests in flight: one running, two queued behind it (max-num-seqs 1)
                inflight = [asyncio.ensure_future(c.post(srv.url + "/v1/completions", json=body)) for _ in range(3)]
                while srv.sample("tokenmill:num_requests_running") + srv.sample("tokenmill:num_requests_waiting") < 3:
                    await asyncio.sleep(0.01)
                srv.terminate()
                await asyncio.sleep(0.3)
                late = await c.post(srv.url + "/v1/completions", json=body)
                health = await c.get(srv.url + "/health")
                return await asyncio.gather(*inflight), late, health

        done, late, health = asyncio.run(main())
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert health.status_code == 503
        assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 200 for r in done)
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()


def test_engine_process_killed_fails_in_flight_and_health_says_dead(model_dir):
    """The engine steps in a child process; if that process dies, requests in flight end with an error (no hang),
    new ones get 503, /health says dead, and the server itself still answers and exits cleanly."""
    import psutil

    srv = ServerProcess("--model", model_dir, "--dtype", "float32", "--served-model-name", MODEL)
    try:
        body = {"model": MODEL, "prompt": "Keep going", "max_tokens": 230, "temperature": 0, "ignore_eos": True,
                "stream": True}
        engine_pid = next(c.pid for c in psutil.Process(srv.proc.pid).children()
                          if "spawn_main" in " ".join(c.cmdline()))

        async def main():
            async with httpx.AsyncClient(timeout=60) as c:
                async with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                    lines = []
                    async for line in r.aiter_lines():
                        lines.append(line)
                        if len(lines) == 1:
                            os.kill(engine_pid, signal.SIGKILL)
                return r.status_code, lines

        status, lines = asyncio.run(main())
        assert status == 200
        assert any('"error"' in line for line in lines), lines[-3:]
        health = httpx.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "dead"
        late = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=10)
        assert late.status_code == 503
    finally:
        assert srv.stop() == 0


# ---- the real default model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_smollm2_answers_chat(smollm2_gguf_path):
    srv = ServerProcess()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert c.models.list().data[0].id == "SmolLM2-135M-Instruct"
        # (not France: there SmolLM2's first token is a near-tie, "The" 25.33 vs "L" 25.24 even in float32, and a
        # bf16 model's rounding decides it either way; Germany's margin is 0.7)
        res = c.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=24,
                                        messages=[{"role": "user", "content": "What is the capital of Germany?"}])
        assert "berlin" in res.choices[0].message.content.lower()
    finally:
        assert srv.stop() == 0


def test_serve_bad_arguments_are_clear_errors(model_dir, tmp_path):
    import shutil
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "tokenmill.cli", "serve", "--model", "/nonexistent/model/dir"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "/nonexistent/model/dir" in res.stderr
    res = subprocess.run([sys.executable, "-m", "tokenmill.cli", "serve", "--max-body-bytes", "10"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "max_body_bytes" in res.stderr
    # a model directory that passes the path check but cannot load: /health never turns 200, the process exits 1
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(f"{model_dir}/config.json", broken / "config.json")
    with pytest.raises(RuntimeError, match="server exited with 1"):
        ServerProcess("--model", str(broken))
