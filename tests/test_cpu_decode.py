"""The fused CPU decode path (model/cpu_decode.py) gives the layer loop's results bit for bit: logits of decode
batches of every size it takes, with GQA, MQA plus a sliding window, QKV bias, StreamingLLM windows with sinks,
int8 KV caches and int8 weights; and whole greedy generations in the engine."""
from __future__ import annotations

import random

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.engine.model_runner import batch_metadata
from tokenmill.model.layers import linear, quant_linear
from tokenmill.model.layers.kv_cache import QuantizedKVCache
from tokenmill.model.layers.cpu_kernels import cpu_ops
from tokenmill.model.layers.linear import amx_linear_available, onednn_bf16_available

pytestmark = pytest.mark.skipif(
    cpu_ops() is None or not hasattr(cpu_ops(), "decode_layers") or not onednn_bf16_available(),
    reason="no fused decode kernel on this CPU (needs AVX512-BF16, and oneDNN's bf16 for the packed linears)",
)


def _decode_batch(rows: int, block_size: int, num_blocks: int, seed: int):
    """A decode batch of `rows` sequences with random context lengths over disjoint random blocks."""
    rng = random.Random(seed)
    blocks = list(range(1, num_blocks))
    rng.shuffle(blocks)
    tables, lens, slots = [], [], []
    for _ in range(rows):
        n = rng.randint(1, 40)
        table = [blocks.pop() for _ in range(-(-n // block_size))]
        tables.append(table)
        lens.append(n)
        slots.append(table[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    meta = batch_metadata(slots, tables, lens, [], block_size, torch.device("cpu"))
    ids = torch.tensor([rng.randrange(10, 40000) for _ in range(rows)])
    return ids, torch.tensor(lens) - 1, meta


def _cache_tensors(caches: list) -> list[torch.Tensor]:
    """Every tensor of the per-layer caches (an int8 cache has values and scales)."""
    return [t for c in caches for t in ((c.data, c.scales) if isinstance(c, QuantizedKVCache) else (c,))]


@pytest.mark.parametrize("arch,kv_window,amx,kv_dtype,weights", [
    ("llama", None, True, "auto", None), ("mistral", None, True, "auto", None), ("qwen2", None, True, "auto", None),
    ("llama", 6, True, "auto", None),
    ("qwen2", None, False, "auto", None),  # small_m_linear's dense weights, as on CPUs without AMX
    ("qwen2", None, True, "int8", None), ("llama", 6, True, "int8", None), ("llama", None, False, "int8", None),
    # int8 weights: int8_linear's streaming kernel, and (with AMX) its AMX tiles for 17+ rows
    ("qwen2", None, False, "auto", "int8"), ("llama", 6, False, "int8", "int8"), ("qwen2", None, True, "auto", "int8"),
])
def test_fused_decode_logits_equal_layer_loop(tiny_model_factory, monkeypatch, arch, kv_window, amx, kv_dtype,
                                              weights):
    if amx and not amx_linear_available():
        pytest.skip("no AMX-BF16 on this CPU (the small_m_linear case covers the fused path)")
    if not amx:
        monkeypatch.setattr(linear, "amx_linear_available", lambda: False)
        monkeypatch.setattr(quant_linear, "amx_linear_available", lambda: False)
    llm = LLM(tiny_model_factory(arch), dtype="bfloat16", block_size=4, kv_window=kv_window, kv_sinks=2,
              kv_cache_dtype=kv_dtype, quantization=weights)
    model, caches = llm.engine.model, llm.engine.runner.kv_caches
    fused = model.fused_decode
    assert fused is not None
    # the kernel each case means to test
    if weights == "int8":
        assert all(w.dtype == torch.int8 for w in fused.weights[1::6]) and all(s is not None for s in fused.scales)
    else:
        assert all(w.dim() == (4 if amx else 2) for w in fused.weights[1::6])
    if kv_window is not None:
        assert any(a.sinks == 2 and a.window == kv_window for a in fused.attns)
    for t in _cache_tensors(caches):  # a filled cache: every context token has keys and values
        if t.dtype == torch.int8:
            t.random_(-127, 128)
        elif t.dtype == torch.float16:  # int8 scales
            t.uniform_(0.001, 0.05)
        else:
            t.normal_()
    with torch.inference_mode():
        for rows in sorted({1, 3, min(17, fused.max_rows), fused.max_rows}):
            ids, pos, meta = _decode_batch(rows, 4, caches[0].shape[1], seed=rows)
            idx = torch.arange(rows)
            assert fused.accepts(rows, caches, meta)
            got = model(ids, pos, caches, meta, idx)
            fused_caches = [t.clone() for t in _cache_tensors(caches)]
            model.fused_decode = None
            try:
                want = model(ids, pos, caches, meta, idx)
            finally:
                model.fused_decode = fused
            assert torch.equal(got, want), rows
            # both wrote the same keys and values
            assert all(torch.equal(a, b) for a, b in zip(fused_caches, _cache_tensors(caches)))


def test_fused_decode_declines_what_it_does_not_run(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), dtype="bfloat16", block_size=4)
    fused = llm.engine.model.fused_decode
    caches = llm.engine.runner.kv_caches
    _, _, meta = _decode_batch(2, 4, caches[0].shape[1], seed=0)
    assert fused.accepts(2, caches, meta)
    assert not fused.accepts(fused.max_rows + 1, caches, meta)
    with_prefill = batch_metadata([5, 6], [[1]], [3], [object()], 4, torch.device("cpu"))
    assert not fused.accepts(1, caches, with_prefill)
    # no fused path for models it cannot serve
    assert LLM(tiny_model_factory("llama"), dtype="float32").engine.model.fused_decode is None
    assert LLM(tiny_model_factory("llama"), dtype="bfloat16", quantization="int4").engine.model.fused_decode is None
    fp32_kv = [c.float() for c in caches]  # a cache in another dtype than the weights'
    assert not fused.accepts(2, fp32_kv, meta)


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_greedy_generation_same_with_and_without_fused_decode(tiny_model_factory, kv_dtype):
    path = tiny_model_factory("mistral")
    rng = random.Random(3)
    prompts = [[rng.randrange(10, 40000) for _ in range(n)] for n in (3, 17, 9, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = {}
    for fused in (True, False):
        llm = LLM(path, dtype="bfloat16", block_size=4, kv_cache_dtype=kv_dtype)
        assert llm.engine.model.fused_decode is not None
        if not fused:
            llm.engine.model.fused_decode = None
        outs[fused] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[True] == outs[False]
