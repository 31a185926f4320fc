"""Weight quantisation: formats against float references, GGUF blocks against gguf's own dequantiser, the
kernels against the dequantised matmul, end-to-end greedy agreement, quantised checkpoints, bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tokenmill import EngineConfig, LLM, SamplingParams
from tokenmill.config import cpu_has_fast_bf16
from tokenmill.model.layers.quant_linear import QuantLinear
from tokenmill.quant.gguf_blocks import gguf_quantized_weight
from tokenmill.quant.policy import QuantPolicy, resolve_policy
from tokenmill.quant.weights import QuantizedWeight, pack_int4, quantize_int4, quantize_int8, unpack_int4


def _weight(n=192, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 7] *= 20  # an outlier input channel
    return w


def test_int8_round_trip_error_is_half_a_step():
    w = _weight()
    qw = quantize_int8(w)
    assert qw.qweight.dtype == torch.int8 and qw.scales.shape == (192,)
    err = (qw.dequantize() - w).abs()
    assert (err <= qw.scales[:, None] * 0.5 + 1e-7).all()
    assert qw.nbytes == 192 * 256 + 192 * 4


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_error_is_about_half_a_step(group):
    w = _weight()
    qw = quantize_int4(w, group)
    assert qw.qweight.shape == (192, 128) and qw.scales.shape == (192, 256 // group)
    err = (qw.dequantize() - w).abs().view(192, 256 // group, group)
    # half a step, plus the bf16 rounding of the stored zero point
    bound = qw.scales.float()[..., None] * 0.5 + qw.zeros.float().abs()[..., None] * 2**-8 + 1e-6
    assert (err <= bound).all()
    assert err.mean() < w.abs().mean() * 0.25


def test_int4_clipping_lowers_importance_weighted_error():
    w = _weight()
    w[3, 100] = 2.0  # one outlier weight stretches its group's range
    imp = torch.rand(256) + 0.1
    plain, clipped = quantize_int4(w, 64), quantize_int4(w, 64, importance=imp)

    def weighted(qw):
        return float(((qw.dequantize() - w).pow(2) * imp).sum())

    assert weighted(clipped) < weighted(plain)


def test_int4_nibble_packing_round_trips():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


@pytest.mark.parametrize("method,group", [("int8", 0), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 16, 40])
def test_quant_linear_matches_dequantised_matmul(method, group, rows):
    torch.manual_seed(rows)
    w = _weight(n=96, k=192)
    bias = torch.randn(96) * 0.1
    qw = quantize_int8(w) if method == "int8" else quantize_int4(w, group)
    layer = QuantLinear.from_quantized(qw, bias.to(torch.bfloat16), torch.bfloat16)
    layer.prepare()
    x = torch.randn(rows, 192).to(torch.bfloat16)
    y = layer(x).float()
    ref = x.float() @ qw.dequantize().t() + bias.to(torch.bfloat16).float()
    # kernels accumulate in fp32; int4 computes with bf16 scales and outputs round to bf16
    tol = 0.02 * ref.abs().max().item() + 1e-3
    assert y.shape == (rows, 96)
    assert (y - ref).abs().max().item() < tol
    # and against the unquantised weight: the quantisation error itself stays small
    exact = x.float() @ w.t() + bias.to(torch.bfloat16).float()
    rel = (y - exact).norm() / exact.norm()
    assert rel < (0.05 if method == "int8" else 0.2)


def test_int8_kernel_used_and_fallbacks_agree(monkeypatch):
    """The streaming kernel, PyTorch's int8 matmul and the dequantise path give the same numbers."""
    w = _weight(n=64, k=128)
    qw = quantize_int8(w)
    layer = QuantLinear.from_quantized(qw, None, torch.bfloat16)
    layer.prepare()
    if layer._int8_kernel is None:
        assert not cpu_has_fast_bf16(), "the int8 kernel should build on a CPU with AVX512-BF16"
        pytest.skip("no AVX512-BF16 on this CPU: the streaming int8 kernel is not built")
    x = torch.randn(2, 128).to(torch.bfloat16)
    y_kernel = layer(x).float()
    layer._int8_kernel = None
    y_torch = layer(x).float()
    layer.int8_max_rows = 0
    monkeypatch.setattr("tokenmill.model.layers.quant_linear.INT8_KERNEL_MAX_ROWS", 0)
    y_dense = layer(x).float()
    scale = y_dense.abs().max().item()
    assert (y_kernel - y_dense).abs().max().item() < 0.01 * scale
    assert (y_torch - y_dense).abs().max().item() < 0.01 * scale


@pytest.mark.parametrize("rows", [1, 2, 3, 16, 17, 70])
def test_int8_kernel_every_row_count(rows):
    """int8_linear against the dequantised weight, with a bias: the streaming kernel (1-16 rows) and AMX tiles (more
    rows, where the CPU has them)."""
    w = _weight(n=96, k=192)
    bias = torch.randn(96).to(torch.bfloat16)
    layer = QuantLinear.from_quantized(quantize_int8(w), bias, torch.bfloat16)
    layer.prepare()
    if layer._int8_kernel is None:
        pytest.skip("no AVX512-BF16 on this CPU: the int8 kernel is not built")
    if rows > layer.int8_max_rows:
        pytest.skip("no AMX on this CPU: the kernel takes at most 16 rows")
    torch.manual_seed(rows)
    x = torch.randn(rows, 192).to(torch.bfloat16)
    y = layer(x).float()
    ref = x.float() @ layer.dequantized_weight(torch.float32).t() + bias.float()
    torch.testing.assert_close(y, ref, atol=0.02 * ref.abs().max().item(), rtol=0.01)
    # a row's result does not depend on the rows beside it: the streaming kernel up to 16 rows, AMX beyond
    if rows <= 16:
        assert torch.equal(layer(x[-1:]).float(), y[-1:])
    else:
        assert torch.equal(layer(x[:17]).float(), y[:17])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_match_gguf_dequantiser(qtype):
    import gguf
    from gguf.quants import dequantize, quantize

    t = getattr(gguf.GGMLQuantizationType, qtype)
    x = _weight(n=64, k=128).numpy()
    data = quantize(x, t)
    ref = torch.from_numpy(dequantize(data, t).reshape(64, 128))
    qw = gguf_quantized_weight(qtype, data, (64, 128))
    got = qw.dequantize()
    if qtype == "Q8_0":  # re-quantised per row: within one int8 step of the row
        assert (got - ref).abs().max() <= qw.scales.max() * 0.5 + 1e-6
    else:  # exact up to rounding d and m from fp16 to bf16
        assert qw.method == "int4" and qw.group_size == 32
        assert (got - ref).abs().max() < 0.01 * np.abs(x).max()


def test_gguf_blocks_from_the_real_file(smollm2_gguf_path):
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(smollm2_gguf_path)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    assert t.tensor_type.name == "Q4_1"
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape))
    got = gguf_quantized_weight("Q4_1", t.data, shape).dequantize()
    assert (got - ref).abs().max() < 0.01 * ref.abs().max()


# ---------------------------------------------------------------------------------------------- end to end

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]


def _greedy(llm, prompts=PROMPTS, n=24):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _teacher_forced_agreement(llm, prompts, ref):
    """Per prompt, the share of the reference continuation's tokens that `llm` predicts as its top-1 when fed the
    reference so far. Unlike comparing free-running greedy outputs it does not hinge on the first near-tie (SmolLM2
    has many: the bf16 model's own decode and prefill paths differ on a few percent of tokens)."""
    out = []
    for p, r in zip(prompts, ref):
        ids = llm.engine.tokenizer.encode(p) + list(r)
        pred = llm.engine.runner.prompt_logits(torch.tensor(ids))[len(ids) - len(r) - 1 : -1].argmax(-1).tolist()
        out.append(sum(a == b for a, b in zip(pred, r)) / len(r))
    return out


@pytest.fixture(scope="module")
def smollm2_bf16_tokens():
    llm = LLM(dtype="bfloat16", kv_cache_bytes=32 * 2**20)
    return _greedy(llm), llm.engine.weight_bytes


def test_smollm2_quantised_modes_agree_with_bf16(smollm2_bf16_tokens):
    ref, ref_bytes = smollm2_bf16_tokens
    llm = LLM(dtype="bfloat16", kv_cache_bytes=32 * 2**20, quantization="int8")
    agree = _teacher_forced_agreement(llm, PROMPTS, ref)
    assert sum(agree) / len(agree) >= 0.85, agree  # measured 0.93
    assert llm.engine.weight_bytes["total"] < 0.51 * ref_bytes["total"]
    del llm
    # GGUF's own Q4_1 blocks: the bf16 model is those same blocks dequantised
    llm = LLM(dtype="bfloat16", kv_cache_bytes=32 * 2**20, quantization="gguf")
    layer = llm.engine.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.method == "int4" and layer.group_size == 32
    agree = _teacher_forced_agreement(llm, PROMPTS, ref)
    assert sum(agree) / len(agree) >= 0.85, agree  # measured 0.98


def _tiny_out(llm):
    return _greedy(llm, ["hello world, this is", "a b c d e f"], n=12)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["int8", "int4", "mixed"])
def test_quantised_checkpoint_round_trip(tiny_model_factory, tmp_path, arch, method):
    """`tokenmill quantize` output reloads into exactly the model quantised at load time."""
    from tokenmill.cli import main

    src = tiny_model_factory(arch)
    out = str(tmp_path / f"{arch}-{method}")
    assert main(["quantize", "--model", src, "--method", method, "--out", out, "--dtype", "float32"]) == 0
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "tokenmill" and qc["policy"]["name"] == method
    loaded = LLM(out, dtype="float32", num_blocks=64)
    at_load = LLM(src, dtype="float32", num_blocks=64, quantization=method)
    assert loaded.engine.quant_layout == at_load.engine.quant_layout
    assert _tiny_out(loaded) == _tiny_out(at_load)
    if method == "mixed":  # first and last block, embeddings and head stay in float
        assert "layers.0.self_attn.qkv_proj" not in loaded.engine.quant_layout
        assert "embed_tokens" not in loaded.engine.quant_layout
    else:
        assert "embed_tokens" in loaded.engine.quant_layout


def test_awq_reduces_layer_error_and_round_trips(tiny_model_factory, tmp_path):
    from tokenmill.quant.quantize import quantize_checkpoint

    src = tiny_model_factory("llama")
    res = quantize_checkpoint(src, "int4-awq", str(tmp_path / "awq"), group_size=32, calibration_samples_n=4,
                              calibration_seq_len=64, dtype="float32")
    errs = list(res.awq_report.values())
    assert len(errs) == 9  # 2 layers x (qkv, o, gate_up, down) and the untied head
    assert all(e["awq_error"] <= e["rtn_error"] for e in errs)
    assert sum(e["awq_error"] for e in errs) < sum(e["rtn_error"] for e in errs)
    llm = LLM(str(tmp_path / "awq"), dtype="float32", num_blocks=64)
    assert len(_tiny_out(llm)[0]) == 12


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_quantisation_input(tiny_model_factory, tmp_path):
    with pytest.raises(ValueError, match="unknown quantisation method 'int3'"):
        EngineConfig(quantization="int3")
    with pytest.raises(ValueError, match="group size 128 does not divide the input dimension 64"):
        quantize_int4(torch.randn(16, 64), 128)
    with pytest.raises(ValueError, match="group size must be one of"):
        resolve_policy("int4", group_size=48)
    with pytest.raises(ValueError, match="unknown weight format 'int2'"):
        QuantPolicy(default="int2")
    with pytest.raises(ValueError, match="needs calibration"):
        LLM(tiny_model_factory("llama"), dtype="float32", num_blocks=16, quantization="int4-awq")
    with pytest.raises(ValueError, match="not a .gguf file"):
        LLM(tiny_model_factory("llama"), dtype="float32", num_blocks=16, quantization="gguf")
    bad = tmp_path / "policy.json"
    bad.write_text('{"default": "int4", "colour": "red"}')
    with pytest.raises(ValueError, match="bad quantisation policy file"):
        resolve_policy(str(bad))
    with pytest.raises(ValueError, match="no kernel on device 'meta'"):
        QuantLinear(64, 32, "int4", 32, device="meta").prepare()
    with pytest.raises(ValueError, match="cannot fuse quantised weights"):
        QuantizedWeight.cat_rows([quantize_int8(torch.randn(4, 64)), quantize_int4(torch.randn(4, 64), 32)])


def test_quantize_cli_errors(capsys, tmp_path, tiny_model_factory):
    from tokenmill.cli import main

    assert main(["quantize", "--model", tiny_model_factory("llama"), "--method", "int4", "--group-size", "128",
                 "--out", str(tmp_path / "x")]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert main(["quantize", "--method", "fp3", "--out", str(tmp_path / "y")]) == 2
    assert "unknown quantisation method" in capsys.readouterr().err
