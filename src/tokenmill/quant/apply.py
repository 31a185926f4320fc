"""Turning a loaded float model into a quantised one, and back from a saved layout.

`quantize_model` replaces the model's linear layers (and embeddings) by QuantLinear / QuantEmbedding following a
QuantPolicy and returns the layout ({module name: format}); `install_layout` rebuilds that layout, empty, so a
quantised checkpoint's tensors load straight into it; `install_quantized` puts already-quantised weights (GGUF's
own blocks) in place; `weight_bytes_by_part` is what the engine reports.
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..model.layers.linear import Linear
from ..model.layers.quant_linear import QuantEmbedding, QuantLinear
from .policy import QuantPolicy
from .weights import QuantizedWeight, quantize

logger = logging.getLogger(__name__)

_LINEAR_RE = re.compile(r"^layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))$")


def quantizable_modules(model: nn.Module) -> list[str]:
    """Names of the modules a policy applies to, in forward order."""
    names = ["embed_tokens"]
    names += [n for n, _ in model.named_modules() if _LINEAR_RE.match(n)]
    if not getattr(model.config, "tie_word_embeddings", False):
        names.append("lm_head")
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    if w.numel() == 0:
        raise RuntimeError("quantise the model before prepare_for_inference() releases its dense weights")
    return w


def quantize_model(model: nn.Module, policy: QuantPolicy,
                   importance: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Round-to-nearest quantisation of every layer the policy selects (AWQ, if wanted, has already rescaled the
    float weights and measured `importance`, the mean squared input per channel of its layers, which int4 uses
    to clip group ranges: quant/awq.py). Returns the layout for checkpoints: {name: {"format", "group_size"}}."""
    importance = importance or {}
    cfg = model.config
    dtype = model.embed_tokens.weight.dtype
    layout: dict[str, dict] = {}
    tied = cfg.tie_word_embeddings
    for name in quantizable_modules(model):
        # tied: one table serves as embeddings and head; the head's rule decides its format
        fmt = policy.format_for("lm_head" if (tied and name == "embed_tokens") else name, cfg.num_layers)
        if fmt == "bf16":
            continue
        module = model.get_submodule(name)
        qw = quantize(_dense_weight(module), fmt, policy.group_size, name, importance.get(name))
        bias = getattr(module, "bias", None)
        head = QuantLinear.from_quantized(qw, None if bias is None else bias.detach(), dtype)
        if name == "embed_tokens":
            model.embed_tokens = QuantEmbedding(head)
            if tied:
                model.lm_head = head
        else:
            _set_module(model, name, head)
        layout[name] = {"format": fmt, "group_size": qw.group_size}
    logger.info("quantised %d layers with policy %s", len(layout), policy.name)
    return layout


def install_layout(model: nn.Module, layout: dict[str, dict]) -> None:
    """Empty quantised layers where `layout` says, ready for load_state_dict."""
    cfg = model.config
    dtype = model.embed_tokens.weight.dtype
    for name, spec in layout.items():
        if name == "embed_tokens":
            n, k = cfg.vocab_size, cfg.hidden_size
            bias = False
        else:
            module = model.get_submodule(name)
            n, k, bias = module.out_features, module.in_features, module.bias is not None
        layer = QuantLinear(k, n, spec["format"], spec.get("group_size", 0), bias, dtype)
        if name == "embed_tokens":
            model.embed_tokens = QuantEmbedding(layer)
            if cfg.tie_word_embeddings:
                model.lm_head = layer
        else:
            _set_module(model, name, layer)


def install_quantized(model: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
    """Puts already-quantised weights in place ({module name: weight}, e.g. from GGUF blocks)."""
    dtype = model.embed_tokens.weight.dtype
    for name, qw in weights.items():
        if name == "embed_tokens":
            head = QuantLinear.from_quantized(qw, None, dtype)
            model.embed_tokens = QuantEmbedding(head)
            if model.config.tie_word_embeddings:
                model.lm_head = head
            continue
        module = model.get_submodule(name)
        bias = getattr(module, "bias", None)
        _set_module(model, name, QuantLinear.from_quantized(qw, None if bias is None else bias.detach(), dtype))


def model_layout(model: nn.Module) -> dict[str, dict]:
    layout = {}
    for name in quantizable_modules(model):
        module = model.get_submodule(name)
        layer = module.head if isinstance(module, QuantEmbedding) else module
        if isinstance(layer, QuantLinear):
            layout[name] = {"format": layer.method, "group_size": layer.group_size}
    return layout


def _portable_bytes(module: nn.Module) -> int:
    if isinstance(module, QuantEmbedding):
        return module.head.quantized_weight().nbytes
    if isinstance(module, QuantLinear):
        b = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
        return module.quantized_weight().nbytes + b
    if isinstance(module, Linear):
        elem = module.weight.element_size()
        b = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
        return module.in_features * module.out_features * elem + b
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def weight_bytes_by_part(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights in their stored format (not counting kernel re-layouts), by part: embed_tokens,
    attention, mlp, norms, lm_head (0 when tied), and total."""
    parts = {"embed_tokens": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
    tied = model.config.tie_word_embeddings
    for name, module in model.named_modules():
        if name == "lm_head":
            parts["lm_head"] += 0 if tied else _portable_bytes(module)
        elif name == "embed_tokens":
            parts["embed_tokens"] += _portable_bytes(module)
        elif isinstance(module, (Linear, QuantLinear)) and name != "embed_tokens.head":
            parts["attention" if ".self_attn." in name else "mlp"] += _portable_bytes(module)
        elif "norm" in name.rsplit(".", 1)[-1]:
            parts["norms"] += _portable_bytes(module)
    parts["total"] = sum(parts.values())
    return parts


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes the weights occupy in memory now, including kernel re-layouts (oneDNN-packed bf16, int4 packs)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in model.modules():
        extra = [getattr(m, "packed", None)]
        if isinstance(m, QuantLinear):
            extra += [m._packed, m._scales_zeros]
        for t in extra:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def cast_float_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts every float weight that is not quantised (norms, bf16 layers, biases) and the quantised layers'
    activation dtype; quantised codes and their scales stay as they are."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.dtype = dtype
            if m.bias is not None:
                m.bias = m.bias.to(dtype)
        elif not isinstance(m, QuantEmbedding):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)
