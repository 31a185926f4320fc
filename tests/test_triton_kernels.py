"""The Triton kernels of the CUDA path (triton_kernels.py): paged decode attention against a float64 reference, and
the fused RMSNorm, SiLU*mul and RoPE+cache-write kernels against the PyTorch ops they replace.

Without a GPU they run under Triton's interpreter, in a subprocess because TRITON_INTERPRET must be set before Triton
is imported (the interpreter's bfloat16 is not the GPU's: its matrix product is wrong and it rounds differently, so there the
kernels are checked in float32 and float16);
with CUDA they run compiled, in all three dtypes (test_cuda.py)."""
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


def check_elementwise(device: str, dtypes: list[torch.dtype]) -> None:
    import torch.nn.functional as F

    from tokenmill.model.layers import triton_kernels as tk
    from tokenmill.model.layers.kv_cache import store_kv
    from tokenmill.model.layers.norm import RMSNorm
    from tokenmill.model.layers.rotary import RotaryEmbedding, apply_rotary

    gen = torch.Generator().manual_seed(1)

    def rand(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(dtype)

    def close(got, want, dtype, what):
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err < TOLERANCE[dtype], f"{what} {dtype}: relative error {err:.2e}"

    for dtype in dtypes:
        t, n = 5, 576
        norm = RMSNorm(n, 1e-5).to(dtype)
        norm.weight.data = rand(n, dtype=dtype)
        x, res = rand(t, n, dtype=dtype), rand(t, n, dtype=dtype)
        out, new_res = tk.rms_norm(x.to(device), norm.weight.to(device), 1e-5, res.to(device))
        assert torch.equal(new_res.cpu(), res + x), f"{dtype}: the residual sum must round as PyTorch rounds it"
        close(out.cpu(), norm._norm(res + x), dtype, "add+rms_norm")
        out, none = tk.rms_norm(x.to(device), norm.weight.to(device), 1e-5)
        assert none is None
        close(out.cpu(), norm._norm(x), dtype, "rms_norm")

        gate_up = rand(t, 2 * 1536, dtype=dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        close(tk.silu_and_mul(gate_up.to(device)).cpu(), F.silu(gate.float()) * up.float(), dtype, "silu_and_mul")

        hq, hkv, d, bs, nb = 9, 3, 64, 4, 6
        rotary = RotaryEmbedding(d, 64, 10000.0, None)
        positions = torch.tensor([0, 7, 3, 63, 20])
        slots = torch.tensor([5, 0, 17, 9, 22])
        qkv = rand(t, (hq + 2 * hkv) * d, dtype=dtype)
        caches = torch.full((2, nb, bs, hkv, d), float("nan"), dtype=dtype)
        ref_caches = caches.clone()
        rope = rotary.lookup(positions, dtype)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        rq, rk = apply_rotary(q.reshape(t, hq, d), k.reshape(t, hkv, d), rope)
        store_kv(ref_caches, slots, rk, v.reshape(t, hkv, d))
        got = qkv.to(device)
        dev_caches = caches.to(device)
        tk.rope_and_store(got, positions.to(device), rotary.cos.to(device), rotary.sin.to(device), dev_caches[0],
                          dev_caches[1], slots.to(device), hq, hkv)
        got, dev_caches = got.cpu(), dev_caches.cpu()
        close(got[:, : hq * d], rq.reshape(t, -1), dtype, "rope q")
        close(got[:, hq * d : (hq + hkv) * d], rk.reshape(t, -1), dtype, "rope k")
        assert torch.equal(got[:, (hq + hkv) * d :], v), "v must be left as it is"
        written = ~torch.isnan(ref_caches)
        assert torch.equal(~torch.isnan(dev_caches), written), "exactly the slots of the batch must be written"
        close(dev_caches[written], ref_caches[written], dtype, "cache")


def _interpreter_compat() -> None:
    """Triton 3.6's interpreter takes int() of one-element arrays for loop bounds, which NumPy >= 2.3 refuses."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patch


def test_kernels_match_reference_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kernels ok" in proc.stdout


if __name__ == "__main__":  # the subprocess of the test above
    _interpreter_compat()
    check_kernel("cpu", [torch.float32, torch.float16])
    check_elementwise("cpu", [torch.float32, torch.float16])
    print("kernels ok")
