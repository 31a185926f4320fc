"""Async scheduling (engine/async_step.py): a decode step is launched before the previous step's tokens are read back.
On CPU nothing overlaps, but the bookkeeping is the same as on a GPU, so it is checked here against the engine with
async scheduling off: same tokens, text, finish reasons and stop handling, no placeholder ever visible, every block
freed, prefix-cache keys built from real tokens only."""
from __future__ import annotations

import random

import pytest

from tokenmill import LLM, EngineConfig, SamplingParams
from tokenmill.engine.async_step import PLACEHOLDER_TOKEN


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def llama(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


def _engine_outputs(path: str, async_on: bool, requests, **kw):
    """Runs (prompt ids, params) requests through engine.step(); returns the final outputs by request id, every
    intermediate output (to check what streaming would see) and the engine."""
    llm = LLM(path, dtype="float32", block_size=4, async_scheduling=async_on, **kw)
    eng = llm.engine
    for i, (prompt, params) in enumerate(requests):
        eng.add_request(str(i), None, params, prompt_token_ids=prompt)
    final, seen = {}, []
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen.append(out)
            if out.finished:
                final[out.request_id] = out
    return final, seen, eng


def _summary(out):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs]


def _assert_clean(seen, eng) -> None:
    for out in seen:
        for c in out.outputs:
            assert PLACEHOLDER_TOKEN not in c.token_ids
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(rc == 0 for rc in bm.ref_counts)
    for key in bm.cached:  # prefix-cache keys hold real tokens only
        assert PLACEHOLDER_TOKEN not in key[1]


def test_stops_and_sampling_match_sync_engine(llama):
    vocab = 49152
    prompts = _prompts(vocab, [5, 12, 3, 20, 8, 9, 14], seed=11)
    probe, _, _ = _engine_outputs(llama, False, [(prompts[0], SamplingParams(temperature=0, max_tokens=12))])
    greedy0 = probe["0"].outputs[0].token_ids
    requests = [
        # a stop token met mid-generation (the greedy output's 6th token)
        (prompts[0], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[greedy0[5]])),
        (prompts[1], SamplingParams(temperature=0, max_tokens=1)),
        (prompts[2], SamplingParams(temperature=0, max_tokens=9, min_tokens=9)),
        # seeded sampling, two samples per request: each sample's generator sees the same draws
        (prompts[3], SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=10)),
        (prompts[4], SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=7)),
        # a stop string: the text stops where it starts, whatever the token boundaries
        (prompts[5], SamplingParams(temperature=0, max_tokens=16, stop=[probe["0"].outputs[0].text[4:7] or "a"])),
        (prompts[6], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)),
    ]
    sync, _, _ = _engine_outputs(llama, False, requests, max_num_seqs=4)
    asyn, seen, eng = _engine_outputs(llama, True, requests, max_num_seqs=4)
    assert {k: _summary(v) for k, v in asyn.items()} == {k: _summary(v) for k, v in sync.items()}
    assert sync["0"].outputs[0].finish_reason == "stop" and len(sync["0"].outputs[0].token_ids) <= 6
    assert eng.stats()["async_steps"] > 10
    _assert_clean(seen, eng)


def test_penalties_and_logprobs_take_synchronous_steps(llama):
    """Rows whose sampling reads the token history or the logits are read back every step; the others in the
    same batch still give the same result."""
    prompts = _prompts(49152, [6, 10, 4], seed=12)
    requests = [
        (prompts[0], SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3, frequency_penalty=0.5)),
        (prompts[1], SamplingParams(temperature=0, max_tokens=8, logprobs=2)),
        (prompts[2], SamplingParams(temperature=0, max_tokens=12)),
    ]
    sync, _, _ = _engine_outputs(llama, False, requests)
    asyn, seen, eng = _engine_outputs(llama, True, requests)
    for k in sync:
        assert _summary(asyn[k]) == _summary(sync[k])
    assert asyn["1"].outputs[0].logprobs == pytest.approx(sync["1"].outputs[0].logprobs)
    _assert_clean(seen, eng)


def test_abort_while_a_step_is_in_flight(llama):
    prompts = _prompts(49152, [7, 9], seed=13)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm = LLM(llama, dtype="float32", block_size=4, async_scheduling=True)
    eng = llm.engine
    eng.add_request("a", None, params, prompt_token_ids=prompts[0])
    eng.add_request("b", None, params, prompt_token_ids=prompts[1])
    for _ in range(4):
        eng.step()
    assert eng._pending is not None  # a step's tokens are still on their way
    assert eng.abort_request("a")
    outs = []
    while eng.has_unfinished_requests():
        outs.extend(eng.step())
    aborted = next(o for o in outs if o.request_id == "a")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert PLACEHOLDER_TOKEN not in aborted.outputs[0].token_ids
    done = next(o for o in outs if o.request_id == "b" and o.finished)
    ref, _, _ = _engine_outputs(llama, False, [(prompts[1], params)])
    assert done.outputs[0].token_ids == ref["0"].outputs[0].token_ids
    eng.step()  # the step that ran ahead for "a" is taken in and dropped
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_running_short_of_blocks_falls_back_to_a_normal_step(llama, monkeypatch):
    """Two sequences outgrow a 6-block cache while both run ahead: the step that runs ahead gives up when a block
    is missing, a normal step preempts one of them, and the result equals the synchronous engine's."""
    from tokenmill.engine.block_manager import BlockManager

    refused = []
    append_slots = BlockManager.append_slots

    def counting(self, seq, n, reserve=0):
        ok = append_slots(self, seq, n, reserve)
        if not ok and seq.num_pending_tokens:  # refused to a sequence whose input is still on the device
            refused.append(seq.seq_id)
        return ok

    monkeypatch.setattr(BlockManager, "append_slots", counting)
    prompts = _prompts(49152, [7, 6], seed=15)
    requests = [(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in prompts]
    sync, _, sync_eng = _engine_outputs(llama, False, requests, num_blocks=6)
    asyn, seen, eng = _engine_outputs(llama, True, requests, num_blocks=6)
    assert {k: _summary(v) for k, v in asyn.items()} == {k: _summary(v) for k, v in sync.items()}
    assert refused and eng.scheduler.num_preemptions > 0 and eng.stats()["async_steps"] > 0
    _assert_clean(seen, eng)


def test_context_limit_and_prefix_cache(llama):
    """A sequence that reaches max_model_len stops at the same token; a later request hits the blocks of the
    first one's generated text."""
    prompt = _prompts(49152, [10], seed=14)[0]
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    results = {}
    for async_on in (False, True):
        final, seen, eng = _engine_outputs(llama, async_on, [(prompt, params)], max_model_len=30)
        out = final["0"].outputs[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 20
        if async_on:  # every decode step ran ahead, and none past the last token
            assert eng.stats()["async_steps"] == 19
        # the whole conversation again: its blocks come from the prefix cache, generated tokens included
        eng.add_request("again", None, SamplingParams(temperature=0, max_tokens=1), prompt_token_ids=prompt + out.token_ids[:-1])
        while eng.has_unfinished_requests():
            seen.extend(eng.step())
        assert eng.stats()["prefix_cache_hits"] >= 24
        _assert_clean(seen, eng)
        results[async_on] = out.token_ids
    assert results[True] == results[False]


def test_config():
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(async_scheduling=True, speculative_method="ngram")
    import torch

    assert not EngineConfig().resolve_async_scheduling(torch.device("cpu"))
    assert EngineConfig().resolve_async_scheduling(torch.device("cuda", 0))
    assert not EngineConfig(speculative_method="ngram").resolve_async_scheduling(torch.device("cuda", 0))
