"""Decode-only steps on CPU in one kernel call.

A decode step of a small model at small batch is short (SmolLM2-135M, one sequence: ~12 ms), and the Python layer
loop costs a fixed ~3 ms of it: per layer eight module calls and nine op dispatches, each a few microseconds.
cpu_kernels' `decode_layers` runs the same kernels in the same order from C++, so its results are bit-identical to
the layer loop's (tests/test_cpu_decode.py compares the two). It serves batches of decode rows only (a speculating
sequence's 1 + k verification rows are decode rows too), on a model whose every layer linear has a few-row CPU
kernel for that many rows (bf16 weights: amx_linear or small_m_linear; int8 weights: int8_linear) and whose KV
cache is in the model dtype or int8 (kv_cache.py); anything else (prefill chunks, int4 or fp32 weights, CUDA) runs
the layer loop. Forward hooks on the layers' modules do not run for these steps; nothing registers them on a
prepared model (AWQ calibration records activations before prepare_for_inference).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers.attention import AttentionMetadata, paged_attentions
from .layers.cpu_kernels import cpu_ops
from .layers.kv_cache import QuantizedKVCache
from .layers.linear import AMX_ROWS, Linear
from .layers.norm import RMSNorm
from .layers.quant_linear import QuantLinear
from .layers.rotary import RopeInputs


class FusedDecode:
    """The per-layer weights of a prepared Llama-family model, gathered once for `decode_layers`."""

    def __init__(self, model: nn.Module, ops: object) -> None:
        cfg = model.config
        self.op = ops.decode_layers
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = model.layers[0].input_layernorm.eps
        self.dtype = model.layers[0].input_layernorm.weight.dtype  # the model dtype (one for every norm)
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor | None] = []
        self.scales: list[torch.Tensor | None] = []  # int8 weights' per-channel scales
        rows = []
        for layer in model.layers:
            (in_norm, post_norm), linears = _layer_parts(layer)
            qkv, o, gate_up, down = (_kernel_weight(m) for m in linears)
            self.weights += [in_norm.weight, qkv, o, post_norm.weight, gate_up, down]
            self.biases += [m.bias for m in linears]
            self.scales += [m.scales if isinstance(m, QuantLinear) else None for m in linears]
            rows += [min(m.int8_max_rows, AMX_ROWS) if isinstance(m, QuantLinear) else m.small_m_rows
                     for m in linears]
        self.max_rows = min(rows)
        self.attns = paged_attentions(model)

    def accepts(self, num_rows: int, kv_caches: list, meta: AttentionMetadata) -> bool:
        cache = kv_caches[0]
        return (not meta.prefills and num_rows <= self.max_rows
                and (isinstance(cache, QuantizedKVCache) or cache.dtype == self.dtype))

    def __call__(self, h: torch.Tensor, rope: RopeInputs, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs every layer over decode rows `h`; returns (the last MLP output, the residual stream), as the layer
        loop does. The attention windows are read per call (configure_windows may change them)."""
        windows = [-1 if a.window is None else a.window for a in self.attns]
        sinks = [a.sinks for a in self.attns]
        if isinstance(kv_caches[0], QuantizedKVCache):
            kv_caches, kv_scales = [c.data for c in kv_caches], [c.scales for c in kv_caches]
        else:
            kv_scales = []
        out = self.op(h, rope.positions, rope.cos_table, rope.sin_table, meta.slot_mapping, meta.decode_block_tables,
                      meta.decode_context_lens, self.weights, self.biases, self.scales, kv_caches, kv_scales, windows,
                      sinks, self.num_heads, self.num_kv_heads, self.head_dim, self.eps, self.attns[0].scale)
        return out, h


def _layer_parts(layer: nn.Module) -> tuple[tuple[nn.Module, nn.Module], tuple[nn.Module, ...]]:
    """(input norm, post-attention norm), (qkv, o, gate_up, down projections) of a decoder layer."""
    attn, mlp = layer.self_attn, layer.mlp
    return ((layer.input_layernorm, layer.post_attention_layernorm),
            (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))


def _kernel_weight(m: Linear | QuantLinear) -> torch.Tensor:
    if isinstance(m, QuantLinear):
        return m.qweight
    return m.tiled_weight if m.tiled_weight is not None else m.weight


def _has_few_rows_kernel(m: nn.Module) -> bool:
    """A bf16 linear with amx_linear or small_m_linear, or an int8 one with int8_linear."""
    if type(m) is Linear:
        return m.small_m is not None
    return (type(m) is QuantLinear and m.method == "int8" and m.dtype == torch.bfloat16
            and m._int8_kernel is not None)


def fused_decode_for(model: nn.Module) -> FusedDecode | None:
    """A FusedDecode for `model` if this CPU and the model's layers allow one, else None. Call after the weights
    are in their final place (packed, on huge pages)."""
    ops = cpu_ops()
    if ops is None or not hasattr(ops, "decode_layers") or len(model.layers) == 0:
        return None
    parts = [_layer_parts(layer) for layer in model.layers]
    norms = [n for layer_norms, _ in parts for n in layer_norms]
    linears = [m for _, layer_linears in parts for m in layer_linears]
    # one eps and one dtype for every norm (the kernel takes one eps); a few-row kernel for every projection
    if not all(type(n) is RMSNorm for n in norms) or len({(n.eps, n.weight.dtype) for n in norms}) != 1:
        return None
    if not all(_has_few_rows_kernel(m) for m in linears):
        return None
    return FusedDecode(model, ops)
