"""Rotary position embeddings (neox / rotate-half layout) with the scaling types Llama-family configs use."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


@dataclass
class RopeInputs:
    """A batch's positions and the float32 tables; the per-token cos/sin are looked up once per forward pass, on
    first use (the fused CPU kernel reads the tables directly and never needs them)."""

    positions: torch.Tensor  # [T] int64
    cos_table: torch.Tensor  # [max_positions, D/2] float32
    sin_table: torch.Tensor
    dtype: torch.dtype
    _cos_sin: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D/2] in the model dtype."""
        if self._cos_sin is None:
            cos = self.cos_table.index_select(0, self.positions).to(self.dtype)[:, None, :]
            sin = self.sin_table.index_select(0, self.positions).to(self.dtype)[:, None, :]
            self._cos_sin = (cos, sin)
        return self._cos_sin


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self._build(max_positions, self.inv_freq.device)

    def _build(self, max_positions: int, device: torch.device) -> None:
        freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * self.inv_freq.to(device)
        # Plain attributes, not buffers: the tables stay float32 when the model is cast to bf16 (the fused CPU
        # kernel reads them as float32; the PyTorch path casts the looked-up rows, as HF does).
        self.cos = freqs.cos()
        self.sin = freqs.sin()
        self.max_positions = max_positions

    def ensure_positions(self, num_positions: int) -> None:
        """Grows the tables (at least doubling) to cover positions [0, num_positions): sequences with a KV window
        run past the context length they were sized for."""
        if num_positions > self.max_positions:
            self._build(max(num_positions, 2 * self.max_positions), self.cos.device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeInputs:
        """The rotary inputs of a batch, shared by all layers of one forward pass."""
        return RopeInputs(positions, self.cos, self.sin, dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, rope: RopeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D]; returns rotated copies."""
    cos, sin = rope.cos_sin()
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
