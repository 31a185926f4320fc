"""The Triton paged decode kernel (CUDA's decode attention, triton_kernels.py) against a float64 reference.

Without a GPU it runs under Triton's interpreter, in a subprocess because TRITON_INTERPRET must be set before Triton
is imported (the interpreter's bf16 matrix product is broken, so there it checks float32 and float16); with CUDA it
runs compiled, in all three dtypes (test_cuda.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# (query heads, KV heads, head dim, block size, window): GQA groups of 3 and 4, MHA, MQA, a window, head dim 80
CASES = [(9, 3, 64, 16, None), (32, 8, 64, 16, None), (4, 4, 32, 4, None), (8, 2, 64, 16, 37), (6, 1, 80, 8, None)]
LENGTHS = [1, 17, 150, 64, 3, 129]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(q, k_cache, v_cache, tables, lens, scale, window):
    """float64 attention of each row over positions [max(0, len - window), len) of its block table."""
    b, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    flat_k, flat_v = k_cache.reshape(-1, hkv, d).double(), v_cache.reshape(-1, hkv, d).double()
    out = []
    for i in range(b):
        n = int(lens[i])
        pos = torch.arange(max(0, n - window) if window else 0, n)
        slots = tables[i].cpu()[pos // bs] * bs + pos % bs
        k = flat_k[slots].repeat_interleave(hq // hkv, 1)
        v = flat_v[slots].repeat_interleave(hq // hkv, 1)
        s = torch.einsum("hd,lhd->hl", q[i].double(), k) * scale
        out.append(torch.einsum("hl,lhd->hd", s.softmax(-1), v))
    return torch.stack(out)


def check_kernel(device: str, dtypes: list[torch.dtype]) -> None:
    from tokenmill.model.layers.triton_kernels import paged_decode

    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for hq, hkv, d, bs, window in CASES:
            lens = torch.tensor(LENGTHS)
            width = -(-int(lens.max()) // bs)
            num_blocks = len(LENGTHS) * width + 3
            # Every slot a row does not attend to holds NaN: a kernel that reads one (a stale block before the
            # window, the tail of a last block, another row's block) fails the check.
            k_cache = torch.full((num_blocks, bs, hkv, d), float("nan"), dtype=dtype)
            v_cache = torch.full_like(k_cache, float("nan"))
            perm = torch.randperm(num_blocks, generator=gen)
            tables = perm[: len(LENGTHS) * width].view(len(LENGTHS), width)
            for r, n in enumerate(LENGTHS):
                for p in range(max(0, n - window) if window else 0, n):
                    blk, off = int(tables[r, p // bs]), p % bs
                    k_cache[blk, off] = torch.randn(hkv, d, generator=gen).to(dtype)
                    v_cache[blk, off] = torch.randn(hkv, d, generator=gen).to(dtype)
            q = torch.randn(len(LENGTHS), hq, d, generator=gen).to(dtype)
            scale = d**-0.5
            ref = reference(q, k_cache, v_cache, tables, lens, scale, window)
            got = paged_decode(q.to(device), k_cache.to(device), v_cache.to(device), tables.to(device),
                               lens.to(device), scale, window).cpu()
            assert got.dtype == dtype and got.shape == q.shape
            err = ((got.double() - ref).norm() / ref.norm()).item()
            assert err < TOLERANCE[dtype], f"{dtype} case {(hq, hkv, d, bs, window)}: relative error {err:.2e}"


def _interpreter_compat() -> None:
    """Triton 3.6's interpreter takes int() of one-element arrays for loop bounds, which NumPy >= 2.3 refuses."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patch


def test_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kernel ok" in proc.stdout


if __name__ == "__main__":  # the subprocess of the test above
    _interpreter_compat()
    check_kernel("cpu", [torch.float32, torch.float16])
    print("kernel ok")
