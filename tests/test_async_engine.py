"""AsyncEngine on a tiny random Llama: streams, equality with the synchronous engine, cancellation, the bounded
queue, timeouts, step failures, drain."""
from __future__ import annotations

import asyncio
import time

import pytest

from tokenmill import LLM, EngineConfig, SamplingParams
from tokenmill.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineShutdownError,
    QueueFullError,
    RequestFailedError,
)
from tokenmill.engine.llm_engine import LLMEngine

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def llm_engine(model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model_dir, dtype="float32", max_num_seqs=8, num_blocks=64))


def make_async(engine: LLMEngine, **kwargs) -> AsyncEngine:
    assert not engine.has_unfinished_requests()
    a = AsyncEngine(engine, **kwargs)
    a.start()
    return a


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def assert_all_free(engine: LLMEngine) -> None:
    s = engine.stats()
    assert s["num_running"] == 0 and s["num_waiting"] == 0
    assert s["num_free_blocks"] == s["num_blocks"]
    assert not engine.has_unfinished_requests()


def test_streams_match_offline_greedy(llm_engine, model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    a = make_async(llm_engine)

    async def one(i: int, prompt: str):
        seen = []
        async for out in a.generate(f"r{i}", prompt, params):
            seen.append(out)
        return seen

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    try:
        results = run(main())
    finally:
        a.stop()
    offline = LLM(model=model_dir, dtype="float32").generate(PROMPTS, params, use_tqdm=False)
    for seen, ref in zip(results, offline):
        assert seen[-1].finished and all(not o.finished for o in seen[:-1])
        assert seen[-1].outputs[0].token_ids == ref.outputs[0].token_ids
        assert seen[-1].outputs[0].text == ref.outputs[0].text
        lengths = [len(o.outputs[0].token_ids) for o in seen]
        assert lengths == sorted(lengths)  # cumulative
    assert_all_free(llm_engine)


def test_warmup_sets_ready(llm_engine):
    a = AsyncEngine(llm_engine)
    assert not a.is_ready
    try:
        run(a.warmup())
        assert a.is_ready and not a.is_dead
    finally:
        a.stop()
    assert_all_free(llm_engine)


def test_cancelled_stream_aborts_and_frees_blocks(llm_engine):
    a = make_async(llm_engine)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        gen = a.generate("long", "Tell me a long story", params)
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 2:
                break
        await gen.aclose()  # what a disconnected client's handler does
        for _ in range(200):
            if a.num_unfinished == 0:
                break
            await asyncio.sleep(0.01)
        return a.num_unfinished

    try:
        assert run(main()) == 0
        time.sleep(0.05)
        assert_all_free(llm_engine)
        snapshot = a.stats()  # what /metrics reads
        assert snapshot["num_running"] == 0 and snapshot["kv_cache_usage"] == 0
    finally:
        a.stop()


def test_bad_prompt_raises_and_engine_keeps_serving(llm_engine):
    a = make_async(llm_engine)

    async def main():
        with pytest.raises(ValueError, match="context length"):
            await a.add_request("too-long", prompt_token_ids=[5] * (llm_engine.max_model_len + 1))
        with pytest.raises(ValueError, match="empty"):
            await a.add_request("empty", prompt_token_ids=[])
        outs = [o async for o in a.generate("ok", "Hello", SamplingParams(max_tokens=3, ignore_eos=True))]
        return outs[-1]

    try:
        last = run(main())
        assert last.finished and len(last.outputs[0].token_ids) == 3
    finally:
        a.stop()


def test_queue_bound_refuses_at_once(llm_engine):
    llm_engine.scheduler.config.max_num_seqs = 1  # one running request; the others wait
    a = make_async(llm_engine, max_queued_requests=2)
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)

    async def drain(stream):
        last = None
        async for last in stream:
            pass
        return last

    async def main():
        running = await a.add_request("run", "Hello", params)
        while a.num_queued:  # wait until it is scheduled
            await asyncio.sleep(0.005)
        q1 = await a.add_request("q1", "Hello there", params)
        q2 = await a.add_request("q2", "Hello again", params)
        t0 = time.monotonic()
        with pytest.raises(QueueFullError, match="max_queued_requests=2"):
            await a.add_request("q3", "One too many", params)
        refused_in = time.monotonic() - t0
        outs = await asyncio.gather(drain(running), drain(q1), drain(q2))
        return refused_in, outs

    try:
        refused_in, outs = run(main())
    finally:
        a.stop()
        llm_engine.scheduler.config.max_num_seqs = 8
    assert refused_in < 0.1
    assert all(o.finished and len(o.outputs[0].token_ids) == 150 for o in outs)
    assert_all_free(llm_engine)


def test_timeout_server_default_and_override(llm_engine):
    a = make_async(llm_engine, request_timeout=0.001)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        timed_out = [o async for o in a.generate("t1", "Hello", params)][-1]
        ok = [o async for o in a.generate("t2", "Hello", SamplingParams(max_tokens=4, ignore_eos=True),
                                          timeout=60.0)][-1]
        return timed_out, ok

    try:
        timed_out, ok = run(main())
    finally:
        a.stop()
    assert timed_out.finished and timed_out.outputs[0].finish_reason == "timeout"
    assert ok.outputs[0].finish_reason == "length"
    assert_all_free(llm_engine)


def test_step_failure_fails_requests_but_not_the_loop(llm_engine, monkeypatch):
    a = make_async(llm_engine, max_consecutive_step_failures=3)
    real_step = llm_engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return real_step()

    monkeypatch.setattr(llm_engine, "step", flaky_step)

    async def main():
        with pytest.raises(RequestFailedError, match="injected failure"):
            async for _ in a.generate("f1", "Hello", SamplingParams(max_tokens=4)):
                pass
        return [o async for o in a.generate("f2", "Hello", SamplingParams(max_tokens=4, ignore_eos=True))][-1]

    try:
        last = run(main())
    finally:
        a.stop()
    assert not a.is_dead and last.outputs[0].finish_reason == "length"
    monkeypatch.undo()
    assert_all_free(llm_engine)


def test_repeated_step_failures_mark_the_engine_dead(llm_engine, monkeypatch):
    a = make_async(llm_engine, max_consecutive_step_failures=2)

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm_engine, "step", broken_step)

    async def main():
        for i in range(2):
            with pytest.raises((RequestFailedError, EngineDeadError)):
                async for _ in a.generate(f"d{i}", "Hello", SamplingParams(max_tokens=4)):
                    pass
        for _ in range(100):
            if a.is_dead:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(EngineDeadError):
            await a.add_request("after", "Hello")

    try:
        run(main())
    finally:
        a.stop()
        monkeypatch.undo()
    assert a.is_dead and "device lost" in a.dead_reason
    # leave the shared engine clean for the next tests
    for rid in list(llm_engine.groups):
        llm_engine.abort_request(rid)
    llm_engine.step()


def test_shutdown_drains_in_flight_and_refuses_new(llm_engine):
    a = make_async(llm_engine)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def main():
        stream = await a.add_request("inflight", "Hello", params)

        async def consume():
            last = None
            async for last in stream:
                pass
            return last

        consumer = asyncio.ensure_future(consume())
        shutdown = asyncio.ensure_future(a.shutdown(drain_timeout=30))
        await asyncio.sleep(0)
        with pytest.raises(EngineShutdownError):
            await a.add_request("late", "Hello")
        drained = await shutdown
        return drained, await consumer

    drained, last = run(main())
    assert drained and last.outputs[0].finish_reason == "length" and len(last.outputs[0].token_ids) == 40
    assert_all_free(llm_engine)


def test_shutdown_past_drain_timeout_aborts(llm_engine):
    a = make_async(llm_engine)
    params = SamplingParams(temperature=0.0, max_tokens=230, ignore_eos=True)

    async def main():
        stream = await a.add_request("slow", "Hello", params)
        drained = await a.shutdown(drain_timeout=0.01)
        last = None
        async for last in stream:
            pass
        return drained, last

    drained, last = run(main())
    assert not drained and last.finished and last.outputs[0].finish_reason == "abort"
    assert_all_free(llm_engine)
