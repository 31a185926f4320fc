"""KV-cache storage formats.

A layer's paged cache is either a plain tensor [2, num_blocks, block_size, num_kv_heads, head_dim] in the model
dtype, or an int8 cache (`QuantizedKVCache`): int8 values of the same shape plus one float16 scale per token per KV
head [2, num_blocks, block_size, num_kv_heads], for keys and values separately. Quantisation is symmetric,
scale = absmax / 127 over the head_dim values of one head of one token, so a token costs
2 * num_kv_heads * (head_dim + 2) bytes per layer instead of 2 * num_kv_heads * head_dim * 2 in bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedKVCache:
    """One layer's int8 paged cache: data [2, blocks, block_size, Hkv, D] int8, scales [2, blocks, block_size, Hkv]
    float16 (index 0: keys, 1: values)."""

    data: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def copy_blocks_(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.data[:, dst] = self.data[:, src]
        self.scales[:, dst] = self.scales[:, src]


KVCache = torch.Tensor | QuantizedKVCache


def new_kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
    zeroed: bool,
) -> KVCache:
    """One layer's cache; dtype torch.int8 selects the quantised format. Unzeroed memory is only committed by the OS
    as blocks are written."""
    alloc = torch.zeros if zeroed else torch.empty
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if dtype == torch.int8:
        return QuantizedKVCache(alloc(shape, dtype=torch.int8, device=device),
                                alloc(shape[:-1], dtype=torch.float16, device=device))
    return alloc(shape, dtype=dtype, device=device)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float16 scales [...]); the same rounding as the CPU kernel rotary_store_int8."""
    xf = x.float()
    scales = (xf.abs().amax(dim=-1) / 127.0).to(torch.float16)
    s = scales.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = (xf * inv.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_kv(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., D] and float16 scales [...] -> values [..., D] in `dtype`."""
    return (q.float() * scales.float().unsqueeze(-1)).to(dtype)


def store_kv(cache: KVCache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Writes k, v [T, Hkv, D] to cache slots [T] (quantising for an int8 cache)."""
    if isinstance(cache, QuantizedKVCache):
        _, nb, bs, hkv, d = cache.data.shape
        kq, ks = quantize_kv(k)
        vq, vs = quantize_kv(v)
        data, scales = cache.data.view(2, nb * bs, hkv, d), cache.scales.view(2, nb * bs, hkv)
        data[0].index_copy_(0, slots, kq)
        data[1].index_copy_(0, slots, vq)
        scales[0].index_copy_(0, slots, ks)
        scales[1].index_copy_(0, slots, vs)
        return
    _, nb, bs, hkv, d = cache.shape
    cache[0].view(nb * bs, hkv, d).index_copy_(0, slots, k.to(cache.dtype))
    cache[1].view(nb * bs, hkv, d).index_copy_(0, slots, v.to(cache.dtype))


def gather_blocks(cache: KVCache, blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the given blocks [n] -> two [n, block_size, Hkv, D] tensors (dequantised to `dtype`)."""
    if isinstance(cache, QuantizedKVCache):
        data = cache.data.index_select(1, blocks)
        kv = dequantize_kv(data, cache.scales.index_select(1, blocks), dtype)
        return kv[0], kv[1]
    return cache[0].index_select(0, blocks), cache[1].index_select(0, blocks)


def gather_slots(cache: KVCache, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the given token slots (any shape S) -> two [*S, Hkv, D] tensors (dequantised to `dtype`
    for an int8 cache; the cache's dtype otherwise)."""
    flat = slots.reshape(-1)
    if isinstance(cache, QuantizedKVCache):
        _, nb, bs, hkv, d = cache.data.shape
        data = cache.data.view(2, nb * bs, hkv, d).index_select(1, flat)
        scales = cache.scales.view(2, nb * bs, hkv).index_select(1, flat)
        kv = dequantize_kv(data, scales, dtype)
    else:
        _, nb, bs, hkv, d = cache.shape
        kv = cache.view(2, nb * bs, hkv, d).index_select(1, flat)
    return kv[0].view(*slots.shape, hkv, d), kv[1].view(*slots.shape, hkv, d)
