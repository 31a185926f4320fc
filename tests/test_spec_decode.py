"""Speculative decoding: greedy output equals plain decoding token for token with every proposer, whatever the batch
(mixed speculating / plain sequences, chunked prefill, preemption, n > 1, stop conditions); sampling keeps the
target's distribution (chi-square over many seeds); KV blocks all come back; bad settings are refused."""
from __future__ import annotations

import random

import pytest
import torch

from tokenmill import LLM, EngineConfig, SamplingParams
from tokenmill.engine.spec_decode import NgramProposer, greedy_verify, rejection_sample
from tokenmill.model.layers.linear import Linear

NEW_TOKENS = 24
SPEC = dict(num_speculative_tokens=4, speculative_disable_by_batch_size=64)


def _spans(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 49152) for _ in range(n)] for n in (5, 3, 7, 4, 11)]


_PROMPTS: list[list[int]] = []


def _prompts() -> list[list[int]]:
    """Each prompt: a span, the model's greedy continuation of it, and the span again, so that the n-gram proposer
    always finds matches (the full-attention random model rarely repeats itself, so they are mostly rejected; the
    sliding-window test and the draft-model cases cover accepted proposals). Built by the `reference` fixture."""
    assert _PROMPTS, "needs the reference fixture"
    return [list(p) for p in _PROMPTS]


def _all_free(llm: LLM) -> bool:
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def _tokens(outs) -> list[list[tuple[int, ...]]]:
    return [[tuple(c.token_ids) for c in o.outputs] for o in outs]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

SCENARIOS = {
    "default": dict(block_size=4, num_blocks=512),
    "chunked_prefill": dict(block_size=4, num_blocks=512, max_num_batched_tokens=8),
    "preemption": dict(block_size=4, num_blocks=16, max_num_batched_tokens=64),
}


@pytest.fixture(scope="module")
def target(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def reference(target):
    """Greedy outputs without speculation: each prompt alone, and with n = 2."""
    llm = LLM(target, dtype="float32", block_size=4, num_blocks=512)
    if not _PROMPTS:
        cont = llm.generate(_spans(), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        _PROMPTS.extend(span + o.outputs[0].token_ids + span for span, o in zip(_spans(), cont))
    plain = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    forked = llm.generate(_prompts()[:2], SamplingParams(n=2, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                          use_tqdm=False)
    return _tokens(plain), _tokens(forked)


def _method_kwargs(method: str, target: str, tiny_model_factory) -> dict:
    if method == "ngram":
        return dict(speculative_method="ngram")
    if method == "self":
        return dict(speculative_method="self", speculative_draft_layers=1)
    if method == "draft_same":  # the target as its own draft: nearly everything accepted
        return dict(speculative_method="draft", speculative_model=target)
    return dict(speculative_method="draft", speculative_model=tiny_model_factory("qwen2"))  # mostly rejected


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("method", ["ngram", "self", "draft_same", "draft_other"])
def test_greedy_equals_plain_decoding(method, scenario, target, reference, tiny_model_factory):
    plain, forked = reference
    llm = LLM(target, dtype="float32", **SCENARIOS[scenario], **SPEC, **_method_kwargs(method, target, tiny_model_factory))
    prompts = _prompts()
    # Mixed batch: one request opts out, the rest speculate, all in the same steps.
    params = [GREEDY] * len(prompts)
    params[1] = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, speculative=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert _tokens(outs) == plain
    assert outs[1].metrics.spec_draft_tokens == 0
    assert _all_free(llm)
    n2 = SamplingParams(n=2, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    assert _tokens(llm.generate(prompts[:2], n2, use_tqdm=False)) == forked
    assert _all_free(llm)
    stats = llm.engine.stats()
    assert stats["spec_decode_num_draft_tokens"] > 0
    if method == "draft_same":
        assert stats["spec_decode_acceptance_rate"] > 0.9
    if scenario == "preemption":
        assert stats["num_preemptions"] > 0


@pytest.mark.parametrize("method", ["ngram", "self"])
def test_greedy_sliding_window_model(method, tiny_model_factory):
    """Mistral's window (8 tokens) is shorter than the prompts: blocks leave the window while sequences speculate."""
    path = tiny_model_factory("mistral")
    plain = LLM(path, dtype="float32", block_size=4, num_blocks=256)
    cont = plain.generate(_spans(1), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    # Attention is shift-invariant (RoPE) and sees 2 x 8 tokens back at most: after the span and the start of its
    # continuation again, the model says the rest of the continuation, which the n-gram proposer finds earlier.
    prompts = [span + o.outputs[0].token_ids + span + o.outputs[0].token_ids[:4] for span, o in zip(_spans(1), cont)]
    want = plain.generate(prompts, GREEDY, use_tqdm=False)
    llm = LLM(path, dtype="float32", block_size=4, num_blocks=256, **SPEC,
              **_method_kwargs(method, path, tiny_model_factory))
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == _tokens(want)
    assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0  # both branches of verification ran
    assert _all_free(llm)


def test_draft_model_refused_with_freed_window_blocks(tiny_model_factory):
    path = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="attention windows"):
        LLM(path, dtype="float32", num_blocks=64, kv_window=16, speculative_model=path)


@pytest.mark.parametrize("method", ["ngram", "self"])
def test_stop_strings_max_tokens_and_min_tokens(method, target, reference, tiny_model_factory):
    plain_llm = LLM(target, dtype="float32", block_size=4, num_blocks=256)
    llm = LLM(target, dtype="float32", block_size=4, num_blocks=256, **SPEC,
              **_method_kwargs(method, target, tiny_model_factory))
    prompts = _prompts()
    base = plain_llm.generate(prompts, GREEDY, use_tqdm=False)
    params = []
    for o in base:
        text = o.outputs[0].text
        stop = text[len(text) // 2 : len(text) // 2 + 3] if len(text) > 8 else None
        params.append(SamplingParams(temperature=0.0, max_tokens=17, stop=stop, min_tokens=3,
                                     stop_token_ids=[o.outputs[0].token_ids[5]]))
    want = plain_llm.generate(prompts, params, use_tqdm=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].text == w.outputs[0].text
        assert (g.outputs[0].finish_reason, g.outputs[0].stop_reason) == (w.outputs[0].finish_reason,
                                                                          w.outputs[0].stop_reason)
    assert llm.engine.stats()["spec_decode_num_draft_tokens"] > 0
    assert _all_free(llm)


def test_logprobs_with_speculation(target, reference):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    want = LLM(target, dtype="float32", block_size=4, num_blocks=256).generate(_prompts()[:2], params, use_tqdm=False)
    llm = LLM(target, dtype="float32", block_size=4, num_blocks=256, speculative_method="draft",
              speculative_model=target, **SPEC)
    got = llm.generate(_prompts()[:2], params, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert lw.keys() == lg.keys()
            assert all(abs(lw[t] - lg[t]) < 1e-3 for t in lw)
    assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0


def test_speculation_off_for_large_batches_and_opt_out(target, reference):
    prompts = _prompts()[:4]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    busy = LLM(target, dtype="float32", block_size=4, num_blocks=256, speculative_method="draft",
               speculative_model=target, speculative_disable_by_batch_size=3)
    busy.generate(prompts, params, use_tqdm=False)  # 4 running > 3: nobody speculates
    assert busy.engine.stats()["spec_decode_num_draft_tokens"] == 0
    out = busy.generate(prompts[:1], params, use_tqdm=False)[0]  # alone: it speculates
    assert out.metrics.spec_draft_tokens > 0 and out.metrics.spec_accepted_tokens > 0
    opted = busy.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=10, speculative=False),
                          use_tqdm=False)[0]
    assert opted.metrics.spec_draft_tokens == 0


def test_metrics_exposed(target, reference):
    from tokenmill.serving.metrics import ServerMetrics

    llm = LLM(target, dtype="float32", block_size=4, num_blocks=256, speculative_method="draft",
              speculative_model=target, **SPEC)
    llm.generate(_prompts()[:2], GREEDY, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] <= stats["spec_decode_num_draft_tokens"]
    assert stats["spec_decode_mean_accepted_length"] > 1.5
    metrics = ServerMetrics()
    metrics.add_model("m", llm.engine.stats)
    text = metrics.render().decode()
    for name in ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                 "spec_decode_num_accepted_tokens_total", "spec_decode_acceptance_rate"):
        assert f"tokenmill:{name}" in text
    plain = LLM(target, dtype="float32", block_size=4, num_blocks=64)
    metrics = ServerMetrics()
    metrics.add_model("m", plain.engine.stats)
    assert "spec_decode" not in metrics.render().decode()


# ---- sampling: the output distribution is the target's ---------------------------------------------------------
SMALL_VOCAB = 32
NUM_SAMPLES = 2000


@pytest.fixture(scope="module")
def small_vocab_model(smollm2_tokenizer_dir, tmp_path_factory) -> str:
    """A tiny random model over 32 tokens with moderately peaked distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=SMALL_VOCAB, max_position_embeddings=128,
                      initializer_range=0.3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(3)
    path = str(tmp_path_factory.mktemp("small_vocab"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    import shutil, os

    for name in os.listdir(smollm2_tokenizer_dir):
        shutil.copy(os.path.join(smollm2_tokenizer_dir, name), os.path.join(path, name))
    return path


def _sample_first_tokens(path: str, prompt: list[int], params_kw: dict, **engine_kw) -> tuple[list[tuple], dict]:
    llm = LLM(path, dtype="float32", block_size=4, num_blocks=4096, max_num_seqs=256, **engine_kw)
    params = [SamplingParams(max_tokens=4, ignore_eos=True, seed=i, **params_kw) for i in range(NUM_SAMPLES)]
    outs = llm.generate([prompt] * NUM_SAMPLES, params, use_tqdm=False)
    assert _all_free(llm)
    return [tuple(o.outputs[0].token_ids) for o in outs], llm.engine.stats()


def _chi2_pvalue(a: list, b: list) -> float:
    """Chi-square test that samples a and b come from the same distribution (2 x categories contingency table)."""
    from test_sampler import chi2_sf

    # Categories seen fewer than 20 times in all are pooled, so that expected counts stay large enough.
    both = a + b
    rare = {c for c in set(both) if both.count(c) < 20}
    a = ["rare" if c in rare else c for c in a]
    b = ["rare" if c in rare else c for c in b]
    cats = sorted(set(a) | set(b), key=repr)
    table = torch.tensor([[a.count(c) for c in cats], [b.count(c) for c in cats]], dtype=torch.float64)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return chi2_sf(float(((table - expected) ** 2 / expected).sum()), dof=len(cats) - 1)


SMALL_PARAMS = dict(temperature=0.9, top_k=4)


@pytest.fixture(scope="module")
def small_vocab_plain(small_vocab_model) -> tuple[list[int], list[tuple]]:
    """A prompt whose end repeats its start, followed there by the model's own greedy continuation: the n-gram
    proposer proposes likely tokens (accepted often, not always). And samples without speculation."""
    seed = [5, 9, 17, 23]
    llm = LLM(small_vocab_model, dtype="float32", block_size=4, num_blocks=64)
    greedy = llm.generate([seed], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    prompt = seed + greedy[0].outputs[0].token_ids + seed
    return prompt, _sample_first_tokens(small_vocab_model, prompt, SMALL_PARAMS)[0]


@pytest.mark.parametrize("method", ["ngram", "self"])
def test_sampling_distribution_matches_target(method, small_vocab_model, small_vocab_plain):
    prompt, base = small_vocab_plain
    params_kw = SMALL_PARAMS
    spec_kw = dict(speculative_method=method, num_speculative_tokens=3, speculative_disable_by_batch_size=10_000)
    if method == "self":
        spec_kw["speculative_draft_layers"] = 1
    spec, stats = _sample_first_tokens(small_vocab_model, prompt, params_kw, **spec_kw)
    # Both branches of the rejection sampler ran many times.
    assert 0.05 < stats["spec_decode_acceptance_rate"] < 0.95, stats
    assert stats["spec_decode_num_draft_tokens"] > NUM_SAMPLES // 2
    # The joint distribution of the first three tokens (speculated ones among them) and the fourth token's.
    assert _chi2_pvalue([s[:3] for s in base], [s[:3] for s in spec]) > 1e-3
    assert _chi2_pvalue([s[3] for s in base], [s[3] for s in spec]) > 1e-3


def test_seeded_speculative_sampling_is_reproducible(target, reference):
    llm = LLM(target, dtype="float32", block_size=4, num_blocks=256, speculative_method="ngram", **SPEC)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, ignore_eos=True, seed=11)
    first = llm.generate(_prompts()[:3], params, use_tqdm=False)
    again = llm.generate(_prompts()[:3], params, use_tqdm=False)
    assert _tokens(first) == _tokens(again)


# ---- unit pieces -------------------------------------------------------------------------------------------------
def test_ngram_proposer_prefers_longest_most_recent_match():
    prop = NgramProposer(3, 1)
    assert prop.propose([1, 2, 3, 4, 9, 2, 3, 4, 7, 8, 2, 3, 4], 2) == [7, 8]  # latest match of [2, 3, 4]
    assert prop.propose([5, 6, 1, 2, 6], 3) == [1, 2, 6]  # only the 1-gram [6] matches
    assert prop.propose([1, 2, 3], 4) == []
    assert prop.propose([7], 4) == []


def test_verifiers_on_hand_made_distributions():
    assert greedy_verify([4, 5, 6], [4, 9]).tokens == [4, 5]
    assert greedy_verify([4, 5, 6], [4, 5]).tokens == [4, 5, 6]
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert rejection_sample(p, [1, 2], None, gen).tokens == [1, 2, 0]  # p(x) = 1: always accepted, then bonus
    v = rejection_sample(p, [0, 2], None, gen)  # p(x) = 0: rejected, resampled from p without x
    assert v.tokens == [1] and v.num_accepted == 0
    # With a draft distribution q: accept with min(1, p/q); the residual max(p - q, 0) decides the rest.
    p1 = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q1 = torch.tensor([[1.0, 0.0, 0.0]])
    counts = [0, 0, 0]
    for _ in range(2000):
        counts[rejection_sample(p1, [0], q1, gen).tokens[0]] += 1
    assert abs(counts[0] / 2000 - 0.5) < 0.05 and counts[2] == 0


# ---- bad settings ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
        (dict(speculative_method="ngram", num_speculative_tokens=17), "num_speculative_tokens"),
        (dict(speculative_method="medusa"), "speculative_method"),
        (dict(speculative_method="draft"), "speculative_model"),
        (dict(speculative_method="self", speculative_draft_layers=0), "speculative_draft_layers"),
        (dict(speculative_method="ngram", speculative_disable_by_batch_size=0), "disable_by_batch_size"),
        (dict(speculative_method="ngram", speculative_max_verify_rows=1), "max_verify_rows"),
    ],
)
def test_bad_speculative_settings_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_verify_rows_cap_shares_rows_and_keeps_greedy_output(target, reference, tiny_model_factory):
    """max_verify_rows 6 with 5 running sequences leaves 1 row to share: nobody speculates; with 2 running, 2 rows
    each. Output is plain greedy output either way."""
    plain, _ = reference
    llm = LLM(target, dtype="float32", block_size=4, num_blocks=512, speculative_max_verify_rows=6, **SPEC,
              **_method_kwargs("draft_same", target, tiny_model_factory))
    prompts = _prompts()
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == plain
    assert llm.engine.stats()["spec_decode_num_draft_tokens"] == 0
    outs = llm.generate(prompts[:2], GREEDY, use_tqdm=False)
    assert _tokens(outs) == plain[:2]
    stats = llm.engine.stats()
    assert 0 < stats["spec_decode_num_draft_tokens"] <= 2 * stats["spec_decode_num_drafts"]
    assert max(o.metrics.spec_draft_tokens for o in outs) > 0
    assert _all_free(llm)


def test_draft_with_other_vocabulary_refused(target, tiny_llama_dir):
    other = tiny_llama_dir(vocab_size=256)
    with pytest.raises(ValueError, match="vocabulary of 256 tokens but the target has 49152"):
        LLM(target, dtype="float32", num_blocks=64, speculative_model=other)


def test_self_draft_needs_fewer_layers_than_the_model(target):
    with pytest.raises(ValueError, match="smaller than the model's 2 layers"):
        LLM(target, dtype="float32", num_blocks=64, speculative_method="self", speculative_draft_layers=2)


def test_cli_flags_reach_the_config():
    import argparse

    from tokenmill.cli import add_engine_args, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    kw = engine_kwargs(p.parse_args(["--speculative-method", "self", "--num-speculative-tokens", "3",
                                     "--speculative-draft-layers", "2"]))
    cfg = EngineConfig(**kw).speculative
    assert (cfg.method, cfg.num_speculative_tokens, cfg.draft_layers) == ("self", 3, 2)
    assert EngineConfig().speculative.method is None  # off by default


def test_server_speculates_and_requests_opt_out(target, reference):
    """`tokenmill serve --speculative-model` (the target as its own draft: proposals accepted) through the official
    openai client: the greedy text equals the offline engine's without speculation, /metrics counts drafts and
    accepted tokens, and `"speculative": false` in a request opts it out."""
    openai = pytest.importorskip("openai")
    from server_process import ServerProcess

    prompt = _prompts()[0]
    srv = ServerProcess("--model", target, "--dtype", "float32", "--served-model-name", "tiny",
                        "--speculative-model", target, "--num-speculative-tokens", "4")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        res = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        offline = LLM(target, dtype="float32").generate([prompt], GREEDY, use_tqdm=False)[0]
        assert res.choices[0].text == offline.outputs[0].text
        drafted = srv.sample("tokenmill:spec_decode_num_draft_tokens_total")
        assert drafted > 0 and srv.sample("tokenmill:spec_decode_num_accepted_tokens_total") > 0
        client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                  extra_body={"ignore_eos": True, "speculative": False})
        assert srv.sample("tokenmill:spec_decode_num_draft_tokens_total") == drafted
    finally:
        assert srv.stop() == 0


def _needs_small_row_kernels() -> None:
    from tokenmill.model.layers.cpu_kernels import cpu_ops
    from tokenmill.model.layers.linear import onednn_bf16_available

    ops = cpu_ops()
    if ops is None or not hasattr(ops, "small_m_linear") or not onednn_bf16_available():
        pytest.skip("needs the AVX512-BF16 small-row matmul kernel")


def _repeat_prompts(num: int) -> list[list[dict]]:
    from tokenmill.bench.workloads import first_human_turns

    texts = [t for t in first_human_turns() if 400 < len(t) < 1200][:num]
    return [[{"role": "user", "content": f"Repeat the following text exactly, word for word:\n\n{t}"}] for t in texts]


@pytest.mark.parametrize("options", [{}, {"quantization": "int8", "kv_cache_dtype": "int8"}, {"kv_window": 64}],
                         ids=["bf16", "int8-weights-int8-kv", "kv-window"])
def test_bf16_verification_reproduces_plain_decoding_bit_for_bit(smollm2_gguf_path, options):
    """Proposed tokens are verified as decode rows through the same kernels as plain decoding, and the CPU's small-row
    matmuls compute each row the same whatever the row count: so even in bf16 (where a prefill-style pass rounds
    differently and flips SmolLM2's near-ties), with quantised weights and KV, and with a KV window, greedy output
    with speculation is plain greedy output, and every block comes back."""
    _needs_small_row_kernels()
    plain = LLM(smollm2_gguf_path, dtype="bfloat16", kv_cache_bytes=64 * 2**20, **options)
    spec = LLM(smollm2_gguf_path, dtype="bfloat16", kv_cache_bytes=64 * 2**20, speculative_method="ngram",
               num_speculative_tokens=7, **options)
    params = SamplingParams(temperature=0.0, max_tokens=80)
    for prompt in _repeat_prompts(2 if options else 3):
        want = plain.chat(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert spec.chat(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == want
    assert spec.engine.stats()["spec_decode_num_accepted_tokens"] > 10
    assert _all_free(spec)
    # the few-row kernel's default cap (rows that cost one plain step: 8 for small_m_linear, 16 with AMX)
    linears = [m for m in spec.engine.model.modules() if isinstance(m, Linear)]
    flat = max((m.flat_cost_rows for m in linears), default=0)
    amx = any(m.tiled_weight is not None for m in linears)
    assert flat == (0 if options.get("quantization") else 16 if amx else 8)
    assert spec.engine.spec.max_rows == (flat or None)
