"""Weight-only quantised linear and embedding layers (formats in tokenmill.quant.weights).

Kernels, chosen per call:
* int8 on CPU: cpu_kernels.py's int8_linear: up to `INT8_KERNEL_MAX_ROWS` rows through a streaming AVX512-BF16
  kernel, and on a CPU with AMX any number of rows beyond (the weight rows widened to bf16 once per call, then AMX
  tiles). Without AMX more rows dequantise the weight to the activation dtype and use the dense matmul; without
  the kernel, up to `INT8_KERNEL_MAX_ROWS` rows take `torch._weight_int8pack_mm`.
* int4 on CPU: `torch._weight_int4pack_mm_for_cpu` on the weight re-packed once by
  `_convert_weight_to_int4pack_for_cpu`; more than `INT4_KERNEL_MAX_ROWS` rows dequantise as above.
* elsewhere (CUDA included): dequantise and matmul. Correct but not faster than bf16; no fused GPU kernel has
  been measured here (no GPU was available).
The state dict always holds the portable format, so a checkpoint saved on one machine loads on any other.
"""
from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ...quant.weights import QuantizedWeight, check_group_size, unpack_int4
from .cpu_kernels import cpu_ops
from .linear import amx_linear_available

logger = logging.getLogger(__name__)

INT8_KERNEL_MAX_ROWS = 16
INT4_KERNEL_MAX_ROWS = 16
KERNEL_DEVICES = ("cpu", "cuda")


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b for an int8 or int4 weight (buffers: qweight, scales[, zeros][, bias])."""

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int = 0, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        if method not in ("int8", "int4"):
            raise ValueError(f"unknown weight quantisation method {method!r}; expected int8 or int4")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        self.dtype = dtype
        if method == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32, device=device))
            self.zeros = None
        else:
            check_group_size(in_features, group_size)
            ng = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.zeros(out_features, ng, dtype=torch.bfloat16, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=torch.bfloat16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._int8_kernel = None  # cpu_kernels' int8_linear, set by prepare()
        self.int8_max_rows = INT8_KERNEL_MAX_ROWS  # the most rows it takes
        self._packed: torch.Tensor | None = None  # int4: the CPU kernel's layout
        self._scales_zeros: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "QuantLinear":
        n, k = qw.shape
        layer = cls(k, n, qw.method, qw.group_size, bias is not None, dtype, device=qw.qweight.device)
        layer.load_quantized(qw, bias)
        return layer

    def load_quantized(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        if qw.method != self.method or qw.shape != (self.out_features, self.in_features) or (
            qw.method == "int4" and qw.group_size != self.group_size
        ):
            raise ValueError(
                f"quantised weight {qw.method}/g{qw.group_size} {qw.shape} does not fit layer "
                f"{self.method}/g{self.group_size} {(self.out_features, self.in_features)}"
            )
        self.qweight.copy_(qw.qweight)
        self.scales.copy_(qw.scales)
        if self.zeros is not None:
            self.zeros.copy_(qw.zeros)
        if bias is not None:
            self.bias.copy_(bias)
        self._packed = None

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.method, self.qweight, self.scales, self.zeros, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype or self.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}{g}"

    # ---- kernels ----------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """One-time re-layout for this device's kernel (called after loading)."""
        device = self.qweight.device.type
        if device not in KERNEL_DEVICES:
            raise ValueError(
                f"{self.method} weights have no kernel on device {device!r} (supported: {', '.join(KERNEL_DEVICES)}); "
                "load the model unquantised there"
            )
        ops = cpu_ops() if device == "cpu" and self.method == "int8" and self.in_features % 32 == 0 else None
        self._int8_kernel = getattr(ops, "int8_linear", None)
        # with AMX the kernel takes every row count (it widens the weight once per call, whatever the rows)
        amx = self._int8_kernel is not None and amx_linear_available() and self.out_features % 16 == 0
        self.int8_max_rows = sys.maxsize if amx else INT8_KERNEL_MAX_ROWS
        if self.method == "int4" and device == "cpu" and self.out_features % 16 == 0:
            q = unpack_int4(self.qweight).to(torch.int32)
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            # [K/g, N, 2] (scale, zero) in the activation dtype, the kernel's layout
            self._scales_zeros = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(self.dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self._matmul(x)
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]))
        return y.view(*shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if x.device.type == "cpu":
            if self.method == "int8":
                if self._int8_kernel is not None and x.dtype == torch.bfloat16 and m <= self.int8_max_rows:
                    return self._int8_kernel(x, self.qweight, self.scales, self.bias)
                if m <= INT8_KERNEL_MAX_ROWS:
                    y = torch._weight_int8pack_mm(x, self.qweight, self.scales.to(x.dtype))
                    return y if self.bias is None else y + self.bias
            if self.method == "int4" and m <= INT4_KERNEL_MAX_ROWS and self._packed is not None:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x.to(self.dtype), self._packed, self.group_size, self._scales_zeros
                ).to(x.dtype)
                return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    @property
    def nbytes(self) -> int:
        """Resident bytes: the portable buffers plus any kernel copy."""
        extra = sum(t.numel() * t.element_size() for t in (self._packed, self._scales_zeros) if t is not None)
        return self.quantized_weight().nbytes + extra + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class QuantEmbedding(nn.Module):
    """Embedding lookup from a quantised [vocab, hidden] table (rows dequantised on the fly). With tied
    embeddings the same QuantLinear serves as the LM head: `head` shares its buffers."""

    def __init__(self, head: QuantLinear) -> None:
        super().__init__()
        self.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.head
        flat = ids.reshape(-1)
        rows = QuantizedWeight(
            h.method, h.qweight.index_select(0, flat), h.scales.index_select(0, flat),
            None if h.zeros is None else h.zeros.index_select(0, flat), h.group_size,
        )
        return rows.dequantize(h.dtype).view(*ids.shape, h.in_features)
