"""Llama-family decoder (Llama, Mistral, Qwen2): fused QKV and gate/up projections over a flat token batch."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from ..config import ModelConfig
from .cpu_decode import FusedDecode, fused_decode_for
from .layers.activation import silu_and_mul
from .layers.attention import AttentionMetadata, PagedAttention
from .layers.hugepages import move_weights_to_huge_pages
from .layers.linear import Linear, pack_linear_weights
from .layers.norm import RMSNorm
from ..quant.apply import install_quantized
from ..quant.weights import QuantizedWeight
from .layers.quant_linear import QuantLinear
from .layers.rotary import RopeInputs, RotaryEmbedding

logger = logging.getLogger(__name__)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_windows[layer_idx])

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeInputs,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.attn.rotate_and_store(self.qkv_proj(x), rope, kv_cache, meta)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, rope: RopeInputs, kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream kept separately (vLLM-style) so each add fuses into the following norm.
        Returns (this layer's MLP output, the residual stream before it is added)."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm.add_forward(h, residual)
        h = self.self_attn(x, rope, kv_cache, meta)
        x, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Covers LlamaForCausalLM, MistralForCausalLM (sliding window) and Qwen2ForCausalLM (QKV bias)."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.fused_decode: FusedDecode | None = None  # set by prepare_for_inference where the CPU allows

    def prepare_for_inference(self) -> None:
        """Called once after loading: device-specific weight layouts (oneDNN-packed bf16 linears on CPU, int4
        kernel packs, weights on huge pages) and the fused CPU decode path (cpu_decode.py)."""
        shared = {id(self.embed_tokens.weight)} if isinstance(self.embed_tokens, nn.Embedding) else set()
        pack_linear_weights(self, shared=shared)
        for module in self.modules():
            if isinstance(module, QuantLinear):
                module.prepare()
        move_weights_to_huge_pages(self)
        self.fused_decode = fused_decode_for(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Runs the flat batch; returns float32 logits for the rows in `logits_indices` only."""
        h = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, h.dtype)
        fused = self.fused_decode
        if fused is not None and fused.accepts(h.shape[0], kv_caches, meta):
            h, residual = fused(h, rope, kv_caches, meta)
        else:
            residual = None
            for layer, cache in zip(self.layers, kv_caches):
                h, residual = layer(h, residual, rope, cache, meta)
        if residual is None:  # no layers
            h = self.norm(h.index_select(0, logits_indices))
        else:
            h, _ = self.norm.add_forward(h.index_select(0, logits_indices), residual.index_select(0, logits_indices))
        head = self.lm_head
        return head(h, float_out=True) if isinstance(head, Linear) else head(h).float()

    # ---- weight loading -------------------------------------------------------------------------------------
    _STACKED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies Hugging Face-named tensors into our (fused) parameters; every parameter must be covered."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        cfg = self.config
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        shard_ranges = {
            "qkv_proj": [(0, q), (q, q + kv), (q + kv, q + 2 * kv)],
            "gate_up_proj": [(0, inter), (inter, 2 * inter)],
        }
        quant_parts: dict[str, dict[int, QuantizedWeight]] = {}  # module -> shard index -> weight (GGUF blocks)
        for hf_name, tensor in weights:
            name = hf_name[len("model.") :] if hf_name.startswith("model.") else hf_name
            if "rotary_emb" in name:
                continue
            m = re.search(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.", name)
            if m:
                fused, idx = self._STACKED[m.group(1)]
                name = name.replace(m.group(1), fused)
                if name not in params:
                    raise KeyError(f"unexpected weight {hf_name!r} for {cfg.architecture}")
                lo, hi = shard_ranges[fused][idx]
                dst = params[name].data[lo:hi]
                loaded.add(f"{name}#{idx}")
            elif isinstance(tensor, QuantizedWeight) and name in params:
                if name == "lm_head.weight" and self.config.tie_word_embeddings:
                    continue
                dst = params[name].data
                loaded.add(name)
                idx = 0
            else:
                if name == "lm_head.weight" and self.config.tie_word_embeddings:
                    continue  # tied: some checkpoints store the copy anyway
                if name not in params:
                    raise KeyError(f"unexpected weight {hf_name!r} for {cfg.architecture}")
                dst = params[name].data
                loaded.add(name)
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            if isinstance(tensor, QuantizedWeight):
                quant_parts.setdefault(name.rsplit(".", 1)[0], {})[idx] = tensor
                continue
            dst.copy_(tensor)
        self._install_quant_parts(quant_parts, params, shard_ranges)
        missing = []
        for name in params:
            fused = next((f for f in shard_ranges if f".{f}." in name), None)
            if fused:
                missing += [f"{name}#{i}" for i in range(len(shard_ranges[fused])) if f"{name}#{i}" not in loaded]
            elif name not in loaded:
                missing.append(name)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")

    def _install_quant_parts(self, parts: dict[str, dict[int, QuantizedWeight]], params: dict, shard_ranges: dict) -> None:
        """Quantised weights (GGUF blocks) become quantised layers; a fused layer whose shards are not all
        quantised in one format takes the dequantised values instead."""
        whole: dict[str, QuantizedWeight] = {}
        for module, shards in parts.items():
            fused = module.rsplit(".", 1)[-1]
            n_shards = len(shard_ranges.get(fused, [None]))
            formats = {(q.method, q.group_size) for q in shards.values()}
            if len(shards) == n_shards and len(formats) == 1:
                whole[module] = QuantizedWeight.cat_rows([shards[i] for i in range(n_shards)])
                continue
            dst = params[f"{module}.weight"].data
            for idx, qw in shards.items():
                lo, hi = shard_ranges[fused][idx] if fused in shard_ranges else (0, dst.shape[0])
                dst[lo:hi].copy_(qw.dequantize(dst.dtype))
        if whole:
            install_quantized(self, {k.removeprefix("model."): v for k, v in whole.items()})
