"""Weight quantisation formats and round-to-nearest quantisers.

Two formats, both device-independent (what checkpoints store; the layers re-pack them for their kernels):

* int8: symmetric, per output channel. ``qweight`` int8 [N, K], ``scales`` float32 [N]; w = q * scale.
* int4: asymmetric, group-wise along K. ``qweight`` uint8 [N, K/2] (element 2j in the low nibble, 2j+1 in the
  high one), ``scales`` and ``zeros`` bfloat16 [N, K/g]; w = (q - 8) * scale + zero with q in 0..15. This is the
  convention of PyTorch's int4 matmul kernels, and GGUF's Q4_0/Q4_1 blocks map onto it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class QuantizedWeight:
    """A quantised [N, K] weight in one of the formats above."""

    method: str  # "int8" | "int4"
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int = 0  # int4 only

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.qweight.shape
        return (n, k * 2) if self.method == "int4" else (n, k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.method == "int8":
            return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)
        q = unpack_int4(self.qweight).float()
        n, k = q.shape
        g = self.group_size
        w = (q.view(n, k // g, g) - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.view(n, k).to(dtype)

    def rows(self, start: int, end: int) -> "QuantizedWeight":
        """Output rows [start, end) (a view)."""
        z = None if self.zeros is None else self.zeros[start:end]
        return QuantizedWeight(self.method, self.qweight[start:end], self.scales[start:end], z, self.group_size)

    @staticmethod
    def cat_rows(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stacks weights along N (fused QKV / gate-up); all parts must share the format."""
        first = parts[0]
        if any(p.method != first.method or p.group_size != first.group_size for p in parts):
            raise ValueError("cannot fuse quantised weights of different formats: "
                             + ", ".join(f"{p.method}/g{p.group_size}" for p in parts))
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
        return QuantizedWeight(first.method, torch.cat([p.qweight for p in parts]),
                               torch.cat([p.scales for p in parts]), zeros, first.group_size)


def check_group_size(k: int, group_size: int, name: str = "weight") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(
            f"int4 group size {group_size} does not divide the input dimension {k} of {name}; "
            f"choose one of {[g for g in INT4_GROUP_SIZES if k % g == 0] or 'none (keep this layer in bf16)'}"
        )


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-channel int8 (round to nearest)."""
    wf = w.detach().float()
    scales = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(wf / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q, scales)


def quantize_int4(w: torch.Tensor, group_size: int, name: str = "weight",
                  importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Asymmetric group-wise int4, round to nearest. Scales and zeros are stored in bf16, the precision the CPU
    kernel computes with, and the codes are rounded against those stored values.

    With `importance` (per input channel, e.g. the mean squared activation) each group's range is also shrunk
    towards its centre by the factor in CLIP_GRID that minimises the importance-weighted squared error (AWQ's
    clipping step): clipping a few outliers buys a finer step for the rest."""
    n, k = w.shape
    check_group_size(k, group_size, name)
    wg = w.detach().float().view(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    if importance is None:
        return _int4_with_range(wg, lo, hi, group_size)
    imp = importance.float().view(1, k // group_size, group_size)
    best_err = best_lo = best_hi = None
    mid = (lo + hi) / 2
    for c in CLIP_GRID:
        clo, chi = mid + (lo - mid) * c, mid + (hi - mid) * c
        qw = _int4_with_range(wg, clo, chi, group_size)
        err = ((qw.dequantize().view_as(wg) - wg).pow(2) * imp).sum(dim=2)
        if best_err is None:
            best_err, best_lo, best_hi = err, clo, chi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, clo, best_lo), torch.where(better, chi, best_hi)
    return _int4_with_range(wg, best_lo, best_hi, group_size)


CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _int4_with_range(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int) -> QuantizedWeight:
    n = wg.shape[0]
    scales = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16)
    zeros = (lo + 8.0 * scales.float()).to(torch.bfloat16)  # w = q s + lo = (q - 8) s + (lo + 8 s)
    q = torch.round((wg - zeros.float()[..., None]) / scales.float()[..., None]) + 8
    q = q.clamp_(0, 15).to(torch.uint8).view(n, -1)
    return QuantizedWeight("int4", pack_int4(q), scales, zeros, group_size)


def quantize(w: torch.Tensor, method: str, group_size: int = 32, name: str = "weight",
             importance: torch.Tensor | None = None) -> QuantizedWeight:
    if method == "int8":
        return quantize_int8(w)
    if method == "int4":
        return quantize_int4(w, group_size, name, importance)
    raise ValueError(f"unknown weight quantisation method {method!r}; expected int8 or int4")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> [N, K/2], element 2j in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).view(p.shape[0], p.shape[1] * 2)
