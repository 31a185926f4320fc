"""Gated activations."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_kernels
from .cpu_kernels import cpu_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] projection."""
    ops = cpu_ops() if gate_up.device.type == "cpu" and gate_up.dim() == 2 else None
    if ops is not None:
        return ops.silu_and_mul(gate_up)
    if gate_up.dim() == 2 and triton_kernels.elementwise_available(gate_up):
        return triton_kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
