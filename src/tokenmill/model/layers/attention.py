"""Paged attention: one interface, backends chosen per device.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]. A flat batch holds
decode tokens first (one per sequence) and then prefill chunks (several tokens of one sequence each). New keys and
values are written to their cache slots first; attention then reads each sequence's context through its block table.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cpu_kernels import cpu_ops
from .rotary import RopeInputs, apply_rotary

# Query rows per SDPA call when a prefill needs an explicit mask (cached prefix or sliding window):
# keeps the mask and the kernel's working set at O(tile x context), never O(context^2).
PREFILL_QUERY_TILE = 256


@dataclass
class PrefillSpan:
    start: int  # offset of the chunk's first token in the flat batch
    num_tokens: int  # tokens computed this step
    context_len: int  # tokens in the cache for this sequence after this step (cached prefix + chunk)
    block_table: torch.Tensor  # [num_blocks_of_seq] int64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    num_decode: int  # the first num_decode tokens are single-token decodes, one per sequence
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int64 (padded with 0)
    decode_context_lens: torch.Tensor | None  # [num_decode] int64, including the new token
    prefills: list[PrefillSpan]
    block_size: int
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """Boolean [num_decode, 1, 1, max_len] mask (True = attend), built once per step per window size."""
        mask = self._decode_masks.get(window)
        if mask is None:
            assert self.decode_block_tables is not None and self.decode_context_lens is not None
            max_len = self.decode_block_tables.shape[1] * self.block_size
            idx = torch.arange(max_len, device=self.decode_context_lens.device)[None, :]
            lens = self.decode_context_lens[:, None]
            mask = idx < lens
            if window is not None:
                mask &= idx > (lens - 1 - window)
            mask = mask[:, None, None, :]
            self._decode_masks[window] = mask
        return mask


class PagedAttention:
    """Paged attention. Prefill: torch SDPA (tiled flash kernel on CPU, flash/mem-efficient on CUDA). Decode: on CPU
    the compiled paged kernel (cpu_kernels.py) that reads blocks in place; elsewhere, or when it cannot be built,
    SDPA over the gathered blocks."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.window = sliding_window
        self.scale = head_dim**-0.5

    def rotate_and_store(
        self, qkv: torch.Tensor, rope: RopeInputs, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splits a fused QKV output [T, (Hq + 2 Hkv) D] into q, k, v, applies RoPE to q and k and writes k, v to
        their cache slots. On CPU one fused kernel does it all in place."""
        t, hq, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        ops = cpu_ops() if qkv.device.type == "cpu" and kv_cache.dtype == qkv.dtype else None
        if ops is not None:
            qkv = qkv.contiguous()
            ops.rotary_store(qkv, rope.positions, rope.cos_table, rope.sin_table, kv_cache[0], kv_cache[1],
                             meta.slot_mapping, hq, hkv, d)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
        if ops is None:
            q, k = apply_rotary(q, k, rope)
            _, num_blocks, block_size, _, _ = kv_cache.shape
            kv_cache[0].view(num_blocks * block_size, hkv, d).index_copy_(0, meta.slot_mapping, k.to(kv_cache.dtype))
            kv_cache[1].view(num_blocks * block_size, hkv, d).index_copy_(0, meta.slot_mapping, v.to(kv_cache.dtype))
        return q, k, v

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D], already in the cache (rotate_and_store). Returns [T, Hq * D]."""
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta)
        for span in meta.prefills:
            s, n = span.start, span.num_tokens
            out[s : s + n] = self._prefill(q[s : s + n], k[s : s + n], v[s : s + n], kv_cache, span)
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        bt = meta.decode_block_tables
        assert bt is not None
        ops = cpu_ops() if kv_cache.device.type == "cpu" and q.dtype == kv_cache.dtype else None
        if ops is not None:
            return ops.paged_decode(
                    q.contiguous(), kv_cache[0], kv_cache[1], bt, meta.decode_context_lens,
                    -1 if self.window is None else self.window, self.scale,
                )
        # Portable path: gather each sequence's blocks (padded to the longest) and run SDPA.
        b, max_blocks = bt.shape
        _, _, block_size, hkv, d = kv_cache.shape
        flat_bt = bt.reshape(-1)
        keys = kv_cache[0].index_select(0, flat_bt).view(b, max_blocks * block_size, hkv, d).transpose(1, 2)
        values = kv_cache[1].index_select(0, flat_bt).view(b, max_blocks * block_size, hkv, d).transpose(1, 2)
        # The query heads of one KV head are the "query rows" of that head: no KV repetition for GQA/MQA.
        qg = q.view(b, hkv, self.group, d).to(keys.dtype)
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=meta.decode_mask(self.window))
        return o.reshape(b, self.num_heads, d).to(q.dtype)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, span: PrefillSpan
    ) -> torch.Tensor:
        n, ctx = span.num_tokens, span.context_len
        window = self.window
        if ctx == n and (window is None or window >= ctx):
            # Whole prompt in one chunk, plain causal: the new keys are the whole context.
            keys, values = k, v
            return self._sdpa(q, keys, values, None)
        _, _, block_size, hkv, d = kv_cache.shape
        nb = (ctx + block_size - 1) // block_size
        table = span.block_table[:nb]
        keys = kv_cache[0].index_select(0, table).view(nb * block_size, hkv, d)[:ctx]
        values = kv_cache[1].index_select(0, table).view(nb * block_size, hkv, d)[:ctx]
        first_pos = ctx - n
        out = torch.empty_like(q)
        key_idx = torch.arange(ctx, device=q.device)[None, :]
        for t0 in range(0, n, PREFILL_QUERY_TILE):
            t1 = min(n, t0 + PREFILL_QUERY_TILE)
            q_pos = torch.arange(first_pos + t0, first_pos + t1, device=q.device)[:, None]
            mask = key_idx <= q_pos
            if window is not None:
                mask &= key_idx > q_pos - window
            # Keys beyond the tile's last position are never attended: trim them.
            kv_end = first_pos + t1
            out[t0:t1] = self._sdpa(q[t0:t1], keys[:kv_end], values[:kv_end], mask[:, :kv_end])
        return out

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q: [n, Hq, D], k/v: [L, Hkv, D] -> [n, Hq, D]; causal when mask is None."""
        if self.group > 1:
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.to(q.dtype).transpose(0, 1).unsqueeze(0),
            v.to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
        )
        return o.squeeze(0).transpose(0, 1)
