"""The fused CPU kernels against the PyTorch reference paths they replace (and the packed bf16 linear)."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from tokenmill.model.layers import cpu_kernels
from tokenmill.model.layers.activation import silu_and_mul
from tokenmill.model.layers.linear import (
    AMX_ROWS,
    WIDE_COLUMNS,
    Linear,
    amx_linear_available,
    onednn_bf16_available,
)
from tokenmill.model.layers.norm import RMSNorm
from tokenmill.model.layers.rotary import RotaryEmbedding, apply_rotary

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    ops = cpu_kernels.cpu_ops()
    assert ops is not None, "a compiler is present, so the CPU kernels must build (see the warning in the log)"
    return ops


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_fused_add(ops, dtype):
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(7, 96, dtype=dtype) * 3
    res = torch.randn(7, 96, dtype=dtype)
    want = norm._norm(x)
    torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-5), want, **_tol(dtype))
    want_res = res + x
    want_out = norm._norm(want_res)
    res_k = res.clone()
    out = ops.add_rms_norm(res_k, x, norm.weight, 1e-5)
    torch.testing.assert_close(res_k, want_res, atol=0, rtol=0)  # the add rounds exactly like torch's
    torch.testing.assert_close(out, want_out, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(ops, dtype):
    torch.manual_seed(1)
    x = torch.randn(5, 2 * 40, dtype=dtype) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(x), F.silu(gate) * up, **_tol(dtype))
    assert silu_and_mul(x).shape == (5, 40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_store_matches_rotate_then_index_copy(ops, dtype):
    torch.manual_seed(2)
    hq, hkv, d, t, blocks, bs = 6, 2, 16, 9, 8, 4
    rope = RotaryEmbedding(d, 128, 10000.0, None)
    positions = torch.tensor([0, 5, 6, 7, 100, 3, 4, 2, 127])
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dtype)
    slots = torch.randperm(blocks * bs)[:t]
    ref_q, ref_k, ref_v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    ref_q, ref_k = apply_rotary(ref_q.reshape(t, hq, d), ref_k.reshape(t, hkv, d), rope.lookup(positions, dtype))
    kc = torch.zeros(blocks, bs, hkv, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    got = qkv.clone()
    ops.rotary_store(got, positions, rope.cos, rope.sin, kc, vc, slots, hq, hkv, d)
    q, k, v = got.split([hq * d, hkv * d, hkv * d], dim=-1)
    torch.testing.assert_close(q.reshape(t, hq, d), ref_q, **_tol(dtype))
    torch.testing.assert_close(k.reshape(t, hkv, d), ref_k, **_tol(dtype))
    torch.testing.assert_close(kc.view(-1, hkv, d)[slots], ref_k, **_tol(dtype))
    torch.testing.assert_close(vc.view(-1, hkv, d)[slots], ref_v.reshape(t, hkv, d), atol=0, rtol=0)
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots] = False
    assert kc.view(-1, hkv, d)[untouched].abs().sum() == 0


@pytest.mark.skipif(not onednn_bf16_available(), reason="no native bf16 in oneDNN on this CPU")
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_packed_bf16_linear_equals_f_linear(rows):
    torch.manual_seed(3)
    lin = Linear(96, 160, bias=True).to(torch.bfloat16)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    assert lin.pack_for_cpu()
    if lin.small_m is not None and lin.tiled_weight is None:  # small_m_linear reads the dense weight
        assert lin.weight.numel() == w.numel()
    else:
        assert lin.weight.numel() == 0  # the dense copy is released
    torch.testing.assert_close(lin(x), F.linear(x, w, b), atol=1e-2, rtol=1e-2)
    logits = lin(x, float_out=True)  # what the model's head returns: float32, which rounds to the bf16 output
    assert logits.dtype == torch.float32 and torch.equal(logits.bfloat16(), lin(x))


def test_vocabulary_sized_head_keeps_no_onednn_copy_with_amx():
    """With AMX a head wider than WIDE_COLUMNS takes every row count in amx_linear and holds only its tile copy."""
    if not amx_linear_available():
        pytest.skip("no AMX on this CPU")
    torch.manual_seed(4)
    head = Linear(64, WIDE_COLUMNS + 16, bias=False).to(torch.bfloat16)
    w = head.weight.detach().clone()
    assert head.pack_for_cpu()
    assert head.packed is None and head.tiled_weight is not None and head.weight.numel() == 0
    x = torch.randn(AMX_ROWS + 44, 64, dtype=torch.bfloat16)  # more rows than the layer linears take
    logits = head(x, float_out=True)
    assert logits.dtype == torch.float32
    # unrounded float32 accumulators: far closer to a float32 product than bf16's 8 bits
    exact = F.linear(x.float(), w.float())
    assert (logits - exact).abs().max() < 1e-3 < (F.linear(x, w).float() - exact).abs().max()
    assert torch.equal(logits[-3:], head(x[-3:], float_out=True))  # batch-invariant at any row count


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 11, 13, 16])  # 9-16: the four-weight-row kernel
def test_small_m_linear_matches_f_linear(ops, rows):
    if not hasattr(ops, "small_m_linear"):
        pytest.skip("no AVX512-BF16 on this CPU")
    torch.manual_seed(5)
    x = torch.randn(rows, 160, dtype=torch.bfloat16)  # K = 5 x 32
    w = torch.randn(77, 160, dtype=torch.bfloat16)  # N = 4 blocks of 16 + a partial block of 13
    b = torch.randn(77, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.small_m_linear(x, w, b), F.linear(x, w, b), atol=0.1, rtol=1e-2)
    torch.testing.assert_close(ops.small_m_linear(x, w, None), F.linear(x, w), atol=0.1, rtol=1e-2)
    # batch-invariant: each row is bit-identical to the same row multiplied alone (speculative verification relies
    # on it to reproduce plain decoding)
    alone = torch.cat([ops.small_m_linear(x[i : i + 1], w, b) for i in range(rows)])
    assert torch.equal(ops.small_m_linear(x, w, b), alone)


def test_argmax_rows_matches_torch_max_indices(ops):
    if not hasattr(ops, "argmax_rows"):
        pytest.skip("no AVX-512 on this CPU")
    torch.manual_seed(8)
    for shape in [(128, 49152), (1, 49152), (7, 37), (3, 16), (2, 1), (0, 5)]:
        x = torch.randn(*shape)
        assert torch.equal(ops.argmax_rows(x), x.max(dim=-1).indices), shape
    x = torch.zeros(6, 100)
    x[1, 50] = x[1, 70] = 1.0  # ties: the first
    x[2, 33] = x[2, 40] = float("nan")  # NaN wins, the first one, as in torch.max
    x[3] = float("-inf")
    x[4, 99] = float("nan")  # in the scalar tail
    x[5, 3] = float("inf")
    assert ops.argmax_rows(x).tolist() == x.max(dim=-1).indices.tolist() == [0, 50, 33, 0, 99, 3]
    wide = torch.randn(4, 200)
    assert torch.equal(ops.argmax_rows(wide[:, :150]), wide[:, :150].max(dim=-1).indices)  # strided rows
    with pytest.raises(RuntimeError, match="float32"):
        ops.argmax_rows(torch.zeros(2, 8, dtype=torch.bfloat16))
    # the sampler's greedy path goes through it
    from tokenmill.engine.sampler import _argmax
    assert torch.equal(_argmax(wide), wide.max(dim=-1).indices)


@pytest.mark.parametrize("n,k", [(160, 96), (48, 1536), (3072, 576)])
def test_amx_linear_matches_f_linear_and_is_batch_invariant(ops, n, k):
    if not hasattr(ops, "amx_linear") or not ops.amx_available():
        pytest.skip("no AMX-BF16 on this CPU")
    torch.manual_seed(6)
    w = torch.randn(n, k, dtype=torch.bfloat16) * 0.1
    b = torch.randn(n, dtype=torch.bfloat16)
    tiled = ops.amx_pack(w)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    x = torch.randn(AMX_ROWS, k, dtype=torch.bfloat16)
    alone = torch.cat([ops.amx_linear(x[i : i + 1], tiled, b) for i in range(AMX_ROWS)])
    for rows in (1, 5, 16, 17, 40, 64, 129, AMX_ROWS):  # one and several 16-row chunks, partial chunks
        got = ops.amx_linear(x[:rows], tiled, b)
        torch.testing.assert_close(got, F.linear(x[:rows].float(), w.float(), b.float()).bfloat16(),
                                   atol=0.05, rtol=1e-2)
        assert torch.equal(got, alone[:rows])  # each row bit-identical to the row multiplied alone
        # oneDNN's AMX kernels in the same threads still compute right after ours released the tiles
        torch.testing.assert_close(torch.ops.mkldnn._linear_pointwise(x[:rows], packed, b, "none", [], ""),
                                   F.linear(x[:rows], w, b), atol=0.05, rtol=1e-2)
    torch.testing.assert_close(ops.amx_linear(x[:3], tiled, None), F.linear(x[:3], w), atol=0.05, rtol=1e-2)
    # float output: the float32 accumulators, which round to the bf16 result
    assert torch.equal(ops.amx_linear(x[:40], tiled, b, True).bfloat16(), alone[:40])
    view = torch.cat([x[:8], x[:8]], dim=1)[:, :k]  # rows 2k apart, like a slice of a fused output
    assert torch.equal(ops.amx_linear(view, tiled, b), alone[:8])
    with pytest.raises(RuntimeError, match="N % 16 == 0"):
        ops.amx_pack(torch.zeros(40, 64, dtype=torch.bfloat16))


def test_weights_on_huge_pages_keep_values_and_ties():
    from tokenmill.model.layers.hugepages import move_weights_to_huge_pages

    torch.manual_seed(0)
    emb = torch.nn.Embedding(1000, 64).to(torch.bfloat16)
    head = Linear(64, 1000, bias=False).to(torch.bfloat16)
    head.weight = emb.weight  # tied
    other = Linear(64, 2048).to(torch.bfloat16)
    model = torch.nn.ModuleList([emb, head, other])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = move_weights_to_huge_pages(model)
    if not moved:
        pytest.skip("not Linux")
    assert moved >= (1000 * 64 + 2048 * 64) * 2
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert head.weight is emb.weight
    # both large weights live in one arena; the small bias stays where it was
    assert emb.weight.untyped_storage().data_ptr() == other.weight.untyped_storage().data_ptr()
    assert other.bias.untyped_storage().data_ptr() != other.weight.untyped_storage().data_ptr()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(other(x), F.linear(x, before["2.weight"], before["2.bias"]))


def test_fp32_linear_is_not_packed():
    lin = Linear(8, 8)
    assert not lin.pack_for_cpu()
    assert lin.packed is None and lin.weight.numel() == 64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
def test_paged_decode_matches_sdpa_reference(ops, dtype, window):
    """Decode attention read from scattered blocks equals SDPA over each sequence's contiguous keys (GQA 9:3,
    head_dim 64: the bf16 path takes the AVX512-BF16 kernel where the CPU has it)."""
    torch.manual_seed(4)
    hq, hkv, d, bs, nblocks = 9, 3, 64, 4, 40
    lens = torch.tensor([1, 7, 16, 33, 50])
    kc = torch.randn(nblocks, bs, hkv, d, dtype=dtype)
    vc = torch.randn(nblocks, bs, hkv, d, dtype=dtype)
    perm = torch.randperm(nblocks)
    max_blocks = int((lens.max() + bs - 1) // bs)
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int64)
    used = 0
    for i, n in enumerate(lens.tolist()):
        nb = (n + bs - 1) // bs
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    q = torch.randn(len(lens), hq, d, dtype=dtype)
    got = ops.paged_decode(q, kc, vc, tables, lens, -1 if window is None else window, d**-0.5)
    for i, n in enumerate(lens.tolist()):
        k = kc[tables[i]].reshape(-1, hkv, d)[:n].float()
        v = vc[tables[i]].reshape(-1, hkv, d)[:n].float()
        lo = 0 if window is None else max(0, n - window)
        k, v = k[lo:].repeat_interleave(hq // hkv, 1), v[lo:].repeat_interleave(hq // hkv, 1)
        want = F.scaled_dot_product_attention(q[i].float()[:, None], k.transpose(0, 1), v.transpose(0, 1))[:, 0]
        torch.testing.assert_close(got[i].float(), want, **_tol(dtype))


def _attention_by_position(q, k, v, q_pos, k_pos, window, sinks):
    """Float32 reference: a query at position p sees keys at positions <= p (within the window, or among the first
    `sinks`); the KV heads are shared by groups of query heads."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    mask = kp <= qp
    if window is not None:
        mask &= (kp > qp - window) | (kp < sinks)
    group = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.float().transpose(0, 1), kf.transpose(0, 1), vf.transpose(0, 1),
                                          attn_mask=mask).transpose(0, 1)


@pytest.mark.parametrize("n,hq,hkv,d,window,sinks", [
    (1, 9, 3, 64, None, 0),     # one token
    (87, 9, 3, 64, None, 0),    # SmolLM2's shape, a ShareGPT-sized prompt
    (300, 4, 1, 32, 40, 0),     # MQA, sliding window, keys not a multiple of 32
    (70, 4, 4, 128, 20, 3),     # MHA, window plus attention sinks, wide heads
    (33, 8, 2, 256, None, 0),
])
def test_prefill_attention_matches_reference(ops, n, hq, hkv, d, window, sinks):
    """The AMX prompt attention equals causal (windowed) softmax attention in float32, reading q, k and v as the
    strided views of a fused QKV output that the model passes."""
    if not hasattr(ops, "prefill_attention") or not ops.amx_available():
        pytest.skip("no AMX-BF16 on this CPU")
    torch.manual_seed(8)
    qkv = torch.randn(n, (hq + 2 * hkv) * d).bfloat16()
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(n, hq, d), k.view(n, hkv, d), v.view(n, hkv, d)
    got = ops.prefill_attention(q, k, v, -1 if window is None else window, sinks, d**-0.5)
    want = _attention_by_position(q, k, v, torch.arange(n), torch.arange(n), window, sinks)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("ctx,n,d,window,sinks", [
    (200, 50, 64, None, 0),    # a chunk after a cached prefix (or after earlier chunks)
    (300, 70, 64, 40, 3),      # windowed: the sinks, then the window's keys from position lo
    (300, 70, 32, 40, 0),
    (97, 1, 128, None, 0),     # one new token
])
def test_prefill_attention_after_cached_keys(ops, ctx, n, d, window, sinks):
    """A prompt chunk at positions [ctx - n, ctx) over keys gathered as the engine gathers them (the first `ns` at
    positions 0.., the rest from `lo` on) equals softmax attention over positions in float32."""
    if not hasattr(ops, "prefill_attention") or not ops.amx_available():
        pytest.skip("no AMX-BF16 on this CPU")
    torch.manual_seed(9)
    hq, hkv = 8, 2
    first = ctx - n
    lo = 0 if window is None else max(0, first - window + 1)
    ns = min(sinks, lo)
    key_pos = torch.cat([torch.arange(ns), torch.arange(lo, ctx)])
    k = torch.randn(len(key_pos), hkv, d).bfloat16()
    v = torch.randn(len(key_pos), hkv, d).bfloat16()
    q = torch.randn(n, hq, d).bfloat16()
    got = ops.prefill_attention(q, k, v, -1 if window is None else window, sinks, d**-0.5, first, ns, lo)
    want = _attention_by_position(q, k, v, torch.arange(first, ctx), key_pos, window, sinks)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    with pytest.raises(RuntimeError, match="own key"):  # a query whose own position is not among the keys
        ops.prefill_attention(q, k[:-1], v[:-1], -1, 0, d**-0.5, first, ns, lo)
