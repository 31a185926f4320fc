"""Capacity planner (tokenmill.planner, `tokenmill plan`): hand-computed byte formulas, fits / largest concurrency,
speed limits, the presets' published parameter counts, the real engine's allocations on SmolLM2, and the CLI."""
from __future__ import annotations

import json
import math

import pytest

from tokenmill.cli import main
from tokenmill.config import ModelConfig
from tokenmill.planner import (
    GiB,
    PRESET_HF_CONFIGS,
    DeviceSpec,
    activation_bytes_by_part,
    cpu_packed_weight_bytes,
    device_spec,
    kv_bytes_per_sequence,
    kv_bytes_per_token,
    linear_weight_bytes,
    plan,
    preset_config,
    weight_bytes,
    weight_bytes_by_part,
)


def small_cfg(**kw) -> ModelConfig:
    base = dict(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=False)
    return ModelConfig(**{**base, **kw})


def test_llama2_7b_fp16_weights_and_kv_by_hand():
    cfg = preset_config("llama-7b")
    assert cfg.num_params == 6_738_415_616  # Llama-2-7b-hf's published count
    w = weight_bytes(cfg, "fp16")
    assert w == 6_738_415_616 * 2 and abs(w / 1e9 - 13.5) < 0.05  # "13.5 GB"
    parts = weight_bytes_by_part(cfg, "fp16")
    assert parts["embed_tokens"] == parts["lm_head"] == 32000 * 4096 * 2
    assert parts["attention"] == 32 * 4 * 4096 * 4096 * 2 and parts["mlp"] == 32 * 3 * 4096 * 11008 * 2
    assert weight_bytes(cfg, "fp32") == 2 * w
    assert kv_bytes_per_token(cfg, "fp16") == 2 * 32 * 32 * 128 * 2 == 524_288
    assert kv_bytes_per_token(cfg, "fp16", "int8") == 2 * 32 * 32 * (128 + 2)
    assert kv_bytes_per_sequence(cfg, 4096, "fp16") == 2 * GiB
    # GQA: Llama-2-70B has 8 KV heads
    assert kv_bytes_per_token(preset_config("llama-70b"), "bf16") == 2 * 80 * 8 * 128 * 2


def test_int8_and_int4_formulas_on_a_small_config():
    cfg = small_cfg()  # qkv 128 x 64 (+ bias), o 64 x 64, gate_up 256 x 64, down 64 x 128, vocab 100 x 64, 2 layers
    assert linear_weight_bytes(128, 64, "bf16", "int8") == 128 * 64 + 128 * 4  # float32 scale per row
    assert linear_weight_bytes(128, 64, "bf16", "int4", 32) == 128 * 64 // 2 + 2 * 128 * 4
    int8 = weight_bytes_by_part(cfg, "bf16", "int8")
    assert int8 == {
        "embed_tokens": 6400 + 400,
        "attention": 2 * ((8192 + 512) + (4096 + 256) + 128 * 2),  # the QKV bias stays bf16
        "mlp": 2 * ((16384 + 1024) + (8192 + 256)),
        "norms": 5 * 64 * 2,  # norms stay bf16
        "lm_head": 6400 + 400,
    }
    int4 = weight_bytes_by_part(cfg, "fp32", "int4", group_size=32)
    assert int4 == {
        "embed_tokens": 3200 + 2 * 100 * 4,
        "attention": 2 * ((4096 + 2 * 128 * 4) + (2048 + 2 * 64 * 4) + 128 * 4),  # fp32 bias
        "mlp": 2 * ((8192 + 2 * 256 * 4) + (4096 + 4 * 64 * 4)),
        "norms": 5 * 64 * 4,
        "lm_head": 3200 + 800,
    }
    # tied: one shared quantised tensor
    tied = weight_bytes_by_part(small_cfg(tie_word_embeddings=True), "bf16", "int4", group_size=32)
    assert tied["lm_head"] == 0 and tied["embed_tokens"] == 4000
    assert kv_bytes_per_token(cfg, "bf16") == 2 * 2 * 2 * 16 * 2
    assert kv_bytes_per_token(cfg, "bf16", "int8") == 2 * 2 * 2 * (16 + 2)
    with pytest.raises(ValueError, match="quantization"):
        linear_weight_bytes(4, 4, "bf16", "int3")


def test_sliding_window_caps_kv_and_blocks_round_up():
    cfg = preset_config("mistral-7b")
    per_token = kv_bytes_per_token(cfg, "bf16")
    assert per_token == 2 * 32 * 8 * 128 * 2
    assert kv_bytes_per_sequence(cfg, 32768, "bf16") == 4096 * per_token
    assert kv_bytes_per_sequence(cfg, 1000, "bf16", block_size=16) == 1008 * per_token
    # a window on some layers only (Qwen2 style): only those are capped
    mixed = small_cfg(sliding_windows=[None, 8])
    per_layer = kv_bytes_per_token(mixed, "bf16") // 2
    assert kv_bytes_per_sequence(mixed, 100, "bf16") == 100 * per_layer + 8 * per_layer
    p = plan(cfg, device_spec("a100"), context=8192, concurrency=4)
    assert p.memory.kv_bytes == 4 * 4096 * per_token and p.memory.kv_tokens_per_sequence == 4096
    assert any("sliding window" in w for w in p.warnings)


def _device(memory_bytes: int, bandwidth: float = 1e12, flops: float = 1e14) -> DeviceSpec:
    return DeviceSpec("custom", "test", memory_bytes, bandwidth, {"fp16": flops, "bf16": flops},
                      runtime_overhead_bytes=0)


def test_fits_largest_concurrency_and_context_by_hand():
    cfg = preset_config("llama-7b")
    acts = sum(activation_bytes_by_part(cfg, "fp16", 512, num_sampled_rows=10, context=2048).values())
    # room for the weights, the activations and exactly 10 sequences of 2048 tokens (1 GiB of KV each)
    mem = weight_bytes(cfg, "fp16") + acts + 10 * GiB + 1
    dev = _device(mem)
    p = plan(cfg, dev, context=2048, concurrency=10, dtype="fp16", memory_fraction=1.0)
    assert p.memory.kv_bytes == 10 * GiB and p.memory.fits and p.memory.free_bytes == 1
    assert p.memory.max_concurrency == 10
    assert p.memory.max_context == 2048 and p.memory.max_context_limited_by == "memory"
    over = plan(cfg, dev, context=2048, concurrency=11, dtype="fp16", memory_fraction=1.0)
    assert not over.memory.fits and over.memory.free_bytes < 0 and over.memory.max_concurrency == 10
    assert over.memory.max_context == 2048 * 10 // 11 // 16 * 16  # whole blocks
    # the memory fraction scales the budget
    half = plan(cfg, dev, context=2048, concurrency=1, dtype="fp16", memory_fraction=0.5)
    assert half.memory.budget_bytes == mem // 2 and half.memory.max_concurrency < 10
    # a 70B model in fp16 does not fit an A100-40GB at all
    big = plan(preset_config("llama-70b"), device_spec("a100-40gb"), context=4096, concurrency=1)
    assert big.memory.weight_bytes > 130e9 and not big.memory.fits
    assert big.memory.max_concurrency == 0 and big.memory.max_context == 0
    # ...but int4 weights (group 32: 4 bits + a bf16 scale and zero per 32 weights = 5 bits, ~43 GB) fit an
    # 80 GB A100 with room for sequences
    q = plan(preset_config("llama-70b"), device_spec("a100"), context=4096, concurrency=8, quantization="int4")
    assert 40e9 < q.memory.weight_bytes < 46e9 and q.memory.fits and q.memory.max_concurrency >= 8


def test_speed_limits_by_hand():
    cfg = preset_config("llama-7b")
    dev = _device(200 * GiB, bandwidth=2e12, flops=300e12)
    p = plan(cfg, dev, context=4096, concurrency=1, dtype="fp16")
    w_read = weight_bytes(cfg, "fp16") - 32000 * 4096 * 2  # the input embedding is a lookup, not streamed
    assert p.speed.weight_bytes_read_per_step == w_read
    assert p.speed.single_stream_tok_s == pytest.approx(2e12 / (w_read + 2 * GiB))
    p16 = plan(cfg, dev, context=4096, concurrency=16, dtype="fp16")
    t_bw = (w_read + 16 * 2 * GiB) / 2e12
    flops_tok = 2 * (cfg.num_params - 32000 * 4096 - (2 * 32 + 1) * 4096) + 4 * 32 * 128 * 32 * 4096
    assert p16.speed.flops_per_token == flops_tok
    assert p16.speed.batch_bound == "bandwidth" and p16.speed.batch_step_s == pytest.approx(t_bw)
    assert p16.speed.aggregate_tok_s == pytest.approx(16 / t_bw)
    # with little compute the same batch is FLOP-bound
    slow = plan(cfg, _device(200 * GiB, bandwidth=2e12, flops=1e12), context=4096, concurrency=16, dtype="fp16")
    assert slow.speed.batch_bound == "compute"
    assert slow.speed.aggregate_tok_s == pytest.approx(1e12 / flops_tok)
    # int4 weights: fewer bytes per step, faster single stream
    q = plan(cfg, dev, context=4096, concurrency=1, dtype="fp16", quantization="int4")
    assert q.speed.single_stream_tok_s > 1.5 * p.speed.single_stream_tok_s


# published parameter counts of the checkpoints (Hugging Face model pages / safetensors metadata)
PUBLISHED_PARAMS = {
    "smollm2-135m": 134_515_008,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3-8b": 8_030_261_248,
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-70b": 68_976_648_192,
    "mistral-7b": 7_241_732_096,
    "qwen2-7b": 7_615_616_512,
}


def test_presets_match_published_parameter_counts():
    assert set(PUBLISHED_PARAMS) <= set(PRESET_HF_CONFIGS)
    for name, params in PUBLISHED_PARAMS.items():
        assert preset_config(name).num_params == params, name
    assert preset_config("Llama-70B").num_kv_heads == 8
    assert preset_config("mistral-7b").sliding_windows == [4096] * 32
    assert preset_config("qwen2-7b").sliding_windows == [None] * 28 and preset_config("qwen2-7b").attention_bias
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("gpt-5")


def test_smollm2_preset_matches_the_embedded_gguf(smollm2_gguf_path):
    from tokenmill.model.loader import load_model_config

    gguf, preset = load_model_config(smollm2_gguf_path), preset_config("smollm2-135m")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(gguf, f) == getattr(preset, f), f


def _tensors(x):
    """The tensors in x: a tensor, a list / tuple / dict of them, or a dataclass holding them (QuantizedKVCache)."""
    import dataclasses

    if hasattr(x, "untyped_storage"):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)
    elif dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a shared / tied tensor counts once). oneDNN-packed (opaque
    mkldnn) tensors have no storage: their bytes are numel x element size."""
    seen: dict[int, int] = {}
    opaque = 0
    for t in tensors:
        if t is None:
            continue
        if t.is_mkldnn:
            opaque += t.numel() * t.element_size()
        else:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()) + opaque


@pytest.mark.slow
def test_planner_within_10_percent_of_the_engine_on_smollm2(smollm2_gguf_path):
    """What "allocates" means here: the bytes of every tensor the engine's model holds after loading and
    `prepare_for_inference` -- parameters and buffers (the dense weights, the tied embedding once) plus, on CPUs with
    native bf16, the oneDNN-packed copies of the linear weights that `Linear.pack_for_cpu` adds (the dense weight is
    kept next to them for the small-batch kernel) -- and the KV tensors `runner.kv_caches`. The planner's weight
    bytes are the one logical copy; its `cpu_packed_weight_bytes` is the packed copy, counted in a `cpu` plan. The
    RoPE tables (plain float32 attributes) are part of the planner's activation estimate and checked on their own."""
    from tokenmill import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.model.layers.linear import Linear

    engine = LLMEngine(EngineConfig(kv_cache_bytes=64 * 2**20, max_model_len=512, dtype="bfloat16"))
    cfg, model = engine.model_config, engine.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    # a tile copy next to a dense weight that stays (the head tied to the embeddings) is a re-layout on top
    extra_tiled = [m.tiled_weight for m in linears if m.tiled_weight is not None and m.weight.numel()]
    extra = sum(t.numel() * t.element_size() for t in extra_tiled)  # (the weights share one huge-page arena)
    dense = _storage_bytes([*model.parameters(), *model.buffers()]) - extra
    packed = _storage_bytes([m.packed for m in linears]) + extra
    planned = weight_bytes(cfg, "bf16")
    assert abs(planned - dense) <= 0.10 * dense, (planned, dense)
    if packed:  # this CPU has native bf16: the engine packed the linears
        amx = any(m.tiled_weight is not None for m in linears)
        assert abs(cpu_packed_weight_bytes(cfg, "bf16", amx=amx) - packed) <= 0.10 * packed, (packed,)
    rope = model.rotary.cos.nbytes + model.rotary.sin.nbytes
    acts = activation_bytes_by_part(cfg, "bf16", context=engine.max_model_len)
    assert acts["rope_tables"] == rope

    kv_tokens = engine.block_manager.num_blocks * engine.runner.block_size
    kv_engine = _storage_bytes(_tensors(engine.runner.kv_caches))
    kv_planned = kv_bytes_per_sequence(cfg, kv_tokens, "bf16", block_size=engine.runner.block_size)
    assert abs(kv_planned - kv_engine) <= 0.10 * kv_engine, (kv_planned, kv_engine)

    # the whole `cpu` plan: weights (+ packed copy when the engine made one) as the engine holds them
    p = plan(cfg, device_spec("cpu", bandwidth_gbs=10, tflops=1), context=kv_tokens, concurrency=1)
    assert abs(p.memory.weight_bytes + p.memory.cpu_packed_weight_bytes - (dense + packed)) <= 0.10 * (dense + packed)
    assert abs(p.memory.kv_bytes - kv_engine) <= 0.10 * kv_engine


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_planner_quantised_weights_within_10_percent_of_the_engine(smollm2_gguf_path, quantization):
    """The engine's weight-only quantisation (`EngineConfig.quantization`, default group size 32) against the
    planner's formulas: the quantised tensors (values, scales, zeros) and the bf16 norms it holds."""
    from tokenmill import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine

    if "quantization" not in EngineConfig.__dataclass_fields__:
        pytest.skip("the engine has no weight quantisation (EngineConfig.quantization) yet")
    engine = LLMEngine(EngineConfig(kv_cache_bytes=16 * 2**20, max_model_len=256, dtype="bfloat16",
                                    quantization=quantization))
    held = _storage_bytes([*engine.model.parameters(), *engine.model.buffers()])
    planned = weight_bytes(engine.model_config, "bf16", quantization, group_size=32)
    assert abs(planned - held) <= 0.10 * held, (planned, held)


@pytest.mark.slow
def test_planner_int8_kv_within_10_percent_of_the_engine(smollm2_gguf_path):
    from tokenmill import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine

    import torch

    if "kv_cache_dtype" not in EngineConfig.__dataclass_fields__:
        pytest.skip("the engine has no int8 KV cache (EngineConfig.kv_cache_dtype) yet")
    engine = LLMEngine(EngineConfig(kv_cache_bytes=32 * 2**20, max_model_len=512, dtype="bfloat16",
                                    kv_cache_dtype="int8"))
    kv_tokens = engine.block_manager.num_blocks * engine.runner.block_size

    # runner.kv_caches: one QuantizedKVCache (int8 data + float16 scales) per layer
    kv_engine = _storage_bytes(_tensors(engine.runner.kv_caches))
    kv_planned = kv_bytes_per_sequence(engine.model_config, kv_tokens, "bf16", "int8")
    # the engine sizes its blocks with ModelConfig.kv_bytes_per_token: the same formula
    assert engine.model_config.kv_bytes_per_token(torch.int8) == kv_bytes_per_token(engine.model_config, "bf16", "int8")
    assert abs(kv_planned - kv_engine) <= 0.10 * kv_engine, (kv_planned, kv_engine)


# --------------------------------------------------------------------------------------------- CLI


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return int(e.code)


def test_cli_json_has_the_expected_keys(capsys):
    assert run_main(["plan", "--preset", "llama-7b", "--context", "4096", "--concurrency", "16", "--device", "a100",
                     "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) >= {"inputs", "model", "device", "memory", "speed", "warnings"}
    m, s = d["memory"], d["speed"]
    for k in ("weights_by_part", "weight_bytes", "kv_bytes_per_token", "kv_bytes", "activation_bytes",
              "runtime_overhead_bytes", "total_bytes", "budget_bytes", "fits", "max_concurrency", "max_context"):
        assert k in m, k
    assert set(m["weights_by_part"]) == {"embed_tokens", "attention", "mlp", "norms", "lm_head"}
    assert m["kv_bytes_per_token"] == 524_288 and m["kv_bytes"] == 16 * 2 * GiB  # bf16 = 2 bytes like fp16
    assert m["fits"] is True and m["max_concurrency"] >= 16
    for k in ("single_stream_tok_s", "per_sequence_tok_s", "aggregate_tok_s", "batch_bound"):
        assert k in s, k
    assert s["aggregate_tok_s"] > s["single_stream_tok_s"] > 0
    assert d["device"]["name"] == "a100" and d["inputs"]["context"] == 4096


def test_cli_table_and_custom_device(capsys, tmp_path):
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(PRESET_HF_CONFIGS["llama-3-8b"]))
    assert run_main(["plan", "--config", str(cfg_file), "--context", "8192", "--concurrency", "4", "--device",
                     "custom", "--memory-gb", "48", "--bandwidth-gbs", "864", "--tflops", "150",
                     "--quantization", "int8", "--kv-cache-dtype", "int8"]) == 0
    out = capsys.readouterr().out
    for text in ("weights total", "KV cache", "activations", "largest concurrency", "aggregate", "fits"):
        assert text in out, text
    assert "48.0 GiB" in out


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope", "--device", "a100"], "unknown preset 'nope'"),
    (["--preset", "llama-7b", "--device", "custom"], "--device custom needs --memory-gb, --bandwidth-gbs, --tflops"),
    (["--preset", "llama-7b", "--device", "custom", "--memory-gb", "24", "--bandwidth-gbs", "300"],
     "needs --tflops"),
    (["--preset", "llama-7b", "--device", "a100", "--context", "0"], "--context: must be >= 1"),
    (["--preset", "llama-7b", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["--preset", "llama-7b", "--device", "a100", "--memory-fraction", "1.5"], "--memory-fraction"),
    (["--config", "/nonexistent/config.json", "--device", "a100"], "/nonexistent/config.json"),
])
def test_cli_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    if "--context" not in argv:
        argv = [*argv, "--context", "1024"]
    assert run_main(["plan", *argv, "--concurrency", "2"]) == 2
    assert message in capsys.readouterr().err


def test_cpu_device_measures_this_machine():
    dev = device_spec("cpu", dtype="bf16")
    assert dev.measured and dev.memory_bytes > GiB and dev.bandwidth_bytes_s > 1e9 and dev.flops_for("bf16") > 1e9
    given = device_spec("cpu", bandwidth_gbs=50, tflops=2)
    assert not given.measured and given.bandwidth_bytes_s == 50e9 and math.isclose(given.flops_for("bf16"), 2e12)
