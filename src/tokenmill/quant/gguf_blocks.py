"""GGUF's own quantised blocks as tokenmill weights, without dequantising whole tensors.

* Q4_0 (per 32 values: fp16 d, 16 bytes of nibbles; x = (q - 8) d) and Q4_1 (fp16 d, fp16 m; x = q d + m) are
  int4 with group 32 exactly: scale = d, zero = 0 (Q4_0) or m + 8 d (Q4_1). In a ggml block the low nibbles hold
  values 0..15 and the high nibbles 16..31.
* Q8_0 (fp16 d, 32 int8; x = q d) has one scale per 32 values; tokenmill's int8 is per output channel, so rows
  are re-quantised a chunk of rows at a time (the only step that goes through floats, never the whole tensor).
"""
from __future__ import annotations

import numpy as np
import torch

from .weights import QuantizedWeight, pack_int4, quantize_int8

GGUF_DIRECT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
_ROW_CHUNK = 4096


def _blocks(data: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(data).reshape(rows, -1, block_bytes)


def _q4_nibbles(qs: np.ndarray) -> torch.Tensor:
    """[rows, nblocks, 16] ggml nibble bytes -> uint8 values [rows, nblocks * 32] in element order."""
    q = torch.from_numpy(qs)
    return torch.cat([q & 15, q >> 4], dim=-1).reshape(q.shape[0], -1)


def gguf_quantized_weight(type_name: str, data: np.ndarray, shape: tuple[int, int]) -> QuantizedWeight:
    """`data`: the tensor's raw bytes (GGUFReader tensor.data), `shape`: (rows, cols) in HF orientation."""
    rows, cols = shape
    if cols % 32:
        raise ValueError(f"GGUF {type_name} tensor with {cols} columns (not a multiple of 32)")
    if type_name == "Q8_0":
        blk = _blocks(data, rows, 34)
        parts = []
        for r0 in range(0, rows, _ROW_CHUNK):
            b = blk[r0 : r0 + _ROW_CHUNK]
            d = torch.from_numpy(np.ascontiguousarray(b[:, :, :2]).view(np.float16).astype(np.float32))
            q = torch.from_numpy(np.ascontiguousarray(b[:, :, 2:]).view(np.int8).astype(np.float32))
            parts.append(quantize_int8((q * d).reshape(b.shape[0], cols)))
        return QuantizedWeight.cat_rows(parts)
    if type_name in ("Q4_0", "Q4_1"):
        bb = 18 if type_name == "Q4_0" else 20
        blk = _blocks(data, rows, bb)
        d = torch.from_numpy(np.ascontiguousarray(blk[:, :, :2]).view(np.float16)[..., 0].astype(np.float32))
        if type_name == "Q4_0":
            zero = torch.zeros_like(d)
            qs = blk[:, :, 2:]
        else:
            m = torch.from_numpy(np.ascontiguousarray(blk[:, :, 2:4]).view(np.float16)[..., 0].astype(np.float32))
            zero = m + 8.0 * d
            qs = blk[:, :, 4:]
        q = _q4_nibbles(np.ascontiguousarray(qs))
        return QuantizedWeight("int4", pack_int4(q), d.to(torch.bfloat16), zero.to(torch.bfloat16), 32)
    raise ValueError(f"GGUF tensor type {type_name} cannot be loaded directly; supported: {GGUF_DIRECT_TYPES}")


def permute_rows(qw: QuantizedWeight, fn) -> QuantizedWeight:
    """Applies a row permutation `fn` (e.g. undoing llama.cpp's Q/K order) to every per-row tensor."""
    z = None if qw.zeros is None else fn(qw.zeros)
    return QuantizedWeight(qw.method, fn(qw.qweight).contiguous(), fn(qw.scales).contiguous(),
                           None if z is None else z.contiguous(), qw.group_size)
