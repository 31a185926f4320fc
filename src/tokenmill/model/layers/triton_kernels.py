"""CUDA kernels written in Triton: paged decode attention, and the fused element-wise steps of a decoder layer.

A decode step of a small model is bound by the number of kernels it launches (a few microseconds each, even replayed
from a CUDA graph), not by bytes or FLOPs. In PyTorch ops one layer is about 40 kernels (RMSNorm alone is 9, RoPE and
the cache write 16); with the fused kernels below it is 9: two norms, four GEMMs, RoPE+store, attention, SiLU*mul.

One program serves one decode row and one KV head: it loads the query heads that share that KV head once, then walks
the row's context a tile of tokens at a time, reading K and V straight from their cache blocks through the block table
(no gathered copy), with an online softmax in float32. The launch grid depends only on the number of rows, and the
context lengths are read from device memory, so a CUDA graph captures the kernel once per batch size.

The same kernel runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check it on a
machine without a GPU.
"""
from __future__ import annotations

import math
import os

import torch

triton = tl = None
# Triton serves CUDA tensors only (and its interpreter, for the tests): where neither can run, importing it would
# only cost start-up time and ~45 MB of resident memory (a CPU machine with a CUDA wheel of torch).
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton
        import triton.language as tl
    except ImportError:  # the CPU wheel of torch does not ship Triton
        pass

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

    @triton.jit(do_not_specialize=["stride_bt"])  # the eager path's block-table width varies step to step
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


# ---- fused element-wise kernels ------------------------------------------------------------------------------------

def elementwise_available(t: torch.Tensor) -> bool:
    """Whether the fused kernels below serve this tensor (CUDA, with Triton)."""
    return triton is not None and t.device.type == "cuda"


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        # Rounds where PyTorch (and HF) round: the residual sum and the normalised value in the model dtype.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(res_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)).to(
                x.dtype)
            tl.store(res_out_ptr + row * n + cols, x, mask=mask)
        h = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / n + eps)
        y = (h * rstd).to(x.dtype).to(tl.float32) * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        gate = tl.load(x_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * n + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_store_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_t,
                           HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
        # Program (token, head) over the fused QKV row: rotates a query or key head in place (rotate-half RoPE)
        # and writes key and value heads to the token's cache slot.
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        i = tl.arange(0, HALF_PAD)
        mask = i < HALF
        base = qkv_ptr + t * stride_t + h * 2 * HALF
        slot = tl.load(slot_ptr + t)
        if h < HQ + HKV:
            pos = tl.load(pos_ptr + t)
            cos = tl.load(cos_ptr + pos * HALF + i, mask=mask, other=0.0)
            sin = tl.load(sin_ptr + pos * HALF + i, mask=mask, other=0.0)
            x1 = tl.load(base + i, mask=mask, other=0.0)
            x2 = tl.load(base + HALF + i, mask=mask, other=0.0)
            o1 = (x1.to(tl.float32) * cos - x2.to(tl.float32) * sin).to(x1.dtype)
            o2 = (x2.to(tl.float32) * cos + x1.to(tl.float32) * sin).to(x1.dtype)
            tl.store(base + i, o1, mask=mask)
            tl.store(base + HALF + i, o2, mask=mask)
            if h >= HQ:
                dst = k_cache_ptr + (slot * HKV + (h - HQ)) * 2 * HALF
                tl.store(dst + i, o1, mask=mask)
                tl.store(dst + HALF + i, o2, mask=mask)
        else:
            dst = v_cache_ptr + (slot * HKV + (h - HQ - HKV)) * 2 * HALF
            tl.store(dst + i, tl.load(base + i, mask=mask, other=0.0), mask=mask)
            tl.store(dst + HALF + i, tl.load(base + HALF + i, mask=mask, other=0.0), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of x [T, N] (of residual + x when given): (normalised, new residual or None)."""
    x = x.contiguous()
    t, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else None
    res_in = residual.contiguous() if residual is not None else x
    _rms_norm_kernel[(t,)](x, res_in, weight, out, res_out if res_out is not None else out, n, eps,
                           HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n))
    return out, res_out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a fused [T, 2N] projection: silu(gate) * up, [T, N]."""
    gate_up = gate_up.contiguous()
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
    return out


def rope_and_store(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, hq: int, hkv: int) -> None:
    """In place on a contiguous fused QKV [T, (hq + 2 hkv) D]: rotates q and k by the float32 tables [P, D/2] at
    `positions`, and writes k and v to cache `slots` ([num_blocks, block_size, hkv, D] caches, contiguous)."""
    t, width = qkv.shape
    half = width // (hq + 2 * hkv) // 2
    _rope_store_kernel[(t, hq + 2 * hkv)](qkv, positions, cos_table, sin_table, k_cache, v_cache, slots, qkv.stride(0),
                                          HQ=hq, HKV=hkv, HALF=half, HALF_PAD=triton.next_power_of_2(half))
