"""Engine behaviour on a tiny model: seeds, stop conditions, aborts, bad input, block accounting."""
from __future__ import annotations

import math

import pytest
import torch

from tokenmill import LLM, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    return LLM(tiny_model_factory("llama"), dtype="float32", block_size=4, num_blocks=256)


PROMPTS = [[11, 12, 13, 14, 15], [100, 200, 300], [7] * 19, [42, 43]]


def _all_free(llm: LLM) -> bool:
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_seed_reproducible_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    other = SamplingParams(temperature=1.3, max_tokens=7, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(PROMPTS[1:3] + [PROMPTS[0]] + PROMPTS[3:], [other, other, seeded, other], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    again = llm.generate([PROMPTS[3], PROMPTS[0]], [other, seeded], use_tqdm=False)
    assert again[1].outputs[0].token_ids == alone
    assert _all_free(llm)


def test_unseeded_samples_differ_and_n_gives_distinct_streams(llm):
    params = SamplingParams(n=4, temperature=1.5, max_tokens=8, ignore_eos=True, seed=7)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    seqs = {tuple(c.token_ids) for c in out.outputs}
    assert len(seqs) > 1
    # The same seed reproduces all n samples.
    out2 = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    assert [c.token_ids for c in out2.outputs] == [c.token_ids for c in out.outputs]


def test_max_tokens_min_tokens_and_stop_token_ids(llm):
    greedy = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    toks = greedy[0].outputs[0].token_ids
    assert len(toks) == 10 and greedy[0].outputs[0].finish_reason == "length"
    # Stop on the 4th greedy token.
    stop_tok = toks[3]
    first = toks.index(stop_tok)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok]), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop_tok
    assert comp.token_ids == toks[: first + 1]
    # min_tokens forbids stopping (and the stop token) before it.
    out = llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, min_tokens=6, stop_token_ids=[stop_tok]), use_tqdm=False
    )[0]
    assert len(out.outputs[0].token_ids) >= 6
    assert stop_tok not in out.outputs[0].token_ids[:6]


def test_stop_string_truncates_text(llm):
    base = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    text = base.outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, stop=[stop]), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == text[: text.index(stop)]


def test_logprobs_and_prompt_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 4
    for tok, entry in zip(comp.token_ids, comp.logprobs):
        assert tok in entry
        assert entry[tok] == max(entry.values())  # greedy picks the most likely token
        assert 3 <= len(entry) <= 4
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(PROMPTS[2])
    # Check against a direct forward pass of the prompt.
    logits = llm.engine.runner.prompt_logits(torch.tensor(PROMPTS[2]))
    ref = torch.log_softmax(logits.float(), -1)
    for pos in range(1, len(PROMPTS[2])):
        tok = PROMPTS[2][pos]
        assert math.isclose(out.prompt_logprobs[pos][tok], ref[pos - 1, tok].item(), abs_tol=1e-4)


def test_abort_frees_blocks_at_any_point(llm):
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"a{i}", prompt_token_ids=p, params=params)
    eng.abort_request("a0")  # still waiting
    eng.step()
    eng.step()
    eng.abort_request("a1")  # running
    finals = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
        if len(finals) >= 2 and "a2" not in finals:
            eng.abort_request("a2")
    assert finals["a3"].outputs[0].finish_reason == "length"
    assert _all_free(llm)


def test_timeout_aborts_request(llm):
    eng = llm.engine
    eng.add_request("t0", prompt_token_ids=PROMPTS[0], params=SamplingParams(max_tokens=200, ignore_eos=True, timeout=1e-9))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "timeout"
    assert _all_free(llm)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(presence_penalty=float("inf")), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logprobs=-1), "logprobs"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context_names_both_lengths(llm):
    n = llm.engine.max_model_len + 5
    with pytest.raises(ValueError, match=rf"{n}.*{llm.engine.max_model_len}"):
        llm.generate([[5] * n], use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[10**9]], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    # The engine is untouched and still serves.
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_failure_in_one_request_spares_the_others(llm, monkeypatch):
    eng = llm.engine
    real = eng._append_token

    def flaky(seq, token):
        if seq.group.request_id == "bad":
            raise RuntimeError("boom")
        return real(seq, token)

    monkeypatch.setattr(eng, "_append_token", flaky)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    eng.add_request("bad", prompt_token_ids=PROMPTS[0], params=params)
    eng.add_request("good", prompt_token_ids=PROMPTS[1], params=params)
    finals = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["bad"].outputs[0].finish_reason == "error" and "boom" in finals["bad"].error
    assert finals["good"].outputs[0].finish_reason == "length" and len(finals["good"].outputs[0].token_ids) == 5
    assert _all_free(llm)


def test_unsupported_architecture_is_named(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10,
        "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}))
    from tokenmill.config import ModelConfig
    from tokenmill.model.registry import model_class

    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        model_class(ModelConfig.from_hf_dir(str(tmp_path)))


def test_prefix_cache_is_bounded_by_default_on_cpu(llm):
    from tokenmill.engine.model_runner import CPU_DEFAULT_PREFIX_CACHE_BYTES

    bm = llm.engine.block_manager
    assert bm.max_cached_blocks == CPU_DEFAULT_PREFIX_CACHE_BYTES // llm.engine.runner.block_bytes(bm.block_size)


def test_engine_config_validation():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        EngineConfig(prefix_cache_bytes=-1)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=12)
