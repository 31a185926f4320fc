"""Greedy output of the engine equals transformers' greedy output, token for token, for tiny random-weight
Llama / Mistral (sliding window) / Qwen2 models in fp32, whatever the batch composition, chunking, block size,
preemption, prefix-cache hits or n."""
from __future__ import annotations

import random

import pytest
import torch

from tokenmill import LLM, SamplingParams

NEW_TOKENS = 12


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def tiny(request, tiny_model_factory):
    """(model dir, HF reference model) for one architecture."""
    path = tiny_model_factory(request.param)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return request.param, path, ref


def hf_greedy(ref, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = ref.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs


# min_tokens masks EOS exactly as transformers' min_new_tokens does.
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)

# Engine settings each forcing a different path through scheduler, block manager and attention.
SCENARIOS = {
    "default": dict(),
    "chunked_prefill": dict(max_num_batched_tokens=8, block_size=4),
    "preemption": dict(num_blocks=14, block_size=4, max_num_batched_tokens=64),
    "one_seq_at_a_time": dict(max_num_seqs=1, block_size=32),
    # async scheduling: steps launched before the previous step's tokens are read back; fewer slots than prompts
    # (admission between steps that ran ahead), and a cache small enough to preempt
    "async": dict(async_scheduling=True, max_num_seqs=4, block_size=4),
    "async_preemption": dict(async_scheduling=True, num_blocks=14, block_size=4, max_num_batched_tokens=64),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_matches_transformers(tiny, scenario):
    arch, path, ref = tiny
    vocab = ref.config.vocab_size
    # Mixed lengths; the Mistral model's sliding window (8) is shorter than most prompts.
    prompts = _prompts(vocab, [3, 17, 9, 30, 1, 24])
    expected = hf_greedy(ref, prompts)
    llm = LLM(path, dtype="float32", **SCENARIOS[scenario])
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected
    if "preemption" in scenario:
        assert llm.engine.scheduler.num_preemptions > 0
    if "async" in scenario:  # most decode steps ran ahead
        assert llm.engine.stats()["async_steps"] >= NEW_TOKENS // 2
    _assert_all_blocks_free(llm)


def test_portable_decode_path_matches_transformers(tiny, monkeypatch):
    """The PyTorch paths (CUDA, or CPUs without a compiler): gather + SDPA decode, unfused norm/RoPE/SwiGLU."""
    import tokenmill.model.layers.cpu_kernels as cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_ops", None)
    monkeypatch.setattr(cpu_kernels, "_loaded", True)
    arch, path, ref = tiny
    prompts = _prompts(ref.config.vocab_size, [3, 17, 30], seed=5)
    llm = LLM(path, dtype="float32", block_size=4)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(ref, prompts)


def test_prefix_cache_hits_keep_greedy_output(tiny):
    arch, path, ref = tiny
    vocab = ref.config.vocab_size
    shared = _prompts(vocab, [20], seed=1)[0]
    tails = _prompts(vocab, [3, 7, 5], seed=2)
    prompts = [shared + t for t in tails]
    expected = hf_greedy(ref, prompts)
    llm = LLM(path, dtype="float32", block_size=4)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = llm.generate(prompts[1:] + prompts[:1], GREEDY, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["prefix_cache_hits"] >= 3 * 16  # 20 shared tokens -> 4 full blocks of 4, 3 requests hit
    got = [o.outputs[0].token_ids for o in first + rest]
    assert got == expected + expected[:1]
    _assert_all_blocks_free(llm)


def test_bounded_prefix_cache_keeps_greedy_output(tiny):
    """prefix_cache_bytes of two blocks: a finished request leaves only its two most recently released blocks (the
    head of its prompt) cached, and what is evicted is reused first."""
    from tokenmill.model.loader import load_model_config

    arch, path, ref = tiny
    vocab = ref.config.vocab_size
    shared = _prompts(vocab, [20], seed=1)[0]
    prompts = [shared + t for t in _prompts(vocab, [3, 7, 5], seed=2)]
    expected = hf_greedy(ref, prompts)
    block_bytes = 4 * load_model_config(path).kv_bytes_per_token(torch.float32)
    llm = LLM(path, dtype="float32", block_size=4, prefix_cache_bytes=2 * block_bytes + 1)
    bm = llm.engine.block_manager
    assert bm.max_cached_blocks == 2
    got = []
    for i, p in enumerate(prompts):  # one at a time: each finds what the previous one left
        got += [o.outputs[0].token_ids for o in llm.generate([p], GREEDY, use_tqdm=False)]
        assert len(bm.evictable) == 2
        if bm.window is None:  # (with a sliding window the head's blocks leave first, and a hit needs them)
            assert llm.engine.stats()["prefix_cache_hits"] == 8 * i
    assert got == expected
    _assert_all_blocks_free(llm)


def test_sliding_window_prefix_hit_without_the_evicted_head(tiny_model_factory):
    """Mistral (window 8, blocks of 4): a prompt's head blocks leave the window first, so a bounded cache evicts
    them first. A later prompt with the same 24-token prefix still hits all 24 tokens: its next token sees only
    blocks 4 and 5, which stayed cached. Greedy output equals transformers'."""
    from transformers import AutoModelForCausalLM

    from tokenmill.model.loader import load_model_config

    path = tiny_model_factory("mistral")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    vocab = ref.config.vocab_size
    shared = _prompts(vocab, [24], seed=4)[0]
    first, second = (shared + t for t in _prompts(vocab, [1, 3], seed=5))
    expected = hf_greedy(ref, [first, second])
    block_bytes = 4 * load_model_config(path).kv_bytes_per_token(torch.float32)
    llm = LLM(path, dtype="float32", block_size=4, prefix_cache_bytes=5 * block_bytes + 1)
    bm = llm.engine.block_manager
    assert bm.window == 8 and bm.max_cached_blocks == 5
    got = [o.outputs[0].token_ids for o in llm.generate([first], GREEDY, use_tqdm=False)]
    head = (hash(None), tuple(shared[:4]))
    assert head not in bm.cached  # evicted: it left the window first
    got += [o.outputs[0].token_ids for o in llm.generate([second], GREEDY, use_tqdm=False)]
    assert llm.engine.stats()["prefix_cache_hits"] == 24
    assert got == expected
    _assert_all_blocks_free(llm)


def test_parallel_samples_share_prompt_blocks(tiny):
    arch, path, ref = tiny
    prompts = _prompts(ref.config.vocab_size, [13, 6], seed=3)
    expected = hf_greedy(ref, prompts)
    llm = LLM(path, dtype="float32", block_size=4)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, exp in zip(outs, expected):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        for comp in out.outputs:
            assert comp.token_ids == exp
    _assert_all_blocks_free(llm)


def test_prompt_logits_match_transformers(tiny):
    arch, path, ref = tiny
    prompt = _prompts(ref.config.vocab_size, [21], seed=4)[0]
    llm = LLM(path, dtype="float32")
    ours = llm.engine.runner.prompt_logits(torch.tensor(prompt)).cpu()
    with torch.inference_mode():
        theirs = ref(torch.tensor([prompt])).logits[0].float()
    assert (ours - theirs).abs().max().item() < 1e-4


def _assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks, "every block must be free or held only by the prefix cache"
    assert all(rc == 0 for rc in bm.ref_counts)
