"""Dense linear layers. (Quantised and tensor-parallel variants will live here too.)

On CPUs with native bf16 (AVX512-BF16/AMX) a bf16 weight is re-laid out once, after loading, into oneDNN's blocked
format and multiplied with oneDNN's linear kernel: measured on a 2-core Sapphire Rapids for SmolLM2's shapes that
is 1.8-2.2x faster than `F.linear` at 1-128 rows and bit-identical to it. Decode steps multiply few rows, where the
weights are streamed from memory once per step, and there a second copy of the weight feeds a few-row kernel:

* with AMX (Sapphire Rapids and later): cpu_kernels.amx_linear for 1-256 rows (every row count for a
  vocabulary-sized head, which then keeps no oneDNN copy), the weight in AMX tile order. Measured on a 2-core Xeon
  with AMX over SmolLM2's 120 layer linears (weights from DRAM, medians of 9 rounds): 9.0 / 9.5 / 11.3 / 14.7 ms
  at 1 / 16 / 32 / 64 rows against oneDNN's 12.7 / 13.2 / 14.5 / 16.1 ms, i.e. one to sixteen rows cost the same;
  see AMX_ROWS for more rows. The dense copy is released.
* with AVX512-BF16 but no AMX (Zen 4): cpu_kernels.small_m_linear for 1-16 rows, reading the dense weight: ~30 GB/s
  for 1 to 8 rows on a 2-core Zen 4 (34 GB/s read bandwidth) where oneDNN reaches ~14 GB/s at one row; at 9-16 rows
  the dot products set the pace (four weight rows in registers feed each loaded x chunk), 10-25% faster than oneDNN
  at 9-12 rows and 5-10% at 13-16.

Both compute each row the same whatever the row count (so speculative verification reproduces plain decoding bit
for bit). Weights live on huge pages (see hugepages.py).
"""
from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import cpu_ops

logger = logging.getLogger(__name__)

SMALL_M_ROWS = 8  # up to this many rows small_m_linear streams the weights at the cost of one row
SMALL_M_MAX_ROWS = 16  # the most rows small_m_linear takes (9-16: compute-bound, still faster than oneDNN)
# The most rows amx_linear takes; beyond, oneDNN's GEMM is faster. Measured on a 2-core Xeon over SmolLM2's 120
# layer linears (128 rows: 18-20 ms against oneDNN's 27 ms; 256: 34 vs 39 ms; 512: 62 vs 55 ms).
AMX_ROWS = 256
# A layer with more output columns is a vocabulary-sized head: its float32 logits cost amx_linear no more than
# oneDNN's GEMM plus the widening pass at any row count (SmolLM2's 49152 x 576 head, 2-core Xeon: 128 rows 5.5 vs
# 5.3 ms, 256: 21.4 vs 20.3 ms, 512: 46.1 vs 50.3 ms), so it takes every row and keeps no oneDNN copy (55 MB).
WIDE_COLUMNS = 16384
AMX_FLAT_ROWS = 16  # up to this many rows amx_linear costs about one row
ONEDNN_ROW_QUANTUM = 32  # oneDNN calls get their rows padded to a multiple of this (see onednn_linear)


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias). A single-row bf16/fp16 input on CPU goes through `torch.mv`, which streams the weight
    two to three times faster than the GEMM path does for one row (measured on AVX512/AMX CPUs)."""
    if x.shape[0] == 1 and x.device.type == "cpu" and x.dtype != torch.float32:
        y = torch.mv(weight, x[0]).unsqueeze(0)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def onednn_bf16_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amx_linear_available() -> bool:
    """Whether this CPU runs cpu_kernels.amx_linear (AMX-BF16, and the OS granted the tile state)."""
    ops = cpu_ops()
    return ops is not None and hasattr(ops, "amx_linear") and bool(ops.amx_available())


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T through oneDNN's linear kernel, with the rows padded to a multiple of ONEDNN_ROW_QUANTUM.

    oneDNN JIT-compiles a kernel for every new input shape and keeps up to 1024 of them. Measured on a 2-core Xeon
    (3072 x 576 bf16 weight, ~420 rows): a new row count costs 4.3 ms against 0.5 ms once compiled, and each kept
    kernel ~0.3 MB. Most steps that reach oneDNN fill the token budget, but the others (a wave's last prompt chunk)
    bring new row counts: unpadded, the engine's resident memory grew by ~30 MB per 128 ShareGPT requests
    (1,077 -> 1,195 MB over six rounds; padded 1,074 -> 1,084 MB) at the same speed."""
    pad = -x.shape[0] % ONEDNN_ROW_QUANTUM
    if pad == 0 or x.dim() != 2:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(F.pad(x, (0, 0, 0, pad)), packed, bias, "none", [], "")[: x.shape[0]]


class Linear(nn.Linear):
    """nn.Linear with an optional CPU-packed weight (see the module docstring)."""

    packed: torch.Tensor | None = None
    small_m: object = None  # the few-row kernel (x, weight, bias) for up to small_m_rows rows
    small_m_rows: int = 0
    flat_cost_rows: int = 0  # up to this many rows a call costs about as much as one row

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # amx_linear's copy of the weight, a parameter so that it moves to huge pages with the others
        self.register_parameter("tiled_weight", None)

    def forward(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        """x @ W.T (+ bias). `float_out`: a float32 result. amx_linear writes its float32 accumulators unrounded
        (more precise logits, and no pass over a vocabulary-sized output); the other paths widen the result in the
        layer's dtype. Rounded to the layer's dtype, both equal the plain output."""
        if self.small_m is not None and x.dim() == 2 and x.shape[0] <= self.small_m_rows:
            tiled = self.tiled_weight
            if tiled is not None:
                return self.small_m(x, tiled, self.bias, float_out)
            out = self.small_m(x, self.weight, self.bias)
        elif self.packed is not None:
            out = onednn_linear(x, self.packed, self.bias)
        else:
            out = dense(x, self.weight, self.bias)
        return out.float() if float_out else out

    def pack_for_cpu(self, release_dense: bool = True) -> bool:
        """Re-lays out a bf16 CPU weight for oneDNN and for the few-row kernel this CPU has (with AMX a
        vocabulary-sized head gets only the latter); returns whether it did. With `release_dense` the dense weight
        is replaced by an empty tensor unless the few-row kernel reads it (pass False when the weight is shared,
        e.g. tied embeddings)."""
        w = self.weight
        if (self.small_m is not None or self.packed is not None or w.device.type != "cpu" or w.dtype != torch.bfloat16
                or not onednn_bf16_available()):
            return False
        ops = cpu_ops()
        n, k = w.shape
        if amx_linear_available() and n % 16 == 0 and k % 32 == 0:
            self.tiled_weight = nn.Parameter(ops.amx_pack(w.detach()), requires_grad=False)
            rows = sys.maxsize if n > WIDE_COLUMNS else AMX_ROWS
            self.small_m, self.small_m_rows, self.flat_cost_rows = ops.amx_linear, rows, AMX_FLAT_ROWS
        elif ops is not None and hasattr(ops, "small_m_linear") and k % 32 == 0 and w.is_contiguous():
            self.small_m, self.small_m_rows, self.flat_cost_rows = ops.small_m_linear, SMALL_M_MAX_ROWS, SMALL_M_ROWS
            release_dense = False  # small_m_linear reads the dense weight
        if self.small_m_rows < sys.maxsize:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        if release_dense:
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        return True


def pack_linear_weights(model: nn.Module, shared: set[int] = frozenset()) -> int:
    """Packs every `Linear` of a loaded model for the CPU (no-op elsewhere); `shared` holds ids of weights that
    other modules also use, which stay dense. Returns how many layers were packed."""
    n = 0
    for module in model.modules():
        if isinstance(module, Linear):
            n += module.pack_for_cpu(release_dense=id(module.weight) not in shared)
    if n:
        logger.info("packed %d linear layers for the CPU kernels (bf16)", n)
    return n
