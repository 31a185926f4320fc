"""Capacity planner: how much memory a model needs at a given context and concurrency on a device, what the
largest concurrency / context that fits is, and how fast decoding can at best be (``tokenmill plan``).

Everything is computed from the model's config (no weights are loaded) and a device's datasheet numbers (or, for
``cpu``, this machine's RAM and a quick bandwidth / matmul measurement from :mod:`tokenmill.bench.machine`).

Byte formulas (one function each; the engine's quantised layers and int8 KV cache implement exactly these):

* float weights (:func:`linear_weight_bytes` with ``quantization="none"``): 2 bytes/param for bf16/fp16, 4 for fp32.
  RMSNorm weights and biases always stay in the float dtype.
* int8 weight-only, per output channel: ``N*K*1 + N*2`` bytes for an N x K linear (one bf16 scale per output row).
  Every linear including lm_head; the embedding table is int8 too (one scale per row); a tied embedding/lm_head
  shares one int8 tensor.
* int4 group-wise (group g along K, asymmetric): ``N*K/2 + (K/g)*N*2*2`` bytes (bf16 scale and zero per group),
  embeddings and lm_head included (tied: shared). ``K/g`` is rounded up when g does not divide K.
* KV cache per token (:func:`kv_bytes_per_token`): float cache ``2 * layers * kv_heads * head_dim * elem``; int8
  cache ``2 * layers * kv_heads * (head_dim + 2)`` (int8 values plus one fp16 scale per token per head).
  Sliding-window layers hold at most ``window`` tokens per sequence (:func:`kv_bytes_per_sequence`).

Memory total = weights + KV cache (C sequences of L tokens, rounded up to whole KV blocks) + activation headroom +
a fixed runtime overhead (+ on ``cpu`` in bf16, the second copy of the linear weights the engine keeps for its CPU
kernels, see :func:`cpu_packed_weight_bytes` and ``model/layers/linear.py``). It fits when total <= device memory x
``memory_fraction``.

Activation headroom (:func:`activation_bytes_by_part`), for one forward pass over T = ``max_num_batched_tokens``
tokens in the float dtype (element size e), R = min(T, concurrency) sampled rows:

* hidden states: residual stream, layer output and normed input, ``3 * T * hidden * e``;
* the larger of the attention intermediates (fused QKV output plus attention output,
  ``T * (q + 2 kv + q) * e``) and the MLP intermediates (fused gate_up output plus the SwiGLU product,
  ``T * 3 * intermediate * e``) -- they are not alive at the same time;
* logits for the sampled rows only: lm_head output in the float dtype, its float32 copy and two float32 working
  copies in the sampler (probabilities, sorted values for top-p/top-k), ``R * vocab * (e + 12)``;
* the float32 RoPE cos/sin tables for the context, ``context * head_dim * 4``.

Prefill attention is tiled (flash / SDPA), so no L x L score matrix is counted. The runtime overhead per device
is a fixed allowance: ~1 GiB on GPUs (CUDA context ~0.5 GB, cuBLAS workspaces, caching-allocator fragmentation),
0.5 GiB on CPU (Python, PyTorch and oneDNN libraries, tokenizer: ``import torch, tokenmill`` alone is ~0.22 GiB
RSS); ``--overhead-gb`` overrides it.

Decode speed limits (upper bounds; real kernels reach some fraction of them). One decode step of C sequences at
context L reads every weight once (the embedding table only when it is also the tied lm_head; otherwise a lookup
reads just C rows) plus each sequence's KV, and does ``2 * matmul params + 4 * heads * head_dim * sum over layers
of min(L, window)`` FLOPs per sequence (the linear layers plus QK^T and PV). So:

* single stream: ``bandwidth / (weight bytes read + KV bytes of one sequence)`` tokens/s;
* batch C: step time = max(bandwidth-bound ``(weights + C * KV) / bandwidth``, compute-bound
  ``C * FLOPs per token / peak FLOP/s``); per-sequence tokens/s = 1 / step; aggregate = C / step.

Memory sizes given on the command line (``--memory-gb``) and device capacities are GiB (2**30 bytes: an "80 GB"
GPU has 80 GiB of HBM); bandwidths are GB/s (1e9 bytes/s) and FLOP rates TFLOP/s (1e12), as datasheets give them.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .argtypes import fraction, non_negative_float, positive_float, positive_int
from .config import ModelConfig

logger = logging.getLogger(__name__)

GiB = 2**30

QUANTIZATIONS = ("none", "int8", "int4")
KV_CACHE_DTYPES = ("auto", "int8")
# canonical short names of the float dtypes
_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32",
}
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# bench.machine.measure_matmul names dtypes the torch way
_TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def canonical_dtype(dtype: str) -> str:
    """'bf16' | 'fp16' | 'fp32' for any accepted spelling (bfloat16, float16, half, float32, ...)."""
    try:
        return _DTYPE_ALIASES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose from bf16, fp16, fp32") from None


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a float dtype (bf16/fp16: 2, fp32: 4)."""
    return _DTYPE_BYTES[canonical_dtype(dtype)]


def _check_quantization(quantization: str | None, group_size: int) -> str:
    q = "none" if quantization is None else str(quantization).lower()
    if q not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    if q == "int4" and group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return q


# ============================================================================================ byte formulas


def linear_weight_bytes(out_features: int, in_features: int, dtype: str = "bf16", quantization: str = "none",
                        group_size: int = 32) -> int:
    """Bytes of the weight of one N x K linear layer (N = out_features, K = in_features), without its bias.

    none: ``N*K*elem``; int8 (per output channel): ``N*K + N*4`` (one float32 scale per row); int4 (group-wise along K,
    asymmetric): ``N*K/2 + ceil(K/g)*N*2*2`` (a bf16 scale and a bf16 zero per group). The same formula covers an
    embedding table (N = vocab rows, K = hidden).
    """
    q = _check_quantization(quantization, group_size)
    n, k = int(out_features), int(in_features)
    if q == "none":
        return n * k * dtype_bytes(dtype)
    if q == "int8":
        return n * k + n * 4
    return (n * k + 1) // 2 + math.ceil(k / group_size) * n * 2 * 2


def weight_bytes_by_part(cfg: ModelConfig, dtype: str = "bf16", quantization: str = "none",
                         group_size: int = 32) -> dict[str, int]:
    """Weight bytes by part: embed_tokens, attention (QKV + o projections and the QKV bias), mlp (gate/up/down),
    norms, lm_head (0 when tied to the embeddings: the one shared tensor is counted under embed_tokens).
    Norm weights and biases stay in the float dtype whatever the quantisation."""
    q = _check_quantization(quantization, group_size)
    elem = dtype_bytes(dtype)
    h, i, d, n = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
    qkv_out = q_size + 2 * kv_size

    def lin(out_f: int, in_f: int) -> int:
        return linear_weight_bytes(out_f, in_f, dtype, q, group_size)

    attn = lin(qkv_out, h) + lin(h, q_size) + (qkv_out * elem if cfg.attention_bias else 0)
    mlp = lin(2 * i, h) + lin(h, i)
    return {
        "embed_tokens": lin(cfg.vocab_size, h),
        "attention": n * attn,
        "mlp": n * mlp,
        "norms": (2 * n + 1) * h * elem,
        "lm_head": 0 if cfg.tie_word_embeddings else lin(cfg.vocab_size, h),
    }


def weight_bytes(cfg: ModelConfig, dtype: str = "bf16", quantization: str = "none", group_size: int = 32) -> int:
    """Total weight bytes (sum of :func:`weight_bytes_by_part`)."""
    return sum(weight_bytes_by_part(cfg, dtype, quantization, group_size).values())


def _check_kv_dtype(kv_cache_dtype: str | None) -> str:
    kv = "auto" if kv_cache_dtype is None else str(kv_cache_dtype).lower()
    if kv not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose from {', '.join(KV_CACHE_DTYPES)}")
    return kv


def kv_bytes_per_token_per_layer(cfg: ModelConfig, dtype: str = "bf16", kv_cache_dtype: str = "auto") -> int:
    """KV bytes one token takes in one layer: ``2 * kv_heads * head_dim * elem`` for a float cache (``auto``: the
    model's float dtype), ``2 * kv_heads * (head_dim + 2)`` for int8 (values plus an fp16 scale per token per head)."""
    if _check_kv_dtype(kv_cache_dtype) == "int8":
        return 2 * cfg.num_kv_heads * (cfg.head_dim + 2)
    return 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes(dtype)


def kv_bytes_per_token(cfg: ModelConfig, dtype: str = "bf16", kv_cache_dtype: str = "auto") -> int:
    """KV bytes per token over all layers: float ``2 * layers * kv_heads * head_dim * elem``; int8
    ``2 * layers * kv_heads * (head_dim + 2)``."""
    return cfg.num_layers * kv_bytes_per_token_per_layer(cfg, dtype, kv_cache_dtype)


def kv_bytes_per_sequence(cfg: ModelConfig, num_tokens: int, dtype: str = "bf16", kv_cache_dtype: str = "auto",
                          block_size: int = 1) -> int:
    """KV bytes of one sequence of ``num_tokens`` tokens: per layer, the tokens it holds (all of them, or at most
    ``window`` on a sliding-window layer), rounded up to whole blocks of ``block_size`` tokens."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    per_layer = kv_bytes_per_token_per_layer(cfg, dtype, kv_cache_dtype)
    total = 0
    for window in cfg.sliding_windows:
        held = num_tokens if window is None else min(num_tokens, window)
        total += math.ceil(held / block_size) * block_size * per_layer
    return total


def activation_bytes_by_part(cfg: ModelConfig, dtype: str = "bf16", max_num_batched_tokens: int = 512,
                             num_sampled_rows: int = 1, context: int = 0) -> dict[str, int]:
    """Activation headroom of one forward pass over ``max_num_batched_tokens`` tokens (see the module docstring):
    hidden states, the larger of the attention / MLP intermediates, logits of ``num_sampled_rows`` rows (with the
    sampler's float32 copies) and the RoPE tables for ``context`` positions."""
    e = dtype_bytes(dtype)
    t = max_num_batched_tokens
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = t * (q_size + 2 * kv_size + q_size) * e
    mlp = t * 3 * cfg.intermediate_size * e
    return {
        "hidden_states": 3 * t * cfg.hidden_size * e,
        "layer_intermediates": max(attn, mlp),
        "logits": num_sampled_rows * cfg.vocab_size * (e + 12),
        "rope_tables": context * cfg.head_dim * 4,
    }


def cpu_packed_weight_bytes(cfg: ModelConfig, dtype: str = "bf16", amx: bool = False) -> int:
    """Bytes of the second copy the engine makes of bf16 linear weights on CPUs with native bf16
    (``Linear.pack_for_cpu``), on top of :func:`weight_bytes`: a oneDNN-packed copy of QKV, o, gate_up and down
    next to the few-row kernel's copy (the dense weight, or with ``amx`` its AMX tile layout). The head: without
    ``amx`` a oneDNN copy too; with ``amx`` only its tile copy, which is extra when the head is tied to the
    embeddings (the dense embedding stays for lookups)."""
    if canonical_dtype(dtype) != "bf16":
        return 0
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    params = n * (h * (q_size + 2 * kv_size) + q_size * h + 3 * h * i)
    if not amx or cfg.tie_word_embeddings:
        params += cfg.vocab_size * h
    return params * 2


def attention_flops_per_token(cfg: ModelConfig, context: int) -> int:
    """FLOPs of QK^T and PV for one new token attending to ``context`` tokens (windows respected)."""
    held = sum(context if w is None else min(context, w) for w in cfg.sliding_windows)
    return 4 * cfg.num_heads * cfg.head_dim * held


# ============================================================================================ presets

# Published config.json values (Hugging Face hub) of the models, reduced to what the planner needs; built into a
# ModelConfig through ModelConfig.from_hf_config, the path `--config` takes.
PRESET_HF_CONFIGS: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct)
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
                         torch_dtype="bfloat16"),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8192},
                         torch_dtype="bfloat16"),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0,
                       torch_dtype="bfloat16"),
    # meta-llama/Llama-2-7b-hf
    "llama-7b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                     tie_word_embeddings=False, max_position_embeddings=4096, torch_dtype="float16"),
    # meta-llama/Llama-2-13b-hf
    "llama-13b": dict(architectures=["LlamaForCausalLM"], hidden_size=5120, intermediate_size=13824,
                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                      tie_word_embeddings=False, max_position_embeddings=4096, torch_dtype="float16"),
    # meta-llama/Llama-2-70b-hf (GQA: 8 KV heads)
    "llama-70b": dict(architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                      tie_word_embeddings=False, max_position_embeddings=4096, torch_dtype="float16"),
    # mistralai/Mistral-7B-v0.1 (GQA, sliding window 4096 on every layer)
    "mistral-7b": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=32768,
                       sliding_window=4096, rope_theta=10000.0, torch_dtype="bfloat16"),
    # Qwen/Qwen2-7B (QKV bias; its sliding_window is off: use_sliding_window=false)
    "qwen2-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                     intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=131072,
                     sliding_window=131072, use_sliding_window=False, max_window_layers=28, rope_theta=1000000.0,
                     torch_dtype="bfloat16"),
}


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a preset (case-insensitive name; see PRESET_HF_CONFIGS)."""
    key = name.lower()
    if key not in PRESET_HF_CONFIGS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESET_HF_CONFIGS)}")
    return ModelConfig.from_hf_config(dict(PRESET_HF_CONFIGS[key]))


def config_from_json(path: str) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    try:
        return ModelConfig.from_hf_config(cfg)
    except KeyError as e:
        raise ValueError(f"{path} lacks the field {e.args[0]!r} a Llama-family config needs") from None


# ============================================================================================ devices


@dataclass
class DeviceSpec:
    """Memory, bandwidth and peak dense FLOP/s (per float dtype) of a device, plus the fixed runtime overhead."""

    name: str
    description: str
    memory_bytes: int
    bandwidth_bytes_s: float
    peak_flops: dict[str, float]  # "bf16" / "fp16" / "fp32" -> FLOP/s (dense)
    runtime_overhead_bytes: int
    measured: bool = False  # bandwidth / FLOP/s measured on this machine (device "cpu")

    def flops_for(self, dtype: str) -> float:
        d = canonical_dtype(dtype)
        if d not in self.peak_flops:
            raise ValueError(f"no peak FLOP/s for {d} on device {self.name}; pass --tflops")
        return self.peak_flops[d]


def _gpu(name: str, description: str, mem_gib: float, tb_s: float, bf16_tflops: float,
         fp32_tflops: float) -> DeviceSpec:
    return DeviceSpec(name, description, int(mem_gib * GiB), tb_s * 1e12,
                      {"bf16": bf16_tflops * 1e12, "fp16": bf16_tflops * 1e12, "fp32": fp32_tflops * 1e12},
                      runtime_overhead_bytes=GiB)


# Vendor datasheet numbers (NVIDIA H100 Tensor Core GPU datasheet; A100 datasheet; L4 datasheet): memory
# capacity, memory bandwidth, dense (no sparsity) BF16/FP16 tensor-core TFLOP/s, and FP32 (non-tensor, what an
# fp32 matmul gets with TF32 off, PyTorch's default for matmuls) TFLOP/s.
BUILTIN_DEVICES: dict[str, DeviceSpec] = {
    "h100": _gpu("h100", "NVIDIA H100 SXM5 80GB (HBM3)", 80, 3.35, 989.4, 66.9),
    "a100": _gpu("a100", "NVIDIA A100 80GB SXM (HBM2e)", 80, 2.039, 312.0, 19.5),
    "a100-40gb": _gpu("a100-40gb", "NVIDIA A100 40GB (HBM2)", 40, 1.555, 312.0, 19.5),
    "l4": _gpu("l4", "NVIDIA L4 24GB (GDDR6)", 24, 0.300, 121.0, 30.3),
}
DEVICE_NAMES = (*BUILTIN_DEVICES, "cpu", "custom")
CPU_RUNTIME_OVERHEAD_BYTES = GiB // 2
CUSTOM_RUNTIME_OVERHEAD_BYTES = GiB


def total_ram_bytes() -> int:
    """Total physical memory of this machine."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, got {value}")


def device_spec(name: str, *, dtype: str = "bf16", memory_gb: float | None = None,
                bandwidth_gbs: float | None = None, tflops: float | None = None,
                overhead_gb: float | None = None) -> DeviceSpec:
    """A device by name: a built-in GPU (h100, a100, a100-40gb, l4), ``cpu`` (this machine: total RAM; memory
    bandwidth and the ``dtype`` matmul peak measured in about a second unless given), or ``custom`` (needs
    ``memory_gb``, ``bandwidth_gbs`` and ``tflops``). Given values override a built-in device's.
    ``memory_gb`` and ``overhead_gb`` are GiB, ``bandwidth_gbs`` GB/s, ``tflops`` TFLOP/s for ``dtype``."""
    key = name.lower()
    if key not in DEVICE_NAMES:
        raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICE_NAMES)}")
    for arg, value in (("--memory-gb", memory_gb), ("--bandwidth-gbs", bandwidth_gbs), ("--tflops", tflops)):
        _positive(arg, value)
    if overhead_gb is not None and not (overhead_gb >= 0 and math.isfinite(overhead_gb)):
        raise ValueError(f"--overhead-gb must be >= 0, got {overhead_gb}")
    d = canonical_dtype(dtype)
    if key == "custom":
        missing = [a for a, v in (("--memory-gb", memory_gb), ("--bandwidth-gbs", bandwidth_gbs),
                                  ("--tflops", tflops)) if v is None]
        if missing:
            raise ValueError(f"--device custom needs {', '.join(missing)} (device memory in GiB, memory bandwidth in "
                             f"GB/s, peak dense {d} TFLOP/s)")
        spec = DeviceSpec("custom", "custom device", 0, 0.0, {}, CUSTOM_RUNTIME_OVERHEAD_BYTES)
    elif key == "cpu":
        spec = _cpu_spec(d, measure_bandwidth=bandwidth_gbs is None, measure_flops=tflops is None)
    else:
        b = BUILTIN_DEVICES[key]
        spec = DeviceSpec(b.name, b.description, b.memory_bytes, b.bandwidth_bytes_s, dict(b.peak_flops),
                          b.runtime_overhead_bytes)
    if memory_gb is not None:
        spec.memory_bytes = int(memory_gb * GiB)
    if bandwidth_gbs is not None:
        spec.bandwidth_bytes_s = bandwidth_gbs * 1e9
    if tflops is not None:
        spec.peak_flops[d] = tflops * 1e12
    if overhead_gb is not None:
        spec.runtime_overhead_bytes = int(overhead_gb * GiB)
    return spec


def _cpu_spec(dtype: str, measure_bandwidth: bool, measure_flops: bool) -> DeviceSpec:
    from .bench.machine import bandwidth_bytes_s, cpu_model
    from .bench.machine import measure_bandwidth as _measure_bandwidth
    from .bench.machine import measure_matmul as _measure_matmul

    bw = 0.0
    flops: dict[str, float] = {}
    if measure_bandwidth:
        logger.info("measuring this machine's memory bandwidth (pass --bandwidth-gbs to skip)")
        bw = bandwidth_bytes_s(_measure_bandwidth(mbytes=128, reps=4))
    if measure_flops:
        name = _TORCH_DTYPE_NAMES[dtype]
        logger.info("measuring this machine's %s matmul peak (pass --tflops to skip)", name)
        flops[dtype] = _measure_matmul(n=1024, reps=3, dtypes=[name])[f"{name}_gflop_s"] * 1e9
    return DeviceSpec("cpu", f"this machine: {cpu_model()}, {os.cpu_count()} cores", total_ram_bytes(), bw, flops,
                      CPU_RUNTIME_OVERHEAD_BYTES, measured=measure_bandwidth or measure_flops)


# ============================================================================================ the plan


@dataclass
class PlanInputs:
    model: str
    dtype: str
    quantization: str
    group_size: int
    kv_cache_dtype: str
    context: int
    concurrency: int
    memory_fraction: float
    block_size: int
    max_num_batched_tokens: int


@dataclass
class ModelSummary:
    architecture: str
    params: int
    param_counts: dict[str, int]
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: int | None  # the smallest window of any layer, None when every layer attends fully


@dataclass
class MemoryEstimate:
    """Bytes (see the module docstring for every formula)."""

    weights_by_part: dict[str, int]
    weight_bytes: int
    cpu_packed_weight_bytes: int  # second copy of bf16 linear weights for the CPU kernels (device cpu only)
    kv_bytes_per_token: int
    kv_tokens_per_sequence: int  # tokens one sequence holds in its largest layer (window-capped, whole blocks)
    kv_bytes_per_sequence: int
    kv_bytes: int  # concurrency x kv_bytes_per_sequence
    activations_by_part: dict[str, int]
    activation_bytes: int
    runtime_overhead_bytes: int
    total_bytes: int
    budget_bytes: int  # device memory x memory_fraction
    fits: bool
    free_bytes: int  # budget - total (negative when it does not fit)
    max_concurrency: int  # at the given context
    max_context: int  # at the given concurrency (capped at the model's max_position_embeddings)
    max_context_limited_by: str  # "memory" or "model" (max_position_embeddings)


@dataclass
class SpeedEstimate:
    """Decode-speed upper bounds at the given context (every sequence's KV read at full context)."""

    bandwidth_bytes_s: float
    peak_flops: float
    weight_bytes_read_per_step: int
    kv_bytes_read_per_sequence: int
    flops_per_token: int
    single_stream_tok_s: float
    batch_bandwidth_step_s: float
    batch_compute_step_s: float
    batch_step_s: float
    batch_bound: str  # "bandwidth" or "compute"
    per_sequence_tok_s: float  # at the given concurrency
    aggregate_tok_s: float  # concurrency x per_sequence_tok_s


@dataclass
class Plan:
    inputs: PlanInputs
    model: ModelSummary
    device: DeviceSpec
    memory: MemoryEstimate
    speed: SpeedEstimate
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _largest(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ok(n), for a predicate true up to some point and false after; lo - 1 if none."""
    if hi < lo or not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(cfg: ModelConfig, device: DeviceSpec, *, context: int, concurrency: int, dtype: str = "bf16",
         quantization: str = "none", group_size: int = 32, kv_cache_dtype: str = "auto",
         memory_fraction: float = 0.9, block_size: int = 16, max_num_batched_tokens: int = 512,
         model_name: str = "") -> Plan:
    """Memory and decode-speed estimates of ``cfg`` on ``device`` for ``concurrency`` sequences of ``context``
    tokens. Raises ValueError for out-of-range inputs."""
    dtype = canonical_dtype(dtype)
    quantization = _check_quantization(quantization, group_size)
    kv_cache_dtype = _check_kv_dtype(kv_cache_dtype)
    for name, value in (("context", context), ("concurrency", concurrency), ("block_size", block_size),
                        ("max_num_batched_tokens", max_num_batched_tokens), ("group_size", group_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    if not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    warnings: list[str] = []

    parts = weight_bytes_by_part(cfg, dtype, quantization, group_size)
    w_bytes = sum(parts.values())
    packed = 0
    if device.name == "cpu" and quantization == "none" and dtype == "bf16":
        from .model.layers.linear import amx_linear_available, onednn_bf16_available

        if onednn_bf16_available():
            packed = cpu_packed_weight_bytes(cfg, dtype, amx=amx_linear_available())
    per_token = kv_bytes_per_token(cfg, dtype, kv_cache_dtype)
    budget = int(device.memory_bytes * memory_fraction)

    def activations(c: int, ctx: int) -> dict[str, int]:
        rows = min(max_num_batched_tokens, max(c, 1))
        return activation_bytes_by_part(cfg, dtype, max_num_batched_tokens, rows, ctx)

    def seq_kv(ctx: int) -> int:
        return kv_bytes_per_sequence(cfg, ctx, dtype, kv_cache_dtype, block_size)

    fixed = w_bytes + packed + device.runtime_overhead_bytes

    def total(c: int, ctx: int) -> int:
        return fixed + sum(activations(c, ctx).values()) + c * seq_kv(ctx)

    acts = activations(concurrency, context)
    kv_seq = seq_kv(context)
    held = context if None in cfg.sliding_windows else min(context, max(w for w in cfg.sliding_windows if w))
    kv_tokens = math.ceil(held / block_size) * block_size
    tot = total(concurrency, context)

    # largest concurrency at this context; largest context (up to the model's) at this concurrency
    hi_c = (budget // kv_seq + 1) if kv_seq else 1 << 20
    max_c = max(0, _largest(lambda c: total(c, context) <= budget, 1, hi_c))
    max_pos = cfg.max_position_embeddings
    max_l = max(0, _largest(lambda ctx: total(concurrency, ctx) <= budget, 1, max_pos))
    limited_by = "model" if max_l == max_pos else "memory"

    memory = MemoryEstimate(
        weights_by_part=parts, weight_bytes=w_bytes, cpu_packed_weight_bytes=packed, kv_bytes_per_token=per_token,
        kv_tokens_per_sequence=kv_tokens,
        kv_bytes_per_sequence=kv_seq, kv_bytes=concurrency * kv_seq, activations_by_part=acts,
        activation_bytes=sum(acts.values()), runtime_overhead_bytes=device.runtime_overhead_bytes,
        total_bytes=tot, budget_bytes=budget, fits=tot <= budget, free_bytes=budget - tot,
        max_concurrency=max_c, max_context=max_l, max_context_limited_by=limited_by,
    )

    # decode speed: weights read once per step (a separate embedding table is only looked up), KV per sequence
    bw = device.bandwidth_bytes_s
    peak = device.flops_for(dtype)
    w_read = w_bytes - (0 if cfg.tie_word_embeddings else parts["embed_tokens"])
    kv_read = kv_bytes_per_sequence(cfg, context, dtype, kv_cache_dtype, 1)
    counts = cfg.param_counts()
    matmul_params = cfg.num_params - counts["norms"] - (0 if cfg.tie_word_embeddings else counts["embed_tokens"])
    flops_tok = 2 * matmul_params + attention_flops_per_token(cfg, context)
    t_bw = (w_read + concurrency * kv_read) / bw
    t_c = concurrency * flops_tok / peak
    step = max(t_bw, t_c)
    speed = SpeedEstimate(
        bandwidth_bytes_s=bw, peak_flops=peak, weight_bytes_read_per_step=w_read, kv_bytes_read_per_sequence=kv_read,
        flops_per_token=flops_tok, single_stream_tok_s=bw / (w_read + kv_read), batch_bandwidth_step_s=t_bw,
        batch_compute_step_s=t_c, batch_step_s=step, batch_bound="bandwidth" if t_bw >= t_c else "compute",
        per_sequence_tok_s=1.0 / step, aggregate_tok_s=concurrency / step,
    )

    windows = [w for w in cfg.sliding_windows if w is not None]
    if context > max_pos:
        warnings.append(f"context {context} exceeds the model's max_position_embeddings ({max_pos})")
    if windows and context > min(windows):
        uncapped = concurrency * sum(math.ceil(context / block_size) * block_size
                                     * kv_bytes_per_token_per_layer(cfg, dtype, kv_cache_dtype)
                                     for _ in cfg.sliding_windows)
        warnings.append(f"KV per sequence capped at the sliding window ({min(windows)} tokens): "
                        f"{memory.kv_bytes / GiB:.2f} GiB instead of {uncapped / GiB:.2f} GiB for full-context "
                        f"caches (needs an engine that releases blocks that left the window)")
    if quantization == "int4":
        ks = {cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size}
        bad = sorted(k for k in ks if k % group_size)
        if bad:
            warnings.append(f"group size {group_size} does not divide in_features {bad}; groups rounded up")
    if device.name == "cpu" and dtype == "fp16":
        warnings.append("fp16 matmuls are slow on most CPUs; bf16 (AVX512-BF16/AMX) or fp32 are the CPU dtypes")
    for w in warnings:
        logger.info("plan: %s", w)

    sliding = min(windows) if windows else None
    summary = ModelSummary(
        architecture=cfg.architecture, params=cfg.num_params, param_counts=counts, num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=max_pos, sliding_window=sliding,
    )
    inputs = PlanInputs(model=model_name, dtype=dtype, quantization=quantization, group_size=group_size,
                        kv_cache_dtype=kv_cache_dtype, context=context, concurrency=concurrency,
                        memory_fraction=memory_fraction, block_size=block_size,
                        max_num_batched_tokens=max_num_batched_tokens)
    return Plan(inputs, summary, device, memory, speed, warnings)


# ============================================================================================ report


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def format_plan(p: Plan) -> str:
    """The human-readable table ``tokenmill plan`` prints."""
    i, m, s, d, mo = p.inputs, p.memory, p.speed, p.device, p.model
    kv_name = i.dtype if i.kv_cache_dtype == "auto" else i.kv_cache_dtype
    weights = i.dtype if i.quantization == "none" else (
        f"{i.quantization}" + (f" (group {i.group_size})" if i.quantization == "int4" else " (per channel)"))
    flops = s.peak_flops / 1e12
    head = [
        f"model   {i.model or '?'}: {mo.architecture}, {mo.params / 1e9:.3g} B params, {mo.num_layers} layers, "
        f"{mo.num_heads} heads / {mo.num_kv_heads} KV heads x {mo.head_dim}"
        + (f", sliding window {mo.sliding_window}" if mo.sliding_window else ""),
        f"device  {d.name}: {d.description}; {d.memory_bytes / GiB:.1f} GiB, {s.bandwidth_bytes_s / 1e9:,.0f} GB/s, "
        f"{flops:,.1f} TFLOP/s {i.dtype}" + (" (measured)" if d.measured else ""),
        f"setup   weights {weights}, KV cache {kv_name}, context {i.context:,} x concurrency {i.concurrency:,}, "
        f"memory fraction {i.memory_fraction:g}, {i.max_num_batched_tokens}-token steps",
        "",
    ]
    rows: list[tuple[str, str, str]] = [("memory", "GiB", "")]
    for k, label in (("embed_tokens", "embeddings"), ("attention", "attention"), ("mlp", "MLP"),
                     ("norms", "norms"), ("lm_head", "lm_head" + (" (tied)" if mo.tie_word_embeddings else ""))):
        rows.append((f"  weights: {label}", _gib(m.weights_by_part[k]), ""))
    rows.append(("  weights total", _gib(m.weight_bytes), f"({m.weight_bytes / 1e9:,.2f} GB)"))
    if m.cpu_packed_weight_bytes:
        rows.append(("  second copy of the linears (CPU bf16 kernels)", _gib(m.cpu_packed_weight_bytes), ""))
    rows.append((f"  KV cache ({i.concurrency:,} x {i.context:,} tokens)", _gib(m.kv_bytes),
                 f"({m.kv_bytes_per_token:,} B/token, {m.kv_bytes_per_sequence / 2**20:,.1f} MiB/sequence)"))
    rows.append((f"  activations ({i.max_num_batched_tokens}-token forward)", _gib(m.activation_bytes), ""))
    rows.append(("  runtime overhead", _gib(m.runtime_overhead_bytes), ""))
    rows.append(("  total", _gib(m.total_bytes), ""))
    rows.append((f"  budget ({i.memory_fraction:g} x {d.memory_bytes / GiB:.1f} GiB)", _gib(m.budget_bytes), ""))
    rows.append(("  fits", "yes" if m.fits else "NO",
                 f"({_gib(m.free_bytes)} GiB free)" if m.fits else f"(short by {_gib(-m.free_bytes)} GiB)"))
    rows.append((f"  largest concurrency at context {i.context:,}", f"{m.max_concurrency:,}", ""))
    rows.append((f"  largest context at concurrency {i.concurrency:,}", f"{m.max_context:,}",
                 "(the model's maximum)" if m.max_context_limited_by == "model" else ""))
    rows.append(("", "", ""))
    rows.append((f"decode speed limits (context {i.context:,})", "tok/s", ""))
    rows.append(("  single stream (bandwidth-bound)", f"{s.single_stream_tok_s:,.1f}", ""))
    rows.append((f"  batch {i.concurrency:,}: per sequence", f"{s.per_sequence_tok_s:,.1f}", ""))
    rows.append((f"  batch {i.concurrency:,}: aggregate", f"{s.aggregate_tok_s:,.1f}",
                 f"({s.batch_bound}-bound: step {s.batch_bandwidth_step_s * 1e3:,.2f} ms by bandwidth, "
                 f"{s.batch_compute_step_s * 1e3:,.2f} ms by compute)"))
    width = max(len(r[0]) for r in rows) + 2
    lines = head + [f"{a:<{width}}{b:>8}  {c}" for a, b, c in rows]
    lines += [f"note: {w}" for w in p.warnings]
    return "\n".join(line.rstrip() for line in lines)


# ============================================================================================ command line










def add_plan_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``tokenmill plan`` to the CLI's subparsers."""
    p = sub.add_parser("plan", help="capacity planner: memory and decode-speed limits of a model on a device",
                       description="Estimates weight, KV-cache and activation memory of a model at a context and "
                                   "concurrency, whether it fits a device, the largest concurrency / context that "
                                   "does, and decode tokens/s limits. No weights are loaded.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Hugging Face directory or .gguf file (default: the embedded "
                                                    "SmolLM2-135M-Instruct)")
    src.add_argument("--config", default=None, help="a Hugging Face config.json")
    src.add_argument("--preset", default=None, help=f"one of: {', '.join(PRESET_HF_CONFIGS)}")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPE_ALIASES), help="float dtype (default bf16)")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="weight-only quantisation")
    p.add_argument("--group-size", type=positive_int, default=32, help="int4 group size (default 32)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: the float dtype; int8: int8 values + an fp16 scale per token and head")
    p.add_argument("--context", type=positive_int, required=True, help="tokens per sequence (prompt + output)")
    p.add_argument("--concurrency", type=positive_int, required=True, help="sequences running at once")
    p.add_argument("--device", required=True, type=str.lower, choices=DEVICE_NAMES,
                   help="a built-in GPU, cpu (this machine, measured), or custom (--memory-gb, --bandwidth-gbs, "
                        "--tflops)")
    p.add_argument("--memory-gb", type=positive_float, default=None, help="device memory, GiB")
    p.add_argument("--bandwidth-gbs", type=positive_float, default=None, help="memory bandwidth, GB/s")
    p.add_argument("--tflops", type=positive_float, default=None, help="peak dense TFLOP/s in --dtype")
    p.add_argument("--overhead-gb", type=non_negative_float, default=None,
                   help="fixed runtime overhead, GiB (default: 1 on GPUs, 0.5 on cpu)")
    p.add_argument("--memory-fraction", type=fraction, default=0.9,
                   help="fraction of device memory the server may use (default 0.9)")
    p.add_argument("--block-size", type=positive_int, default=16, help="KV block size in tokens (default 16)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=512,
                   help="tokens per forward pass, for the activation estimate (default 512)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    if args.preset is not None:
        cfg, name = preset_config(args.preset), args.preset.lower()
    elif args.config is not None:
        cfg, name = config_from_json(args.config), args.config
    else:
        from .model.loader import load_model_config
        from .model.paths import resolve_model_path

        path = resolve_model_path(args.model)
        cfg, name = load_model_config(path), (args.model or os.path.basename(path))
    device = device_spec(args.device, dtype=args.dtype, memory_gb=args.memory_gb, bandwidth_gbs=args.bandwidth_gbs,
                         tflops=args.tflops, overhead_gb=args.overhead_gb)
    result = plan(cfg, device, context=args.context, concurrency=args.concurrency, dtype=args.dtype,
                  quantization=args.quantization, group_size=args.group_size, kv_cache_dtype=args.kv_cache_dtype,
                  memory_fraction=args.memory_fraction, block_size=args.block_size,
                  max_num_batched_tokens=args.max_num_batched_tokens, model_name=name)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0
