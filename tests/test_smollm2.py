"""The real model: SmolLM2-135M-Instruct from its GGUF, against transformers loading the same file."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from tokenmill import LLM, SamplingParams

logger = logging.getLogger(__name__)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Explain in one sentence why the sky is blue:",
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def smollm2_fp32():
    return LLM(dtype="float32", kv_cache_bytes=64 * 2**20)


@pytest.mark.slow
def test_greedy_32_tokens_match_transformers(hf_smollm2, smollm2_fp32):
    tok = smollm2_fp32.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    outs = smollm2_fp32.generate(prompts, SamplingParams(temperature=0, max_tokens=32, min_tokens=32), use_tqdm=False)
    max_diff = 0.0
    with torch.inference_mode():
        for ids, out in zip(prompts, outs):
            x = torch.tensor([ids])
            ref = hf_smollm2.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, min_new_tokens=32, do_sample=False)
            assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()
            ours = smollm2_fp32.engine.runner.prompt_logits(torch.tensor(ids))
            theirs = hf_smollm2(x).logits[0].float()
            max_diff = max(max_diff, (ours - theirs).abs().max().item())
    logger.warning("SmolLM2 fp32: max |logit difference| vs transformers = %.3g", max_diff)
    assert max_diff < 1e-3


@pytest.mark.slow
def test_chat_answers_sensibly(smollm2_fp32):
    out = smollm2_fp32.chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        SamplingParams(temperature=0, max_tokens=16),
        use_tqdm=False,
    )[0]
    assert "paris" in out.outputs[0].text.lower()
    assert out.outputs[0].finish_reason == "stop"  # the model ends its turn with EOS


@pytest.mark.slow
def test_bf16_default_stays_close(smollm2_fp32):
    """The default CPU dtype (bf16 on CPUs with bf16 matmul) reproduces fp32 greedy output on a prompt whose
    continuation is not a near-tie; blocks are all free afterwards."""
    llm = LLM(kv_cache_bytes=64 * 2**20)
    p = SamplingParams(temperature=0, max_tokens=8)
    a = llm.generate(PROMPTS[:1], p, use_tqdm=False)[0].outputs[0].text
    b = smollm2_fp32.generate(PROMPTS[:1], p, use_tqdm=False)[0].outputs[0].text
    assert "paris" in a.lower() and "paris" in b.lower()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
