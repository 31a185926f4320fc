"""Dense linear layers. (Quantised and tensor-parallel variants will live here too.)

On CPUs with native bf16 (AVX512-BF16/AMX) a bf16 weight is re-laid out once, after loading, into oneDNN's blocked
format and multiplied with oneDNN's linear kernel: measured on a 2-core Sapphire Rapids for SmolLM2's shapes that
is 1.8-2.2x faster than `F.linear` at 1-128 rows (the whole per-step matmul time at batch 16 drops from ~16 to
~8.5 ms) and bit-identical to it. For 1-8 rows (decoding a few sequences, or one sequence verifying speculated
tokens, where the weights are streamed from memory once per step) the dense weight is kept and multiplied by a
streaming AVX512-BF16 kernel (cpu_kernels.small_m_linear), which holds ~30 GB/s for 1 to 8 rows on a 2-core Zen 4
(34 GB/s read bandwidth; weights on huge pages, see hugepages.py) where oneDNN reaches ~14 GB/s at one row, and
computes each row the same whatever the row count (so speculative verification reproduces plain decoding bit for
bit); without that kernel the dense copy is released. The same kernel takes 9-16 rows (the decode steps of 9-16
sequences), where the dot products set the pace: four weight rows in registers feed each loaded x chunk; measured
against oneDNN over SmolLM2's linears (weights from DRAM, medians of 15 alternating rounds) 10-25% faster at 9-12
rows and 5-10% at 13-16, and still batch-invariant.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import cpu_ops

logger = logging.getLogger(__name__)

SMALL_M_ROWS = 8  # up to this many rows small_m_linear streams the weights at the cost of one row
SMALL_M_MAX_ROWS = 16  # the most rows small_m_linear takes (9-16: compute-bound, still faster than oneDNN)


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


class Linear(nn.Linear):
    """nn.Linear with an optional CPU-packed weight (see the module docstring)."""

    packed: torch.Tensor | None = None
    small_m: object = None  # the streaming kernel for 1-SMALL_M_MAX_ROWS rows (needs the dense weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            if self.small_m is not None and x.dim() == 2 and x.shape[0] <= SMALL_M_MAX_ROWS:
                return self.small_m(x, self.weight, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return dense(x, self.weight, self.bias)

    def pack_for_cpu(self, release_dense: bool = True) -> bool:
        """Re-lays out a bf16 CPU weight for oneDNN; returns whether it did. With `release_dense` the dense weight
        is replaced by an empty tensor (pass False when the weight is shared, e.g. tied embeddings)."""
        w = self.weight
        if self.packed is not None or w.device.type != "cpu" or w.dtype != torch.bfloat16 or not onednn_bf16_available():
            return False
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        ops = cpu_ops()
        if ops is not None and hasattr(ops, "small_m_linear") and w.shape[1] % 32 == 0 and w.is_contiguous():
            self.small_m = ops.small_m_linear
        elif release_dense:
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
        logger.info("packed %d linear layers for oneDNN bf16", n)
    return n
