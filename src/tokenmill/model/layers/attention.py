"""Paged attention: one interface, backends chosen per device.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim], or an int8 cache with
per-token scales (kv_cache.py). A flat batch holds decode tokens first (one per sequence) and then prefill chunks
(several tokens of one sequence each). New keys and values are written to their cache slots first; attention then
reads each sequence's context through its block table.

A layer may attend to a window: each token sees the last `window` tokens (itself included) plus the first `sinks`
tokens of its sequence (StreamingLLM's attention sinks; 0 for a model's native sliding window). Blocks entirely
outside every layer's view may have been freed: their block-table entries are then stale and are never read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import triton_kernels
from .cpu_kernels import cpu_ops
from .kv_cache import KVCache, QuantizedKVCache, gather_blocks, gather_slots, store_kv
from .linear import amx_linear_available
from .rotary import RopeInputs, apply_rotary

# Query rows per SDPA call when a prefill needs an explicit mask (cached prefix or sliding window):
# keeps the mask and the kernel's working set at O(tile x context), never O(context^2).
PREFILL_QUERY_TILE = 256

# SDPA backends on CUDA. cuDNN attention is left out: it builds a plan for every new sequence length (about 50 ms
# each on an H200), which prompts of ever-changing lengths keep paying; flash and memory-efficient kernels do not.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         enable_gqa: bool = False) -> torch.Tensor:
    """torch SDPA over [..., H, L, D] tensors; causal when mask is None. `enable_gqa`: k and v have fewer heads, each
    shared by a group of query heads. CPU SDPA shares them itself (an 87-token prompt: 123 -> 103 us against
    copies); on CUDA they are expanded, since its SDPA backends differ in GQA support."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=enable_gqa)
    if enable_gqa:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    with sdpa_kernel(CUDA_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


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
    _decode_mask: torch.Tensor | None = field(default=None, repr=False)
    _decode_gathers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def decode_mask(self) -> torch.Tensor:
        """Boolean [num_decode, 1, 1, max_len] mask (True = attend) over whole block tables, built once per step."""
        if self._decode_mask is None:
            assert self.decode_block_tables is not None and self.decode_context_lens is not None
            max_len = self.decode_block_tables.shape[1] * self.block_size
            idx = torch.arange(max_len, device=self.decode_context_lens.device)[None, :]
            self._decode_mask = (idx < self.decode_context_lens[:, None])[:, None, None, :]
        return self._decode_mask

    def decode_gather(self, window: int, sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache slots [num_decode, L] of the tokens each decode attends to (its first `sinks` tokens and the last
        `window`), padded to the longest, and the boolean mask [num_decode, 1, 1, L] of the real ones. Built once per
        step per (window, sinks)."""
        key = (window, sinks)
        if key not in self._decode_gathers:
            bt, lens, bs = self.decode_block_tables, self.decode_context_lens, self.block_size
            assert bt is not None and lens is not None
            lo = (lens - window).clamp(min=0)  # first token of the window
            ns = lo.clamp(max=sinks)  # sink tokens before it
            count = ns + lens - lo
            j = torch.arange(int(count.max()), device=lens.device)[None, :]
            pos = torch.where(j < ns[:, None], j, lo[:, None] + j - ns[:, None])
            pos = torch.minimum(pos, lens[:, None] - 1)  # padding reads the newest token (written, never freed)
            slots = bt.gather(1, pos // bs) * bs + pos % bs
            self._decode_gathers[key] = (slots, (j < count[:, None])[:, None, None, :])
        return self._decode_gathers[key]


class PagedAttention:
    """Paged attention. Prefill: torch SDPA (tiled flash kernel on CPU, flash/mem-efficient on CUDA); bf16 prompt
    chunks on a CPU with AMX run cpu_kernels' prefill_attention instead (a whole 87-token prompt: 44 us against
    SDPA's 108 us, 512 tokens: 0.49 vs 0.85 ms, on a 2-core Xeon). Decode: kernels that read the blocks in place, the
    compiled one of cpu_kernels.py on CPU and the Triton one of triton_kernels.py on CUDA; elsewhere, or when they
    cannot serve the layer, SDPA over the gathered blocks."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None, sinks: int = 0
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.window = sliding_window
        self.sinks = sinks  # with a window: the first `sinks` tokens stay visible
        self.scale = head_dim**-0.5

    def rotate_and_store(
        self, qkv: torch.Tensor, rope: RopeInputs, kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splits a fused QKV output [T, (Hq + 2 Hkv) D] into q, k, v, applies RoPE to q and k and writes k, v to
        their cache slots (quantised for an int8 cache). On CPU (cpu_kernels.py) and on CUDA (triton_kernels.py)
        one fused kernel does it all in place."""
        t, hq, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        quantized = isinstance(kv_cache, QuantizedKVCache)
        fused = qkv.device.type == "cpu" and (quantized or kv_cache.dtype == qkv.dtype)
        ops = cpu_ops() if fused else None
        if ops is not None:
            qkv = qkv.contiguous()
            if quantized:
                data, scales = kv_cache.data, kv_cache.scales
                ops.rotary_store_int8(qkv, rope.positions, rope.cos_table, rope.sin_table, data[0], data[1],
                                      scales[0], scales[1], meta.slot_mapping, hq, hkv, d)
            else:
                ops.rotary_store(qkv, rope.positions, rope.cos_table, rope.sin_table, kv_cache[0], kv_cache[1],
                                 meta.slot_mapping, hq, hkv, d)
        fused_cuda = (ops is None and not quantized and kv_cache.dtype == qkv.dtype
                      and triton_kernels.elementwise_available(qkv))
        if fused_cuda:
            qkv = qkv.contiguous()
            triton_kernels.rope_and_store(qkv, rope.positions, rope.cos_table, rope.sin_table, kv_cache[0],
                                          kv_cache[1], meta.slot_mapping, hq, hkv)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
        if ops is None and not fused_cuda:
            q, k = apply_rotary(q, k, rope)
            store_kv(kv_cache, meta.slot_mapping, k, v)
        return q, k, v

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D], already in the cache (rotate_and_store). Returns [T, Hq * D]."""
        nd = meta.num_decode
        if not meta.prefills:  # decodes only: no output buffer to assemble
            return self._decode(q, kv_cache, meta).view(q.shape[0], self.num_heads * self.head_dim)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta)
        for span in meta.prefills:
            s, n = span.start, span.num_tokens
            out[s : s + n] = self._prefill(q[s : s + n], k[s : s + n], v[s : s + n], kv_cache, span)
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def uses_triton_decode(self, kv_cache: KVCache, dtype: torch.dtype) -> bool:
        """Whether decode runs the Triton kernel: CUDA, a cache in the model dtype (not int8), no attention sinks.
        Its launches are capturable by CUDA graphs; the gather fallback is not (it sizes tensors from lengths)."""
        return (kv_cache.device.type == "cuda" and not isinstance(kv_cache, QuantizedKVCache)
                and triton_kernels.supports(dtype, kv_cache.dtype, self.head_dim, self.sinks))

    def _decode(self, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        bt, lens = meta.decode_block_tables, meta.decode_context_lens
        assert bt is not None and lens is not None
        window = -1 if self.window is None else self.window
        ops = cpu_ops() if kv_cache.device.type == "cpu" else None
        if ops is not None and isinstance(kv_cache, QuantizedKVCache):
            data, scales = kv_cache.data, kv_cache.scales
            return ops.paged_decode_int8(q.contiguous(), data[0], data[1], scales[0], scales[1], bt, lens, window,
                                         self.scale, self.sinks)
        if ops is not None and q.dtype == kv_cache.dtype:
            return ops.paged_decode(q.contiguous(), kv_cache[0], kv_cache[1], bt, lens, window, self.scale,
                                    self.sinks)
        if self.uses_triton_decode(kv_cache, q.dtype):
            return triton_kernels.paged_decode(q, kv_cache[0], kv_cache[1], bt, lens, self.scale, self.window)
        # Portable path: gather each sequence's context (padded to the longest) and run SDPA.
        b, max_blocks = bt.shape
        _, _, block_size, hkv, d = kv_cache.shape
        if self.window is None:
            keys, values = gather_blocks(kv_cache, bt.reshape(-1), q.dtype)
            keys = keys.view(b, max_blocks * block_size, hkv, d)
            values = values.view(b, max_blocks * block_size, hkv, d)
            mask = meta.decode_mask()
        else:  # only the window and the sinks: the blocks in between may have been freed
            slots, mask = meta.decode_gather(self.window, self.sinks)
            keys, values = gather_slots(kv_cache, slots, q.dtype)
        # The query heads of one KV head are the "query rows" of that head: no KV repetition for GQA/MQA.
        qg = q.view(b, hkv, self.group, d).to(keys.dtype)
        o = sdpa(qg, keys.transpose(1, 2), values.transpose(1, 2), mask)
        return o.reshape(b, self.num_heads, d).to(q.dtype)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, span: PrefillSpan
    ) -> torch.Tensor:
        n, ctx = span.num_tokens, span.context_len
        window = self.window
        amx = self._amx_prefill_ops(q)
        if ctx == n:  # whole prompt in one chunk: the new keys are the whole context
            if amx is not None:
                return amx.prefill_attention(q, k, v, -1 if window is None else window, self.sinks, self.scale)
            if window is None or window >= ctx:
                return self._sdpa(q, k, v, None)
        block_size = kv_cache.shape[2]
        first_pos = ctx - n
        # Key positions the chunk can attend to: everything, or the sinks and the window of its first token on.
        lo = 0 if window is None else max(0, first_pos - window + 1)
        ns = min(self.sinks, lo)
        key_pos = torch.cat([torch.arange(ns), torch.arange(lo, ctx)]).to(q.device)
        slots = span.block_table[key_pos // block_size] * block_size + key_pos % block_size
        keys, values = gather_slots(kv_cache, slots, q.dtype)
        if amx is not None:  # keys [0, ns) are at positions 0.., the others at lo..
            return amx.prefill_attention(q, keys, values, -1 if window is None else window, self.sinks, self.scale,
                                         first_pos, ns, lo)
        out = torch.empty_like(q)
        for t0 in range(0, n, PREFILL_QUERY_TILE):
            t1 = min(n, t0 + PREFILL_QUERY_TILE)
            q_pos = torch.arange(first_pos + t0, first_pos + t1, device=q.device)[:, None]
            # Keys beyond the tile's last position are never attended: trim them.
            kv_end = ns + first_pos + t1 - lo
            kp = key_pos[None, :kv_end]
            mask = kp <= q_pos
            if window is not None:
                mask &= (kp > q_pos - window) | (kp < self.sinks)
            out[t0:t1] = self._sdpa(q[t0:t1], keys[:kv_end], values[:kv_end], mask)
        return out

    def _amx_prefill_ops(self, q: torch.Tensor):
        """The CPU ops namespace when cpu_kernels' prefill_attention serves this layer's bf16 prompts, else None.
        It is built with amx_linear, so the same check says whether this CPU runs it."""
        if q.device.type != "cpu" or q.dtype != torch.bfloat16 or self.head_dim % 32 or self.head_dim > 256:
            return None
        return cpu_ops() if amx_linear_available() else None

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q: [n, Hq, D], k/v: [L, Hkv, D] -> [n, Hq, D]; causal when mask is None."""
        args = (q.transpose(0, 1).unsqueeze(0), k.to(q.dtype).transpose(0, 1).unsqueeze(0),
                v.to(q.dtype).transpose(0, 1).unsqueeze(0))
        return sdpa(*args, mask, enable_gqa=self.group > 1).squeeze(0).transpose(0, 1)


def layer_windows(native: list[int | None], kv_window: int | None) -> list[int | None]:
    """Each layer's attention window: the model's own (None = full attention), narrowed to `kv_window` when set."""
    if kv_window is None:
        return list(native)
    return [kv_window if w is None else min(w, kv_window) for w in native]


def paged_attentions(model: torch.nn.Module) -> list[PagedAttention]:
    """The PagedAttention of each layer of `model`, in layer order (they are plain attributes, not modules)."""
    return [a for m in model.modules() for a in vars(m).values() if isinstance(a, PagedAttention)]


def configure_windows(model: torch.nn.Module, windows: list[int | None], sinks: int) -> None:
    """Sets the window and attention sinks of every PagedAttention of `model` (one per layer, in layer order)."""
    attns = paged_attentions(model)
    if len(attns) != len(windows):
        raise ValueError(f"model has {len(attns)} attention layers, got {len(windows)} windows")
    for attn, window in zip(attns, windows):
        attn.window = window
        attn.sinks = sinks if window is not None else 0
