"""Activation-aware weight quantisation (AWQ-style) for the int4 layers.

Channels that see large activations matter more, so before rounding each int4 layer's weight columns are scaled
up by s = mean|x|^alpha (and the layer's input divided by s, folded into the operation before it: the RMSNorm
weight for qkv_proj and gate_up_proj, the up rows of gate_up_proj for down_proj, the v rows of qkv_proj for
o_proj, with s shared by the query heads of one KV head). alpha is searched per layer on a grid to minimise the
layer's output error ||X W^T - (X/s) Q(W s)^T||^2 on calibration activations; alpha = 0 is plain
round-to-nearest, so the search never does worse than it on the calibration rows. Each int4 group's range is
then clipped (weights.quantize_int4) to minimise the error weighted by the layer's mean squared input; a head tied
to the embeddings gets the clipping only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .policy import QuantPolicy
from .weights import quantize_int4

logger = logging.getLogger(__name__)


@dataclass
class _Stats:
    abs_sum: torch.Tensor
    count: int
    rows: list[torch.Tensor]
    num_rows: int = 0


class ActivationRecorder:
    """Forward pre-hooks collecting, per linear layer, mean |x| per input channel and a sample of input rows."""

    def __init__(self, modules: dict[str, nn.Module], max_rows: int = 1024, seed: int = 0) -> None:
        self.stats: dict[str, _Stats] = {}
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = _Stats(torch.zeros(x.shape[1]), 0, [])
            st.abs_sum += x.abs().sum(0)
            st.count += x.shape[0]
            room = self.max_rows - st.num_rows
            if room > 0:
                take = min(room, max(1, x.shape[0] // 4))
                idx = torch.randperm(x.shape[0], generator=self.gen)[:take]
                st.rows.append(x[idx].clone())
                st.num_rows += take

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def search_scale(w: torch.Tensor, x: torch.Tensor, x_mean: torch.Tensor, group_size: int,
                 grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale for weight w [N, K] given activations x [R, K] and mean |x| [K].
    Returns (scale, error with it, error of plain round-to-nearest)."""
    w = w.float()
    y_ref = x @ w.t()

    def error(s: torch.Tensor) -> float:
        wq = quantize_int4(w * s, group_size).dequantize()
        return float(((x / s) @ wq.t() - y_ref).pow(2).mean())

    ones = torch.ones_like(x_mean)
    rtn = error(ones)
    best, best_s = rtn, ones
    for i in range(1, grid + 1):
        alpha = i / grid
        s = x_mean.clamp(min=1e-5).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = error(s)
        if err < best:
            best, best_s = err, s
    return best_s, best, rtn


def _gqa_shared(x_mean: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """o_proj input channels are (query head, dim); heads of one KV group must share a scale to fold into v."""
    group = num_heads // num_kv_heads
    m = x_mean.view(num_kv_heads, group, head_dim).mean(dim=1, keepdim=True)
    return m.expand(num_kv_heads, group, head_dim).reshape(-1)


@dataclass
class AWQResult:
    report: dict[str, dict[str, float]]  # per layer: output error with the searched scale, and with plain RTN
    importance: dict[str, torch.Tensor]  # per layer: mean squared input per channel after scaling (for clipping)


@torch.no_grad()
def apply_awq(model: nn.Module, run_forward, samples: list[torch.Tensor], policy: QuantPolicy,
              grid: int = 20) -> AWQResult:
    """Calibrates on `samples` (token-id tensors, each run through `run_forward`) and rescales the float model in
    place for every int4 layer of `policy`."""
    cfg = model.config
    targets: dict[str, nn.Module] = {}
    for i, layer in enumerate(model.layers):
        for sub in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            name = f"layers.{i}.{sub}"
            if policy.format_for(name, cfg.num_layers) == "int4":
                targets[name] = model.get_submodule(name)
    if policy.format_for("lm_head", cfg.num_layers) == "int4":
        targets["lm_head"] = model.lm_head  # tied to the embeddings: clipping only (no scale to fold)
    if not targets:
        return AWQResult({}, {})
    recorder = ActivationRecorder(targets)
    try:
        for ids in tqdm(samples, desc="calibration forward", unit="sample"):
            run_forward(ids)
    finally:
        recorder.remove()

    q, kv, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    report: dict[str, dict[str, float]] = {}
    importance: dict[str, torch.Tensor] = {}
    for name, module in tqdm(targets.items(), desc="AWQ scale search", unit="layer"):
        st = recorder.stats[name]
        x_mean = st.abs_sum / st.count
        if name.endswith("o_proj"):
            x_mean = _gqa_shared(x_mean, cfg.num_heads, cfg.num_kv_heads, d)
        x = torch.cat(st.rows)
        if name == "lm_head" and cfg.tie_word_embeddings:
            # the head's columns are the embedding table's: scaling them would change every lookup
            importance["embed_tokens"] = x.pow(2).mean(dim=0)
            continue
        s, err, rtn = search_scale(module.weight.data, x, x_mean, policy.group_size, grid)
        report[name] = {"awq_error": err, "rtn_error": rtn}
        importance[name] = (x / s).pow(2).mean(dim=0)
        if torch.equal(s, torch.ones_like(s)):
            continue
        module.weight.data.mul_(s.to(module.weight.dtype)[None, :])
        inv = (1.0 / s)
        if name == "lm_head":
            model.norm.weight.data.mul_(inv.to(model.norm.weight.dtype))
            continue
        layer = model.layers[int(name.split(".")[1])]
        if name.endswith("qkv_proj"):
            layer.input_layernorm.weight.data.mul_(inv.to(layer.input_layernorm.weight.dtype))
        elif name.endswith("gate_up_proj"):
            layer.post_attention_layernorm.weight.data.mul_(inv.to(layer.post_attention_layernorm.weight.dtype))
        elif name.endswith("down_proj"):
            up = layer.mlp.gate_up_proj.weight.data[cfg.intermediate_size :]
            up.mul_(inv.to(up.dtype)[:, None])
        elif name.endswith("o_proj"):
            # channel (kv head, group member, dim) takes v row (kv head, dim): one scale per v row
            v_inv = inv.view(cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, d)[:, 0, :].reshape(-1)
            qkv = layer.self_attn.qkv_proj
            qkv.weight.data[q + kv :].mul_(v_inv.to(qkv.weight.dtype)[:, None])
            if qkv.bias is not None:
                qkv.bias.data[q + kv :].mul_(v_inv.to(qkv.bias.dtype))
    gain = [r["rtn_error"] / max(r["awq_error"], 1e-30) for r in report.values()]
    if gain:
        logger.info("AWQ: %d layers, output-error reduction vs round-to-nearest median %.2fx",
                    len(gain), sorted(gain)[len(gain) // 2])
    return AWQResult(report, importance)
