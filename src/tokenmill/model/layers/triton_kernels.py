"""Paged decode attention for CUDA, written in Triton.

One program serves one decode row and one KV head: it loads the query heads that share that KV head once, then walks
the row's context a tile of tokens at a time, reading K and V straight from their cache blocks through the block table
(no gathered copy), with an online softmax in float32. The launch grid depends only on the number of rows, and the
context lengths are read from device memory, so a CUDA graph captures the kernel once per batch size.

The same kernel runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check it on a
machine without a GPU.
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch does not ship Triton
    triton = None
    tl = None

# Tokens per tile: one masked gather of TILE rows of K (and V) per loop iteration.
TILE_TOKENS = 64
_NO_WINDOW = 2**30  # a window no context reaches
# float32 products in full precision (Triton's default for them is TF32); the half types use the tensor cores as is
_DOT_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "ieee"}


def triton_available() -> bool:
    return triton is not None


def supports(q_dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int, sinks: int) -> bool:
    """Whether the kernel handles this layer: a cache in the query's dtype (bf16, fp16 or fp32), no attention
    sinks."""
    return triton is not None and q_dtype == cache_dtype and cache_dtype in _DOT_PRECISION and sinks == 0 \
        and head_dim <= 256


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr,
        qk_scale, window,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_bt,
        stride_ot, stride_oh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        ctx = tl.load(lens_ptr + row).to(tl.int32)
        lo = tl.maximum(ctx - window, 0)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D_PAD)
        gmask = g < GROUP
        dmask = d < HEAD_DIM
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)

        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        offs = tl.arange(0, TILE)
        bt_row = bt_ptr + row.to(tl.int64) * stride_bt
        for t0 in range(lo, ctx, TILE):
            tok = t0 + offs
            valid = tok < ctx
            blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            slot = blk * stride_kb + (tok % BLOCK_SIZE) * stride_ks + kvh * stride_kh
            kv_mask = valid[:, None] & dmask[None, :]
            k = tl.load(k_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [GROUP_PAD, TILE], log2 units
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = acc / l[:, None]
        tl.store(o_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, window: int | None,
) -> torch.Tensor:
    """q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [B, W] (int32/int64);
    context_lens: [B] tokens each row attends to (its own included, at least 1); window: the last `window` tokens
    only (None = all). Returns [B, Hq, D] in q's dtype."""
    if triton is None:
        raise RuntimeError("Triton is not installed: the CUDA paged decode kernel needs it")
    b, hq, d = q.shape
    _, block_size, hkv, dk = k_cache.shape
    if dk != d or hq % hkv:
        raise ValueError(f"query [{b}, {hq}, {d}] does not fit a cache with {hkv} KV heads of dim {dk}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged_decode needs K and V caches of one layout with contiguous head dims")
    group = hq // hkv
    out = torch.empty_like(q)
    # tl.dot wants every dimension >= 16: pad the query heads of a group and the head dim.
    _paged_decode_kernel[(b, hkv)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        scale / math.log(2.0), window or _NO_WINDOW,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=_pow2_at_least(group, 16), HEAD_DIM=d, D_PAD=_pow2_at_least(d, 16),
        BLOCK_SIZE=block_size, TILE=TILE_TOKENS, PRECISION=_DOT_PRECISION[q.dtype],
    )
    return out
