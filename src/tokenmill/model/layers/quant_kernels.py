"""CPU kernel for int8 weight-only linear layers at decode batch sizes (C++, compiled on first use).

PyTorch's `_weight_int8pack_mm` converts every weight to float on the way and, on the 2-core test machine, runs
no faster than the bf16 weights it replaces at one row (and 4x slower at 16). This kernel streams the int8 rows,
widens 32 at a time to bf16 (exact: |q| <= 127) and multiplies with AVX512-BF16 dot products against up to four
activation rows per pass, fp32 accumulation, the per-channel scale applied once per output.
"""
from __future__ import annotations

from .cpu_kernels import build_cpu_extension

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

static inline __m512bh widen_int8x32(const int8_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);  // elements 0..15 from lo, 16..31 from hi
}

static inline float bf16_to_f(at::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16; float f; std::memcpy(&f, &u, 4); return f;
}

// rows [m0, m0 + M) of y = x @ (q * s)^T (+ b)
template <int M>
static void int8_rows(const at::BFloat16* xp, int64_t xs, const int8_t* qp, const float* sp, const float* bp,
                      at::BFloat16* op, int64_t os, int64_t N, int64_t K) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    const int64_t NC = K / 32;
    std::vector<__m512bh> xv(M * NC);
    for (int m = 0; m < M; ++m)
      for (int64_t c = 0; c < NC; ++c) std::memcpy(&xv[m * NC + c], xp + m * xs + c * 32, 64);
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = qp + n * K;
      _mm_prefetch(reinterpret_cast<const char*>(row) + 2 * K, _MM_HINT_T0);
      __m512 a0[M], a1[M];
      for (int m = 0; m < M; ++m) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
      int64_t c = 0;
      for (; c + 2 <= NC; c += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(row + c * 32) + 512, _MM_HINT_T0);
        const __m512bh w0 = widen_int8x32(row + c * 32);
        const __m512bh w1 = widen_int8x32(row + c * 32 + 32);
        for (int m = 0; m < M; ++m) {
          a0[m] = _mm512_dpbf16_ps(a0[m], xv[m * NC + c], w0);
          a1[m] = _mm512_dpbf16_ps(a1[m], xv[m * NC + c + 1], w1);
        }
      }
      if (c < NC) {
        const __m512bh w0 = widen_int8x32(row + c * 32);
        for (int m = 0; m < M; ++m) a0[m] = _mm512_dpbf16_ps(a0[m], xv[m * NC + c], w0);
      }
      const float s = sp[n], b = bp ? bp[n] : 0.f;
      for (int m = 0; m < M; ++m) {
        const float v = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m])) * s + b;
        uint32_t u; std::memcpy(&u, &v, 4); u += 0x7FFFu + ((u >> 16) & 1u);
        op[m * os + n].x = static_cast<uint16_t>(u >> 16);
      }
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_linear: x [M, K], q [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.stride(1) == 1 && q.scalar_type() == at::kChar &&
              q.is_contiguous() && x.size(1) % 32 == 0, "int8_linear: bf16 x, contiguous int8 q, K % 32 == 0");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == q.size(0),
              "int8_linear: float32 scales [N]");
  at::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) { b = bias->to(at::kFloat).contiguous(); bp = b.data_ptr<float>(); }
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto out = at::empty({M, N}, x.options());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t xs = x.stride(0);
    const at::BFloat16* xm = xp + m0 * xs;
    at::BFloat16* om = op + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: int8_rows<1>(xm, xs, qp, sp, bp, om, N, N, K); break;
      case 2: int8_rows<2>(xm, xs, qp, sp, bp, om, N, N, K); break;
      case 3: int8_rows<3>(xm, xs, qp, sp, bp, om, N, N, K); break;
      default: int8_rows<4>(xm, xs, qp, sp, bp, om, N, N, K); break;
    }
  }
  return out;
}

TORCH_LIBRARY(tokenmill_quant, m) {
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.impl("int8_linear", c10::DispatchKey::CPU, TORCH_FN(int8_linear));
}
#endif
"""


def quant_ops():
    """torch.ops.tokenmill_quant, or None when it cannot be built here (no compiler, no AVX512-BF16)."""
    return build_cpu_extension("tokenmill_quant_kernels", _SOURCE, "tokenmill_quant", "int8_linear")
