"""RMSNorm as Llama-family models define it (normalise in float32, scale in the model dtype), with the residual
add fused in: `add_forward` updates the residual stream and normalises it in one pass."""
from __future__ import annotations

import torch
from torch import nn

from . import triton_kernels
from .cpu_kernels import cpu_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = cpu_ops() if x.device.type == "cpu" else None
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        if x.dim() == 2 and triton_kernels.elementwise_available(x):
            return triton_kernels.rms_norm(x, self.weight, self.eps)[0]
        return self._norm(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + x (in the model dtype) -> (normalised, new residual). May update `residual` in place."""
        ops = cpu_ops() if x.device.type == "cpu" else None
        if ops is not None:
            return ops.add_rms_norm(residual, x, self.weight, self.eps), residual
        if x.dim() == 2 and triton_kernels.elementwise_available(x):
            return triton_kernels.rms_norm(x, self.weight, self.eps, residual)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
