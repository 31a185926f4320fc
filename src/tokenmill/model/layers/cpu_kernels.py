"""CPU kernels (C++, compiled on first use with torch's cpp_extension): paged-decode attention and the fused
element-wise steps of a decoder layer.

* paged_decode: pure-PyTorch decode attention on a paged cache has to gather every sequence's blocks into a padded
  tensor first; on a CPU that copy costs more than the attention itself. This kernel reads K/V straight from the
  blocks, fp32 accumulation, OpenMP over the batch. Optional sliding window plus attention sinks (the first
  `sinks` tokens stay visible). paged_decode_int8 reads an int8 cache with one float16 scale per token per KV head
  and dequantises rows as it reads them.
* int8_linear (AVX512-BF16): weight-only int8 linear (per-channel scales): a streaming kernel for 1-16 rows, and on
  CPUs with AMX, AMX tiles over weight rows widened once per call for more rows.
* amx_linear (CPUs with AMX-BF16): x @ W.T for 1-256 rows from weights re-laid out into AMX tiles (amx_pack); on a
  2-core Xeon (~31 GB/s read bandwidth) it streams the weights at ~22 GB/s for 1-16 rows, where oneDNN's bf16 GEMM
  reaches 13-17 GB/s.
* rms_norm / add_rms_norm (residual add fused in, in place), silu_and_mul, rotary_store (RoPE on q and k in place
  inside the fused QKV output, plus the KV-cache write): at small batch a decoder step is dominated by the ~40
  small ATen ops per layer these replace; each one rounds to the model dtype where Hugging Face's eager code does.
  rotary_store_int8 quantises k and v as it stores them (int8 KV cache).

If no compiler is available (or TOKENMILL_CPU_KERNELS=0) every caller falls back to its PyTorch path.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include <vector>
#include <algorithm>
#include <cstring>
#include <array>

// bf16 <-> fp32 on raw bits (vectorisable), rounding to nearest even
template <typename T> static inline float to_f(T v) { return static_cast<float>(v); }
template <> inline float to_f<at::BFloat16>(at::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16; float f; __builtin_memcpy(&f, &u, 4); return f;
}
template <typename T> static inline T from_f(float f) { return static_cast<T>(f); }
template <> inline at::BFloat16 from_f<at::BFloat16>(float f) {
  // round to nearest even on the raw bits (vectorisable; inputs here are finite)
  uint32_t u; __builtin_memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u);
  at::BFloat16 r; r.x = static_cast<uint16_t>(u >> 16); return r;
}
template <typename T> static inline float round_t(float f) { return to_f<T>(from_f<T>(f)); }

template <typename T>
static inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

template <>
inline void load_row<at::BFloat16>(const at::BFloat16* src, float* dst, int64_t n) {
  // bf16 -> fp32 is a 16-bit shift; written on raw bits so the compiler vectorises it.
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
  for (int64_t d = 0; d < n; ++d) d32[d] = static_cast<uint32_t>(s[d]) << 16;
}

typedef float v16f __attribute__((vector_size(64)));

static inline float dot(const float* a, const float* b, int64_t n) {
  if ((n & 15) == 0) {
    v16f acc = {0};
    for (int64_t d = 0; d < n; d += 16) {
      v16f x, y;
      __builtin_memcpy(&x, a + d, 64);
      __builtin_memcpy(&y, b + d, 64);
      acc += x * y;
    }
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += acc[i];
    return s;
  }
  float s = 0.f;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

static inline void axpy(float p, const float* x, float* y, int64_t n) {
  if ((n & 15) == 0) {
    for (int64_t d = 0; d < n; d += 16) {
      v16f xv, yv;
      __builtin_memcpy(&xv, x + d, 64);
      __builtin_memcpy(&yv, y + d, 64);
      yv += p * xv;
      __builtin_memcpy(y + d, &yv, 64);
    }
    return;
  }
  for (int64_t d = 0; d < n; ++d) y[d] += p * x[d];
}

// Cache rows (all KV heads of one token) read as fp32: dense rows of the model dtype, or int8 rows with one
// float16 scale per KV head (dequantised on load).
template <typename T>
struct DenseRows {
  const T* p; int64_t RD;
  inline void load(int64_t slot, float* dst) const { load_row<T>(p + slot * RD, dst, RD); }
};

struct Int8Rows {
  const int8_t* p; const at::Half* s; int64_t Hkv, D;
  inline void load(int64_t slot, float* dst) const {
    const int8_t* r = p + slot * Hkv * D;
    const at::Half* sc = s + slot * Hkv;
    for (int64_t h = 0; h < Hkv; ++h) {
      const float f = static_cast<float>(sc[h]);
      for (int64_t d = 0; d < D; ++d) dst[h * D + d] = static_cast<float>(r[h * D + d]) * f;
    }
  }
};

// Attended tokens of a sequence of length len: [0, ns) (attention sinks) and [start, len) (the window).
static inline void attended_range(int64_t len, int64_t window, int64_t sinks, int64_t& ns, int64_t& start) {
  start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
  ns = std::min<int64_t>(std::max<int64_t>(sinks, 0), start);
}

// One task per sequence: each cache row (all KV heads of one token) is read once, contiguously.
template <typename T, typename Rows>
static void decode_impl(const at::Tensor& q, const Rows& krows, const Rows& vrows, int64_t bs, int64_t Hkv,
                        const at::Tensor& bt, const at::Tensor& lens, at::Tensor& out, int64_t window,
                        int64_t sinks, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t G = Hq / Hkv, maxb = bt.size(1), RD = Hkv * D;
  const T* qp = q.data_ptr<T>();
  const int64_t* btp = bt.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);
#pragma omp parallel
  {
    std::vector<float> qf(Hq * D), acc(Hq * D), row(RD), scores, mx(Hq), sum(Hq);
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = lp[b];
      int64_t ns, start;
      attended_range(len, window, sinks, ns, start);
      const int64_t n = ns + len - start;
      load_row<T>(qp + b * Hq * D, qf.data(), Hq * D);
      for (int64_t j = 0; j < Hq * D; ++j) qf[j] *= sc;
      scores.resize(Hq * n);
      std::fill(mx.begin(), mx.end(), -INFINITY);
      // token t's score goes to column j: sinks [0, ns) first, then the window [start, len)
      auto score = [&](int64_t t, int64_t j) {
        krows.load(btp[b * maxb + t / bs] * bs + t % bs, row.data());
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const float s = dot(qf.data() + hq * D, row.data() + (hq / G) * D, D);
          scores[hq * n + j] = s;
          mx[hq] = std::max(mx[hq], s);
        }
      };
      for (int64_t t = 0; t < ns; ++t) score(t, t);
      for (int64_t t = start; t < len; ++t) score(t, ns + t - start);
      for (int64_t hq = 0; hq < Hq; ++hq) {
        float* sg = scores.data() + hq * n;
        float total = 0.f;
        for (int64_t j = 0; j < n; ++j) { sg[j] = std::exp(sg[j] - mx[hq]); total += sg[j]; }
        sum[hq] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      auto accumulate = [&](int64_t t, int64_t j) {
        vrows.load(btp[b * maxb + t / bs] * bs + t % bs, row.data());
        for (int64_t hq = 0; hq < Hq; ++hq) axpy(scores[hq * n + j], row.data() + (hq / G) * D, acc.data() + hq * D, D);
      };
      for (int64_t t = 0; t < ns; ++t) accumulate(t, t);
      for (int64_t t = start; t < len; ++t) accumulate(t, ns + t - start);
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const float inv = 1.f / sum[hq];
        T* o = op + (b * Hq + hq) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[hq * D + d] * inv);
      }
    }
  }
}


#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define TOKENMILL_AVX512_BF16 1
// exp(x) = 2^n * 2^f, |f| <= 0.5, degree-6 Taylor polynomial for 2^f (relative error ~1e-7).
static inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));  // finite (-ffast-math)
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 load_bf16x16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// r[i] = sum of v[i]'s 16 lanes, for 16 vectors at once (a shuffle tree instead of 16 horizontal reductions).
static inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 4], 0x88), _mm512_shuffle_f32x4(t[i], t[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(u[i], u[i + 2]), _mm512_unpackhi_ps(u[i], u[i + 2]));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x44), _mm512_shuffle_ps(w[0], w[1], 0xEE));
  // r holds v0 v2 v1 v3 | v8 v10 v9 v11 | v4 v6 v5 v7 | v12 v14 v13 v15
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), r);
}

// Prefetches into L2 the whole K and V rows (every KV head) of token t.
static inline void prefetch_token(const at::BFloat16* kp, const at::BFloat16* vp, int64_t slot, int64_t RD) {
  const char* k = reinterpret_cast<const char*>(kp + slot * RD);
  const char* v = reinterpret_cast<const char*>(vp + slot * RD);
  for (int64_t off = 0; off < RD * 2; off += 64) { _mm_prefetch(k + off, _MM_HINT_T1); _mm_prefetch(v + off, _MM_HINT_T1); }
}

constexpr int64_t kPrefetchTokens = 32;  // how far ahead the first pass over K fetches K and V rows

// scores[h * npad + t - start] = scale * q_h.k_t for every query head over tokens [start, len), in one pass over
// the K rows (a token's row holds all KV heads, so the pass reads each block front to back), 16 tokens per
// reduction; per-token partial sums wait in buf [Hq x 16]. It also prefetches the K and V rows kPrefetchTokens
// ahead: the memory system works while this pass computes, and the V rows are in L2 for P.V.
template <int NC>
static inline void qk_heads(const __m512bh* qv, const at::BFloat16* kp, const at::BFloat16* vp, const int64_t* table,
                            int64_t shift, int64_t mask, int64_t bs, int64_t RD, int64_t Hq, int64_t G,
                            int64_t start, int64_t len, float sc, float* scores, int64_t npad, __m512* buf) {
  constexpr int D = NC * 32;
  const __m512 scale = _mm512_set1_ps(sc);
  for (int64_t t0 = start; t0 < len; t0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, len - t0);
    for (int64_t j = 0; j < cnt; ++j) {
      const int64_t t = t0 + j;
      if (t + kPrefetchTokens < len) {
        const int64_t ta = t + kPrefetchTokens;
        prefetch_token(kp, vp, table[ta >> shift] * bs + (ta & mask), RD);
      }
      const at::BFloat16* row = kp + (table[t >> shift] * bs + (t & mask)) * RD;
      for (int64_t h = 0; h < Hq; ++h) {
        const at::BFloat16* kr = row + (h / G) * D;
        __m512 a = _mm512_setzero_ps();
        for (int c = 0; c < NC; ++c) {
          __m512bh kv;
          std::memcpy(&kv, kr + c * 32, 64);
          a = _mm512_dpbf16_ps(a, qv[h * NC + c], kv);
        }
        buf[h * 16 + j] = a;
      }
    }
    for (int64_t h = 0; h < Hq; ++h) {
      for (int64_t j = cnt; j < 16; ++j) buf[h * 16 + j] = _mm512_setzero_ps();
      _mm512_storeu_ps(scores + h * npad + (t0 - start), _mm512_mul_ps(reduce16(buf + h * 16), scale));
    }
  }
}

template <int NF, int HB>
static inline __attribute__((always_inline)) void pv_row(__m512 (&acc)[HB][NF], const float* const* probs, int nh,
                                                         const at::BFloat16* row, int64_t j) {
  __m512 vf[NF];
  for (int c = 0; c < NF; ++c) vf[c] = load_bf16x16(row + c * 16);
  for (int h = 0; h < HB; ++h) {
    if (h >= nh) break;
    const __m512 p = _mm512_set1_ps(probs[h][j]);
    for (int c = 0; c < NF; ++c) acc[h][c] = _mm512_fmadd_ps(p, vf[c], acc[h][c]);
  }
}

// acc[h] += sum_t p[h][t] * v_t for up to HB heads sharing one KV head, accumulators in registers; tokens [0, ns)
// (sinks) then [start, len), probabilities in that order.
template <int NF, int HB>
static inline void pv_heads(const float* const* probs, int nh, const at::BFloat16* vp, const int64_t* table,
                            int64_t shift, int64_t mask, int64_t bs, int64_t RD, int64_t voff, int64_t ns,
                            int64_t start, int64_t len, float* const* out) {
  __m512 acc[HB][NF];
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < NF; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < ns; ++t)
    pv_row<NF, HB>(acc, probs, nh, vp + (table[t >> shift] * bs + (t & mask)) * RD + voff, t);
  for (int64_t t = start; t < len; ++t)
    pv_row<NF, HB>(acc, probs, nh, vp + (table[t >> shift] * bs + (t & mask)) * RD + voff, ns + t - start);
  for (int h = 0; h < nh; ++h)
    for (int c = 0; c < NF; ++c) _mm512_storeu_ps(out[h] + c * 16, acc[h][c]);
}

// In-place softmax of n scores padded with room up to npad (a multiple of 16); the padding ends up 0.
static inline void softmax_padded(float* sg, int64_t n, int64_t npad) {
  for (int64_t j = n; j < npad; ++j) sg[j] = -INFINITY;
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < npad; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sg + j));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < npad; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + j), mx));  // padding: exp(-inf) -> 0
    _mm512_storeu_ps(sg + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < npad; j += 16) _mm512_storeu_ps(sg + j, _mm512_mul_ps(_mm512_loadu_ps(sg + j), inv));
}

// Prefetches into L2 every 64-byte line of the blocks b0..b1 of a sequence's table (the attention sinks' blocks).
// Blocks sit anywhere in the cache, so the hardware prefetchers stall at every block boundary. The window itself is
// fetched a fixed distance ahead instead (qk_heads): issuing a whole sequence up front gave 4.1 ms where the
// distance, in one pass over the rows for all heads, gives ~2.9 ms on a 2-core Xeon (16 sequences x 30 layers, 150
// tokens; 64 sequences: 20.7 -> 14.1 ms; 128 x 200 tokens: 58.7 -> 40.3 ms).
static inline void prefetch_blocks(const at::BFloat16* base, const int64_t* table, int64_t b0, int64_t b1,
                                   int64_t block_elems) {
  for (int64_t b = b0; b <= b1; ++b) {
    const char* p = reinterpret_cast<const char*>(base + table[b] * block_elems);
    for (int64_t off = 0; off < block_elems * 2; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
  }
}

template <int NC>
static void decode_seq_bf16(const __m512bh* qv, const at::BFloat16* kp, const at::BFloat16* vp, const int64_t* table,
                            int64_t shift, int64_t mask, int64_t bs, int64_t Hq, int64_t Hkv, int64_t ns,
                            int64_t start, int64_t len, float sc, std::vector<float>& scores,
                            std::vector<float>& acc, std::vector<__m512>& qkbuf, at::BFloat16* o) {
  constexpr int D = NC * 32, NF = NC * 2, HB = 24 / NF > 0 ? 24 / NF : 1;
  const int64_t G = Hq / Hkv, RD = Hkv * D, n = ns + len - start;
  // qk_heads stores whole groups of 16: with sinks the window's scores start at ns, so leave one more group of room
  const int64_t npad = ((n + 15) & ~int64_t(15)) + (ns ? 16 : 0);
  scores.resize(Hq * npad);
  const int64_t block_elems = bs * RD;
  if (ns) {
    prefetch_blocks(kp, table, 0, (ns - 1) >> shift, block_elems);
    prefetch_blocks(vp, table, 0, (ns - 1) >> shift, block_elems);
  }
  for (int64_t t = start; t < std::min(len, start + kPrefetchTokens); ++t)
    prefetch_token(kp, vp, table[t >> shift] * bs + (t & mask), RD);
  qkbuf.resize(Hq * 16);
  if (ns) qk_heads<NC>(qv, kp, vp, table, shift, mask, bs, RD, Hq, G, 0, ns, sc, scores.data(), npad, qkbuf.data());
  qk_heads<NC>(qv, kp, vp, table, shift, mask, bs, RD, Hq, G, start, len, sc, scores.data() + ns, npad, qkbuf.data());
  for (int64_t h = 0; h < Hq; ++h) softmax_padded(scores.data() + h * npad, n, npad);
  acc.resize(Hq * D);
  for (int64_t g = 0; g < Hkv; ++g) {
    for (int64_t h0 = g * G; h0 < (g + 1) * G; h0 += HB) {
      const int nh = static_cast<int>(std::min<int64_t>(HB, (g + 1) * G - h0));
      const float* probs[HB];
      float* outs[HB];
      for (int i = 0; i < nh; ++i) { probs[i] = scores.data() + (h0 + i) * npad; outs[i] = acc.data() + (h0 + i) * D; }
      pv_heads<NF, HB>(probs, nh, vp, table, shift, mask, bs, RD, g * D, ns, start, len, outs);
    }
  }
  for (int64_t h = 0; h < Hq; ++h)
    for (int c = 0; c < NF; ++c) {
      const __m256bh r = _mm512_cvtneps_pbh(_mm512_loadu_ps(acc.data() + h * D + c * 16));
      std::memcpy(o + h * D + c * 16, &r, 32);
    }
}

// bf16 decode with AVX512-BF16: q.k as bf16 pair dot products (fp32 accumulation), vectorised softmax, fp32 P.V
// with register accumulators. Needs head_dim in {32, 64, 128, 256}.
static void decode_bf16_avx512(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt,
                               const at::Tensor& lens, at::Tensor& out, int64_t window, int64_t sinks,
                               double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = kc.size(1), Hkv = kc.size(2), maxb = bt.size(1), NC = D / 32;
  const int64_t shift = __builtin_ctzll(bs), mask = bs - 1;  // block size is a power of two (checked)
  const at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  const at::BFloat16* kp = kc.data_ptr<at::BFloat16>();
  const at::BFloat16* vp = vc.data_ptr<at::BFloat16>();
  const int64_t* btp = bt.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const float sc = static_cast<float>(scale);
#pragma omp parallel if (B > 1)
  {
    std::vector<__m512bh> qv(Hq * NC);
    std::vector<float> scores, acc;
    std::vector<__m512> qkbuf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = lp[b];
      int64_t ns, start;
      attended_range(len, window, sinks, ns, start);
      for (int64_t i = 0; i < Hq * NC; ++i) std::memcpy(&qv[i], qp + b * Hq * D + i * 32, 64);
      const int64_t* table = btp + b * maxb;
      at::BFloat16* o = op + b * Hq * D;
      switch (NC) {
        case 1: decode_seq_bf16<1>(qv.data(), kp, vp, table, shift, mask, bs, Hq, Hkv, ns, start, len, sc, scores, acc, qkbuf, o); break;
        case 2: decode_seq_bf16<2>(qv.data(), kp, vp, table, shift, mask, bs, Hq, Hkv, ns, start, len, sc, scores, acc, qkbuf, o); break;
        case 4: decode_seq_bf16<4>(qv.data(), kp, vp, table, shift, mask, bs, Hq, Hkv, ns, start, len, sc, scores, acc, qkbuf, o); break;
        default: decode_seq_bf16<8>(qv.data(), kp, vp, table, shift, mask, bs, Hq, Hkv, ns, start, len, sc, scores, acc, qkbuf, o); break;
      }
    }
  }
}
// ---- int8 KV cache: keys/values int8 [blocks, bs, Hkv, D], float16 scales [blocks, bs, Hkv]; q in fp32 registers.
static inline __m512 load_i8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

struct I8Cache {
  const int8_t* p; const at::Half* s; const int64_t* table; int64_t shift, mask, bs, Hkv;
  inline int64_t slot(int64_t t) const { return table[t >> shift] * bs + (t & mask); }
};

// Prefetches into L2 the int8 K and V rows (every KV head) of cache slot `sl` and their scales.
static inline void prefetch_token_i8(const I8Cache& k, const I8Cache& v, int64_t sl, int64_t RD) {
  for (int64_t off = 0; off < RD; off += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(k.p + sl * RD + off), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(v.p + sl * RD + off), _MM_HINT_T1);
  }
  _mm_prefetch(reinterpret_cast<const char*>(k.s + sl * k.Hkv), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(v.s + sl * v.Hkv), _MM_HINT_T1);
}

// scores[h * npad + t - start] = kscale_t * q_h.k_t for every query head over tokens [start, len) (qf: [Hq x NF]
// vectors, the softmax scale folded in). As qk_heads: one pass over the K rows, each KV head's row widened to fp32
// once for its G query heads, 16 tokens per reduction (partial sums in buf [Hq x 16], key scales in ks
// [Hkv x 16]), and the K and V rows prefetched kPrefetchTokens ahead.
template <int NF>
static inline void qk_heads_i8(const __m512* qf, const I8Cache& k, const I8Cache& v, int64_t Hq, int64_t start,
                               int64_t len, float* scores, int64_t npad, __m512* buf, float* ks) {
  constexpr int D = NF * 16;
  const int64_t Hkv = k.Hkv, G = Hq / Hkv, RD = Hkv * D;
  for (int64_t t0 = start; t0 < len; t0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, len - t0);
    for (int64_t j = 0; j < cnt; ++j) {
      const int64_t t = t0 + j;
      if (t + kPrefetchTokens < len) prefetch_token_i8(k, v, k.slot(t + kPrefetchTokens), RD);
      const int64_t sl = k.slot(t);
      for (int64_t g = 0; g < Hkv; ++g) {
        const int8_t* row = k.p + sl * RD + g * D;
        __m512 kf[NF];
        for (int c = 0; c < NF; ++c) kf[c] = load_i8x16(row + c * 16);
        for (int64_t h = g * G; h < (g + 1) * G; ++h) {
          __m512 a = _mm512_setzero_ps();
          for (int c = 0; c < NF; ++c) a = _mm512_fmadd_ps(qf[h * NF + c], kf[c], a);
          buf[h * 16 + j] = a;
        }
        ks[g * 16 + j] = static_cast<float>(k.s[sl * Hkv + g]);
      }
    }
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t j = cnt; j < 16; ++j) ks[g * 16 + j] = 0.f;
    for (int64_t h = 0; h < Hq; ++h) {
      for (int64_t j = cnt; j < 16; ++j) buf[h * 16 + j] = _mm512_setzero_ps();
      _mm512_storeu_ps(scores + h * npad + (t0 - start),
                       _mm512_mul_ps(reduce16(buf + h * 16), _mm512_loadu_ps(ks + (h / G) * 16)));
    }
  }
}

template <int NF, int HB>
static inline __attribute__((always_inline)) void pv_row_i8(__m512 (&acc)[HB][NF], const float* const* probs, int nh,
                                                            const I8Cache& v, int64_t g, int64_t t, int64_t j) {
  constexpr int D = NF * 16;
  const int64_t sl = v.slot(t);
  const int8_t* row = v.p + (sl * v.Hkv + g) * D;
  const float vs = static_cast<float>(v.s[sl * v.Hkv + g]);
  __m512 vf[NF];
  for (int c = 0; c < NF; ++c) vf[c] = load_i8x16(row + c * 16);
  for (int h = 0; h < HB; ++h) {
    if (h >= nh) break;
    const __m512 p = _mm512_set1_ps(probs[h][j] * vs);
    for (int c = 0; c < NF; ++c) acc[h][c] = _mm512_fmadd_ps(p, vf[c], acc[h][c]);
  }
}

template <typename T, int NF>
static void decode_seq_i8(const float* q, const I8Cache& k, const I8Cache& v, int64_t Hq, int64_t ns, int64_t start,
                          int64_t len, float sc, std::vector<float>& scores, std::vector<__m512>& qkbuf, T* o) {
  constexpr int D = NF * 16, HB = 24 / NF > 0 ? 24 / NF : 1;
  const int64_t Hkv = k.Hkv, G = Hq / Hkv, n = ns + len - start, RD = Hkv * D;
  const int64_t npad = ((n + 15) & ~int64_t(15)) + (ns ? 16 : 0);  // see decode_seq_bf16
  scores.resize(Hq * npad);
  // qkbuf: q in fp32 with the scale [Hq x NF], partial sums [Hq x 16], key scales [Hkv x 16]
  qkbuf.resize(Hq * NF + Hq * 16 + Hkv);
  __m512* qf = qkbuf.data();
  for (int64_t i = 0; i < Hq * NF; ++i) qf[i] = _mm512_mul_ps(_mm512_loadu_ps(q + i * 16), _mm512_set1_ps(sc));
  __m512* buf = qf + Hq * NF;
  float* ks = reinterpret_cast<float*>(buf + Hq * 16);
  for (int64_t t = 0; t < ns; ++t) prefetch_token_i8(k, v, k.slot(t), RD);
  for (int64_t t = start; t < std::min(len, start + kPrefetchTokens); ++t) prefetch_token_i8(k, v, k.slot(t), RD);
  if (ns) qk_heads_i8<NF>(qf, k, v, Hq, 0, ns, scores.data(), npad, buf, ks);
  qk_heads_i8<NF>(qf, k, v, Hq, start, len, scores.data() + ns, npad, buf, ks);
  for (int64_t h = 0; h < Hq; ++h) softmax_padded(scores.data() + h * npad, n, npad);
  for (int64_t g = 0; g < Hkv; ++g) {
    for (int64_t h0 = g * G; h0 < (g + 1) * G; h0 += HB) {
      const int nh = static_cast<int>(std::min<int64_t>(HB, (g + 1) * G - h0));
      const float* probs[HB];
      for (int i = 0; i < nh; ++i) probs[i] = scores.data() + (h0 + i) * npad;
      __m512 acc[HB][NF];
      for (int h = 0; h < HB; ++h)
        for (int c = 0; c < NF; ++c) acc[h][c] = _mm512_setzero_ps();
      for (int64_t t = 0; t < ns; ++t) pv_row_i8<NF, HB>(acc, probs, nh, v, g, t, t);
      for (int64_t t = start; t < len; ++t) {
        if (t + 8 < len) _mm_prefetch(reinterpret_cast<const char*>(v.p + (v.slot(t + 8) * Hkv + g) * D), _MM_HINT_T0);
        pv_row_i8<NF, HB>(acc, probs, nh, v, g, t, ns + t - start);
      }
      for (int i = 0; i < nh; ++i) {
        float buf[D];
        for (int c = 0; c < NF; ++c) _mm512_storeu_ps(buf + c * 16, acc[i][c]);
        T* out = o + (h0 + i) * D;
        for (int d = 0; d < D; ++d) out[d] = from_f<T>(buf[d]);
      }
    }
  }
}

// int8-KV decode with AVX512: int8 rows widened to fp32 in registers, the per-token scale applied to the score
// (keys) or folded into the probability (values). Needs head_dim in {32, 64, 128, 256}, block size a power of two.
template <typename T>
static void decode_i8_avx512(const at::Tensor& q, const I8Cache& kc, const I8Cache& vc, int64_t maxb,
                             const int64_t* btp, const int64_t* lp, at::Tensor& out, int64_t window, int64_t sinks,
                             double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);
#pragma omp parallel
  {
    std::vector<float> qf(Hq * D), scores;
    std::vector<__m512> qkbuf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = lp[b];
      int64_t ns, start;
      attended_range(len, window, sinks, ns, start);
      for (int64_t i = 0; i < Hq * D; ++i) qf[i] = to_f<T>(qp[b * Hq * D + i]);
      I8Cache k = kc, v = vc;
      k.table = v.table = btp + b * maxb;
      T* o = op + b * Hq * D;
      switch (D) {
        case 32: decode_seq_i8<T, 2>(qf.data(), k, v, Hq, ns, start, len, sc, scores, qkbuf, o); break;
        case 64: decode_seq_i8<T, 4>(qf.data(), k, v, Hq, ns, start, len, sc, scores, qkbuf, o); break;
        case 128: decode_seq_i8<T, 8>(qf.data(), k, v, Hq, ns, start, len, sc, scores, qkbuf, o); break;
        default: decode_seq_i8<T, 16>(qf.data(), k, v, Hq, ns, start, len, sc, scores, qkbuf, o); break;
      }
    }
  }
}

// The M x rows as 32-element chunks (xv[m * NC + c]), copied once per thread for the dot products.
static std::vector<__m512bh> x_chunks(const at::BFloat16* xp, int64_t xs, int64_t M, int64_t NC) {
  std::vector<__m512bh> xv(M * NC);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < NC; ++c) std::memcpy(&xv[m * NC + c], xp + m * xs + c * 32, 64);
  return xv;
}

// Outputs b*16 .. b*16+rows of the M rows: acc[m][j] holds output j's 16 partial sums; slots past `rows` are unused.
static void store_block16(__m512 (*acc)[16], int64_t M, int rows, const at::BFloat16* bp, int64_t b,
                          at::BFloat16* op, int64_t N) {
  for (int64_t m = 0; m < M; ++m)
    for (int j = rows; j < 16; ++j) acc[m][j] = _mm512_setzero_ps();
  float bias[16] = {0.f};
  if (bp)
    for (int j = 0; j < rows; ++j) bias[j] = to_f<at::BFloat16>(bp[b * 16 + j]);
  for (int64_t m = 0; m < M; ++m) {
    const __m256bh r = _mm512_cvtneps_pbh(_mm512_add_ps(reduce16(acc[m]), _mm512_loadu_ps(bias)));
    std::memcpy(op + m * N + b * 16, &r, 2 * rows);
  }
}

// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for M <= 8 rows (decode of a few sequences, or one verifying speculated
// tokens; 9-16 rows: gemm_block16_wide below) in bf16, fp32 accumulation; each row is computed the same whatever M
// is (batch-invariant): every output is one dot-product chain over K in order, then a 16-way shuffle-tree reduction
// shared by 16 outputs.
// Blocks of 16 weight rows, each row read once for all M x rows (the weights stream from memory once per call).
// Every 64-byte line is prefetched into L2 8 KiB ahead, so the stream does not wait on the dot products: measured on
// a 2-core Zen 4 for SmolLM2's linears (weights from DRAM) this holds ~30 GB/s, ~9 ms per model pass, flat from 1 to
// 8 rows; without the prefetch 1 row took the same but 5 rows 14 ms and 8 rows 15 ms, and the one-row-at-a-time
// kernel this replaced (two accumulators and a horizontal reduction per output) 9-13 ms.
template <int M>
static void gemv_block16(const at::BFloat16* xp, int64_t xs, const at::BFloat16* wp, const at::BFloat16* bp,
                         at::BFloat16* op, int64_t N, int64_t K) {
  const int64_t NB = (N + 15) / 16, NC = K / 32;
  at::parallel_for(0, NB, 4, [&](int64_t b0, int64_t b1) {
    const std::vector<__m512bh> xv = x_chunks(xp, xs, M, NC);
    const char* end = reinterpret_cast<const char*>(wp + std::min<int64_t>(N, b1 * 16) * K);
    __m512 acc[M][16];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rows = std::min<int64_t>(16, N - b * 16);
      const at::BFloat16* blk = wp + b * 16 * K;
      for (int j = 0; j < rows; ++j) {
        const at::BFloat16* row = blk + j * K;
        __m512 a[M];
        for (int m = 0; m < M; ++m) a[m] = _mm512_setzero_ps();
        for (int64_t c = 0; c < NC; ++c) {
          const char* p = reinterpret_cast<const char*>(row + c * 32) + 8192;
          if (p < end) _mm_prefetch(p, _MM_HINT_T1);
          __m512bh w0;
          std::memcpy(&w0, row + c * 32, 64);
          for (int m = 0; m < M; ++m) a[m] = _mm512_dpbf16_ps(a[m], xv[m * NC + c], w0);
        }
        for (int m = 0; m < M; ++m) acc[m][j] = a[m];
      }
      store_block16(acc, M, static_cast<int>(rows), bp, b, op, N);
    }
  });
}

// 9-16 rows: past 8 rows the dot products, not the weight stream, set the pace, and the kernel above is bound by
// its loads (one x chunk per dot product). Here four weight rows are held in registers and each x chunk loaded
// feeds four dot products, for row groups of up to 6 x rows (24 accumulators); the weight rows are read from memory
// by the first group and from L1 by the others. Each output is the same dpbf16 chain over K in order and the same
// 16-way reduction as above, so the result stays bit-identical to every row multiplied alone.
template <int MR, bool PF>
static void rows4_chain(const __m512bh* xv, int64_t NC,
                                                              const at::BFloat16* const* wrow, const char* end,
                                                              __m512 (*acc)[16], int j0) {
  __m512 a[MR][4];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) a[m][r] = _mm512_setzero_ps();
  const __m512i* w0p = reinterpret_cast<const __m512i*>(wrow[0]);
  const __m512i* w1p = reinterpret_cast<const __m512i*>(wrow[1]);
  const __m512i* w2p = reinterpret_cast<const __m512i*>(wrow[2]);
  const __m512i* w3p = reinterpret_cast<const __m512i*>(wrow[3]);
  for (int64_t c = 0; c < NC; ++c) {
    if (PF) {
      const char* p0 = reinterpret_cast<const char*>(w0p + c) + 8192;
      if (p0 + 3 * 64 * NC < end) {
        _mm_prefetch(p0, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w1p + c) + 8192, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w2p + c) + 8192, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w3p + c) + 8192, _MM_HINT_T1);
      }
    }
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w0p + c);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w1p + c);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w2p + c);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w3p + c);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh xm = xv[m * NC + c];
      a[m][0] = _mm512_dpbf16_ps(a[m][0], xm, w0);
      a[m][1] = _mm512_dpbf16_ps(a[m][1], xm, w1);
      a[m][2] = _mm512_dpbf16_ps(a[m][2], xm, w2);
      a[m][3] = _mm512_dpbf16_ps(a[m][3], xm, w3);
    }
  }
  // All four, whatever nr: a runtime bound would keep `a` in memory. Slots past the block's rows are zeroed later.
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[m][j0 + r] = a[m][r];
}

// rows4_chain<MR, PF> for MR = 1..6; the first row group of a block prefetches the weights, the others find them in L1
using ChainFn = void (*)(const __m512bh*, int64_t, const at::BFloat16* const*, const char*, __m512 (*)[16], int);
static const ChainFn kChainFirst[6] = {rows4_chain<1, true>, rows4_chain<2, true>, rows4_chain<3, true>,
                                       rows4_chain<4, true>, rows4_chain<5, true>, rows4_chain<6, true>};
static const ChainFn kChainRest[6] = {rows4_chain<1, false>, rows4_chain<2, false>, rows4_chain<3, false>,
                                      rows4_chain<4, false>, rows4_chain<5, false>, rows4_chain<6, false>};

static void gemm_block16_wide(const at::BFloat16* xp, int64_t xs, const at::BFloat16* wp, const at::BFloat16* bp,
                              at::BFloat16* op, int64_t M, int64_t N, int64_t K) {
  const int64_t NB = (N + 15) / 16, NC = K / 32;
  at::parallel_for(0, NB, 4, [&](int64_t b0, int64_t b1) {
    const std::vector<__m512bh> xv = x_chunks(xp, xs, M, NC);
    const char* end = reinterpret_cast<const char*>(wp + std::min<int64_t>(N, b1 * 16) * K);
    std::vector<std::array<__m512, 16>> acc(M);
    auto* accp = reinterpret_cast<__m512(*)[16]>(acc.data());
    for (int64_t b = b0; b < b1; ++b) {
      const int rows = static_cast<int>(std::min<int64_t>(16, N - b * 16));
      const at::BFloat16* blk = wp + b * 16 * K;
      for (int j0 = 0; j0 < rows; j0 += 4) {
        const int nr = std::min(4, rows - j0);
        const at::BFloat16* wrow[4];
        for (int r = 0; r < 4; ++r) wrow[r] = blk + (j0 + std::min(r, nr - 1)) * K;  // past the end: a repeat
        const int64_t groups = (M + 5) / 6;  // as even as possible: 16 = 6 + 5 + 5, 13 = 5 + 4 + 4
        for (int64_t g = 0, m0 = 0; g < groups; ++g) {
          const int64_t mr = (M - m0) / (groups - g);
          const __m512bh* xg = xv.data() + m0 * NC;
          (m0 == 0 ? kChainFirst : kChainRest)[mr - 1](xg, NC, wrow, end, accp + m0, j0);
          m0 += mr;
        }
      }
      store_block16(accp, M, rows, bp, b, op, N);
    }
  });
}

static inline bool is_nan_bits(float f) {  // std::isnan is folded to false under -ffast-math
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x7fffffffu) > 0x7f800000u;
}

// Row argmax of float32 [R, V] like torch.max(dim=-1).indices: the first maximum, or the first NaN when a row has
// one. One vector pass for the maximum, then a scan to its first position (rows in parallel). Greedy sampling over a
// 49k vocabulary at 128 rows: ~1 ms where torch's max took ~3 ms in the engine.
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) > 0,
              "argmax_rows: float32 [R, V] with unit stride, V > 0");
  const int64_t R = x.size(0), V = x.size(1), xs = x.stride(0);
  auto out = at::empty({R}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * xs;
      __m512 m = _mm512_set1_ps(-INFINITY);
      __mmask16 nan = 0;
      int64_t j = 0;
      for (; j + 16 <= V; j += 16) {
        const __m512 v = _mm512_loadu_ps(row + j);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_max_ps(m, v);
      }
      float best = _mm512_reduce_max_ps(m);
      for (int64_t t = j; t < V; ++t) {
        if (is_nan_bits(row[t])) nan = 1;
        best = std::max(best, row[t]);
      }
      int64_t idx = 0;
      if (nan) {
        while (!is_nan_bits(row[idx])) ++idx;
      } else {
        const __m512 b = _mm512_set1_ps(best);
        int64_t t = 0;
        for (; t + 16 <= V; t += 16) {
          const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + t), b, _CMP_EQ_OQ);
          if (eq) break;
        }
        while (row[t] != best) ++t;
        idx = t;
      }
      op[r] = idx;
    }
  });
  return out;
}

at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(0) >= 1 && x.size(0) <= 16,
              "small_m_linear: x [M <= 16, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
              x.stride(1) == 1 && x.size(1) % 32 == 0, "small_m_linear: bf16, contiguous weight, K % 32 == 0");
  const at::BFloat16* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kBFloat16).contiguous();
    bp = b.data_ptr<at::BFloat16>();
  }
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = at::empty({M, N}, x.options());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  switch (M) {
    case 1: gemv_block16<1>(xp, x.stride(0), wp, bp, op, N, K); break;
    case 2: gemv_block16<2>(xp, x.stride(0), wp, bp, op, N, K); break;
    case 3: gemv_block16<3>(xp, x.stride(0), wp, bp, op, N, K); break;
    case 4: gemv_block16<4>(xp, x.stride(0), wp, bp, op, N, K); break;
    case 5: gemv_block16<5>(xp, x.stride(0), wp, bp, op, N, K); break;
    case 6: gemv_block16<6>(xp, x.stride(0), wp, bp, op, N, K); break;
    case 7: gemv_block16<7>(xp, x.stride(0), wp, bp, op, N, K); break;
    case 8: gemv_block16<8>(xp, x.stride(0), wp, bp, op, N, K); break;
    default: gemm_block16_wide(xp, x.stride(0), wp, bp, op, M, N, K); break;
  }
  return out;
}

// ---------------------------------------------------------------------------------- int8 weight-only linear
// y = x @ (q * s)^T (+ b) for decode-sized row counts: streams the int8 rows, widens 32 at a time to bf16 (exact:
// |q| <= 127) and multiplies with AVX512-BF16 dot products against up to four activation rows per pass, fp32
// accumulation, the per-channel scale applied once per output. PyTorch's `_weight_int8pack_mm` converts every
// weight to float on the way and on a 2-core machine runs no faster than bf16 weights at one row (4x slower at 16).
static inline __m512bh widen_int8x32(const int8_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);  // elements 0..15 from lo, 16..31 from hi
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
        op[m * os + n] = from_f<at::BFloat16>(_mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m])) * s + b);
      }
    }
  });
}

static void check_int8_linear_args(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_linear: x [M, K], q [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.stride(1) == 1 && q.scalar_type() == at::kChar &&
              q.is_contiguous() && x.size(1) % 32 == 0, "int8_linear: bf16 x, contiguous int8 q, K % 32 == 0");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == q.size(0),
              "int8_linear: float32 scales [N]");
}

static at::Tensor int8_rows_linear(const at::Tensor& x, const at::Tensor& q, const float* sp, const float* bp) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto out = at::empty({M, N}, x.options());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int8_t* qp = q.data_ptr<int8_t>();
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
#endif

#if defined(TOKENMILL_AVX512_BF16) && defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define TOKENMILL_AMX 1
// ------------------------------------------------------------------------------------------------ AMX linear
// Weights in tile order: [N/16][K/32] tiles of 16 k-pairs x 16 columns x 2 (VNNI pairs), 1 KiB each, so one
// column block streams contiguously along K. x is copied into 16-row zero-padded chunks; every tile is 16 x 64 B.
// Each thread takes a range of column blocks, four at a time (four C tiles), and runs every 16-row chunk of x over
// them while their weights are in L2. A row's result depends only on that row (fixed K order, fp32 accumulation,
// one rounding), so the kernel is batch-invariant. The tile state is configured per call and released after, so
// oneDNN's own AMX kernels in the same threads are unaffected.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static bool amx_permitted() {
  // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

bool amx_available() { return amx_permitted(); }

at::Tensor amx_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(0) % 16 == 0 && w.size(1) % 32 == 0,
              "amx_pack: bf16 weight [N, K] with N % 16 == 0 and K % 32 == 0");
  auto wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), NT = N / 16, KB = K / 32;
  auto out = at::empty({NT, KB, 16, 32}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, NT, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t kb = 0; kb < KB; ++kb) {
        uint16_t* tile = dst + (t * KB + kb) * 512;
        for (int64_t p = 0; p < 16; ++p)
          for (int64_t n = 0; n < 16; ++n) {
            const uint16_t* row = src + (t * 16 + n) * K + kb * 32 + 2 * p;
            tile[p * 32 + 2 * n] = row[0];
            tile[p * 32 + 2 * n + 1] = row[1];
          }
      }
  });
  return out;
}

// C tiles tmm0..tmm(G-1), A tile tmm4, B tiles alternate tmm5 / tmm6.
// `bstep`: elements between column blocks (default KB * 512: a whole packed matrix; less when only part of K is used)
template <int G>
static inline void amx_group(const uint16_t* a, int64_t a_stride_bytes, const uint16_t* b, int64_t KB,
                             float* cbuf, int64_t bstep = -1) {
  _tile_zero(0); if (G > 1) _tile_zero(1); if (G > 2) _tile_zero(2); if (G > 3) _tile_zero(3);
  if (bstep < 0) bstep = KB * 512;
  for (int64_t kb = 0; kb < KB; ++kb) {
    const uint16_t* bk = b + kb * 512;
    _tile_loadd(4, a + kb * 32, a_stride_bytes);
    _tile_stream_loadd(5, bk, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (G > 1) { _tile_stream_loadd(6, bk + bstep, 64); _tile_dpbf16ps(1, 4, 6); }
    if (G > 2) { _tile_stream_loadd(5, bk + 2 * bstep, 64); _tile_dpbf16ps(2, 4, 5); }
    if (G > 3) { _tile_stream_loadd(6, bk + 3 * bstep, 64); _tile_dpbf16ps(3, 4, 6); }
  }
  _tile_stored(0, cbuf, 64);
  if (G > 1) _tile_stored(1, cbuf + 256, 64);
  if (G > 2) _tile_stored(2, cbuf + 512, 64);
  if (G > 3) _tile_stored(3, cbuf + 768, 64);
}

// float_out: the float32 accumulators (+ bias) as they are, unrounded: a vocabulary-sized head's logits then keep
// the precision bf16 rounding would take (8 bits: steps of 0.125 at 16-32), which near-ties and logprobs need.
// The bf16 output is these values rounded to nearest even.
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                      bool float_out) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 4 && wt.size(2) == 16 && wt.size(3) == 32 && x.size(1) == wt.size(1) * 32,
              "amx_linear: x [M, K], weight packed by amx_pack");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wt.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "amx_linear: bf16");
  TORCH_CHECK(amx_permitted(), "amx_linear: the kernel refused the AMX tile state");
  const int64_t M = x.size(0), K = x.size(1), NT = wt.size(0), KB = wt.size(1), N = NT * 16;
  const int64_t MC = (M + 15) / 16;
  // x in 16-row chunks, zero-padded (a per-thread buffer: ATen's zeros + copy cost more than the copy itself)
  thread_local std::vector<uint16_t> xbuf;
  xbuf.resize(MC * 16 * K);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t r = 0; r < M; ++r) std::memcpy(xbuf.data() + r * K, xs + r * x.stride(0), K * 2);
  std::memset(xbuf.data() + M * K, 0, (MC * 16 - M) * K * 2);
  at::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) { b = bias->to(at::kFloat).contiguous(); bp = b.data_ptr<float>(); }
  auto out = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  const uint16_t* xa = xbuf.data();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>());
  uint16_t* op = float_out ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* fp = float_out ? out.data_ptr<float>() : nullptr;
  // cbuf holds the g column blocks of one 16-row chunk, block j at j * 256
  auto emit = [&](const float* cbuf, int64_t row0, int64_t rows, int64_t t, int g) {
    for (int j = 0; j < g; ++j) {
      const __m512 bv = bp ? _mm512_loadu_ps(bp + (t + j) * 16) : _mm512_setzero_ps();
      for (int64_t r = 0; r < rows; ++r) {
        const float* c = cbuf + j * 256 + r * 16;
        const __m512 acc = _mm512_add_ps(_mm512_load_ps(c), bv);
        if (fp)
          _mm512_storeu_ps(fp + (row0 + r) * N + (t + j) * 16, acc);
        else
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + (row0 + r) * N + (t + j) * 16),
                              (__m256i)_mm512_cvtneps_pbh(acc));
      }
    }
  };
  at::parallel_for(0, NT, 4, [&](int64_t t0, int64_t t1) {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
    alignas(64) float cbuf[4 * 256];
    for (int64_t t = t0; t < t1; t += 4) {
      const int g = static_cast<int>(std::min<int64_t>(4, t1 - t));
      const uint16_t* b = wp + t * KB * 512;
      for (int64_t mc = 0; mc < MC; ++mc) {
        const uint16_t* a = xa + mc * 16 * K;
        switch (g) {
          case 4: amx_group<4>(a, K * 2, b, KB, cbuf); break;
          case 3: amx_group<3>(a, K * 2, b, KB, cbuf); break;
          case 2: amx_group<2>(a, K * 2, b, KB, cbuf); break;
          default: amx_group<1>(a, K * 2, b, KB, cbuf); break;
        }
        emit(cbuf, mc * 16, std::min<int64_t>(16, M - mc * 16), t, g);
      }
    }
    _tile_release();
  });
  return out;
}

// Weight-only int8 on AMX for q int8 [N, K] in its row-major (portable) layout, so no second copy: amx_linear's
// roles swap. The A tiles are weight rows widened to bf16 (16 outputs x 32 k, exact), the B tiles are x packed as
// amx_pack packs a weight (16 rows per tile), and the C tiles hold y^T (16 outputs x 16 rows). Each group of up to
// four 16-output blocks is widened once into a per-thread buffer and serves every 16-row chunk of x, so the widening
// (the cost: ~5 instructions per 32 weights) is paid once per call however many rows there are.
template <int G>
static inline void amx_int8_group(const uint16_t* w, int64_t KB, const uint16_t* xt, float* cbuf) {
  _tile_zero(0); if (G > 1) _tile_zero(1); if (G > 2) _tile_zero(2); if (G > 3) _tile_zero(3);
  for (int64_t kb = 0; kb < KB; ++kb) {
    _tile_loadd(5, xt + kb * 512, 64);
    _tile_loadd(4, w + kb * 512, 64); _tile_dpbf16ps(0, 4, 5);
    if (G > 1) { _tile_loadd(6, w + (KB + kb) * 512, 64); _tile_dpbf16ps(1, 6, 5); }
    if (G > 2) { _tile_loadd(4, w + (2 * KB + kb) * 512, 64); _tile_dpbf16ps(2, 4, 5); }
    if (G > 3) { _tile_loadd(6, w + (3 * KB + kb) * 512, 64); _tile_dpbf16ps(3, 6, 5); }
  }
  _tile_stored(0, cbuf, 64);
  if (G > 1) _tile_stored(1, cbuf + 256, 64);
  if (G > 2) _tile_stored(2, cbuf + 512, 64);
  if (G > 3) _tile_stored(3, cbuf + 768, 64);
}

static at::Tensor amx_int8_linear(const at::Tensor& x, const at::Tensor& q, const float* sp, const float* bp) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), KB = K / 32, NT = N / 16, MC = (M + 15) / 16;
  // x as B tiles [MC][KB]: tile row p holds, for rows m = 0..15 of the chunk, the pair x[m][kb*32+2p..+1]
  std::vector<uint32_t> xt(MC * KB * 256, 0);
  const uint32_t* xs = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  const int64_t xstride = x.stride(0) / 2;  // in pairs
  for (int64_t m = 0; m < M; ++m)
    for (int64_t kb = 0; kb < KB; ++kb) {
      uint32_t* tile = xt.data() + ((m / 16) * KB + kb) * 256 + (m % 16);
      const uint32_t* row = xs + m * xstride + kb * 16;
      for (int64_t p = 0; p < 16; ++p) tile[p * 16] = row[p];
    }
  auto out = at::empty({M, N}, x.options());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xt.data());
  at::parallel_for(0, NT, 4, [&](int64_t t0, int64_t t1) {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
    alignas(64) float cbuf[4 * 256];
    thread_local std::vector<uint16_t> wbuf;
    for (int64_t t = t0; t < t1; t += 4) {
      const int g = static_cast<int>(std::min<int64_t>(4, t1 - t));
      wbuf.resize(g * KB * 512);
      for (int j = 0; j < g; ++j)
        for (int64_t kb = 0; kb < KB; ++kb)
          for (int64_t r = 0; r < 16; ++r) {
            const __m512bh v = widen_int8x32(qp + ((t + j) * 16 + r) * K + kb * 32);
            std::memcpy(wbuf.data() + (j * KB + kb) * 512 + r * 32, &v, 64);
          }
      for (int64_t mc = 0; mc < MC; ++mc) {
        const uint16_t* xc = xb + mc * KB * 512;
        switch (g) {
          case 4: amx_int8_group<4>(wbuf.data(), KB, xc, cbuf); break;
          case 3: amx_int8_group<3>(wbuf.data(), KB, xc, cbuf); break;
          case 2: amx_int8_group<2>(wbuf.data(), KB, xc, cbuf); break;
          default: amx_int8_group<1>(wbuf.data(), KB, xc, cbuf); break;
        }
        const int64_t rows = std::min<int64_t>(16, M - mc * 16);
        for (int j = 0; j < g; ++j) {
          const int64_t n0 = (t + j) * 16;
          for (int64_t r = 0; r < rows; ++r) {
            at::BFloat16* o = op + (mc * 16 + r) * N + n0;
            for (int64_t n = 0; n < 16; ++n)  // cbuf: [output n][row r]
              o[n] = from_f<at::BFloat16>(cbuf[j * 256 + n * 16 + r] * sp[n0 + n] + (bp ? bp[n0 + n] : 0.f));
          }
        }
      }
    }
    _tile_release();
  });
  return out;
}

// ------------------------------------------------------------------------------------ AMX prefill attention
// Causal attention of a prompt chunk (q [n, Hq, D], k and v [L, Hkv, D], any row stride): both products on AMX
// tiles, packed as amx_linear packs a weight (K as W[keys, D]; V as W[D, keys]), and per 16 query rows an exact
// softmax over all visible keys in fp32. Like torch's flash kernel, the unnormalised probabilities are rounded to
// bf16 for P.V and the sum divides at the end. Query i is at position q_start + i; the first `sink_keys` keys are
// at positions 0.., the others at key_start.. (a fresh prompt: all three 0, L = n). window < 0: plain causal;
// else a query at p sees positions (p - window, p] and the first `sinks`.
// K [n keys, D] (row stride rs) as amx_pack packs W[keys, D]: tiles [NKB][D/32], zero keys beyond n
static void pack_keys(const uint16_t* src, int64_t rs, int64_t n, int64_t D, int64_t NKB, uint16_t* dst) {
  const int64_t KD = D / 32;
  for (int64_t t = 0; t < NKB; ++t)
    for (int64_t kb = 0; kb < KD; ++kb) {
      uint32_t* tile = reinterpret_cast<uint32_t*>(dst + (t * KD + kb) * 512);  // [16 dim pairs][16 keys]
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t key = t * 16 + j;
        uint32_t pairs[16] = {};
        if (key < n) std::memcpy(pairs, src + key * rs + kb * 32, 64);
        for (int64_t pp = 0; pp < 16; ++pp) tile[pp * 16 + j] = pairs[pp];
      }
    }
}

// V [n keys, D] (row stride rs) as amx_pack packs W[D, keys]: tiles [D/16][NKC], zero keys beyond n
static void pack_values(const uint16_t* src, int64_t rs, int64_t n, int64_t D, int64_t NKC, uint16_t* dst) {
  const int64_t NDB = D / 16;
  for (int64_t t = 0; t < NDB; ++t)
    for (int64_t kc = 0; kc < NKC; ++kc) {
      uint16_t* tile = dst + (t * NKC + kc) * 512;  // [16 key pairs][16 dims][2]
      for (int64_t pp = 0; pp < 16; ++pp) {
        const int64_t k0 = kc * 32 + 2 * pp;
        uint16_t* o = tile + pp * 32;
        if (k0 + 1 < n) {
          const uint16_t* a = src + k0 * rs + t * 16;
          const uint16_t* b = a + rs;
          for (int64_t j = 0; j < 16; ++j) { o[2 * j] = a[j]; o[2 * j + 1] = b[j]; }
        } else if (k0 < n) {
          const uint16_t* a = src + k0 * rs + t * 16;
          for (int64_t j = 0; j < 16; ++j) { o[2 * j] = a[j]; o[2 * j + 1] = 0; }
        } else {
          std::memset(o, 0, 64);
        }
      }
    }
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                             int64_t sinks, double scale, int64_t q_start, int64_t sink_keys, int64_t key_start) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes() && q.size(2) == k.size(2) &&
              q.size(1) % k.size(1) == 0, "prefill_attention: q [n, Hq, D], k/v [L, Hkv, D]");
  TORCH_CHECK(sink_keys >= 0 && sink_keys <= k.size(0) && key_start >= sink_keys && q_start >= key_start &&
              q_start + q.size(0) <= key_start + k.size(0) - sink_keys,
              "prefill_attention: every query's own key must be among the keys");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "prefill_attention: bf16");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && q.stride(1) == q.size(2) &&
              k.stride(1) == k.size(2) && v.stride(1) == v.size(2), "prefill_attention: heads contiguous in rows");
  TORCH_CHECK(q.size(2) % 32 == 0 && q.size(2) <= 256, "prefill_attention: head_dim a multiple of 32, at most 256");
  TORCH_CHECK(amx_permitted(), "prefill_attention: the kernel refused the AMX tile state");
  const int64_t n = q.size(0), nkeys = k.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  const int64_t group = Hq / Hkv, NK = (nkeys + 31) / 32 * 32;  // keys padded to whole 32-key chunks
  const int64_t shift = key_start - sink_keys;  // key index c >= sink_keys is at position c + shift
  const int64_t KD = D / 32, NKB = NK / 16, NKC = NK / 32, NDB = D / 16, NQB = (n + 15) / 16;
  auto out = at::empty({n, Hq, D}, q.options());
  if (n == 0) return out;
  std::vector<uint16_t> kp(Hkv * NKB * KD * 512), vp(Hkv * NDB * NKC * 512);
  const uint16_t* kb = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vb = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  const uint16_t* qb = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  uint16_t* ob = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t ks = k.stride(0), vs = v.stride(0), qs = q.stride(0);
  at::parallel_for(0, 2 * Hkv, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t g = w / 2;
      if (w % 2 == 0) pack_keys(kb + g * D, ks, nkeys, D, NKB, kp.data() + g * NKB * KD * 512);
      else pack_values(vb + g * D, vs, nkeys, D, NKC, vp.data() + g * NDB * NKC * 512);
    }
  });
  const float sc = static_cast<float>(scale);
#pragma omp parallel
  {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
    alignas(64) float cbuf[4 * 256];
    alignas(64) uint16_t qt[16 * 256];
    std::vector<float> sbuf(16 * NK);
    std::vector<uint16_t> pbuf(16 * NK);
    float sums[16];
    // later query blocks see more keys: hand them out first
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < Hq * NQB; ++item) {
      const int64_t qblk = NQB - 1 - item / Hq, h = item % Hq, g = h / group;
      const int64_t i0 = qblk * 16, rows = std::min<int64_t>(16, n - i0), i_last = i0 + rows - 1;
      // key indices [j_lo, j_lo + L): from the first one a row of this block may see to the last row's own key
      const int64_t j_lo = (window < 0 || sinks > 0) ? 0
          : std::max<int64_t>(0, q_start + i0 - window + 1 - shift) / 32 * 32;
      const int64_t L = (q_start + i_last - shift + 1 - j_lo + 31) / 32 * 32;
      for (int64_t r = 0; r < 16; ++r) {
        if (r < rows) std::memcpy(qt + r * D, qb + (i0 + r) * qs + h * D, D * 2);
        else std::memset(qt + r * D, 0, D * 2);
      }
      // scores: 16 query rows x L keys, four 16-key blocks per tile group
      const uint16_t* kg = kp.data() + g * NKB * KD * 512;
      for (int64_t c = 0; c < L; c += 64) {
        const int gcount = static_cast<int>(std::min<int64_t>(4, (L - c) / 16));
        const uint16_t* b = kg + ((j_lo + c) / 16) * KD * 512;
        switch (gcount) {
          case 4: amx_group<4>(qt, D * 2, b, KD, cbuf); break;
          case 3: amx_group<3>(qt, D * 2, b, KD, cbuf); break;
          case 2: amx_group<2>(qt, D * 2, b, KD, cbuf); break;
          default: amx_group<1>(qt, D * 2, b, KD, cbuf); break;
        }
        for (int j = 0; j < gcount; ++j)
          for (int64_t r = 0; r < 16; ++r)
            std::memcpy(sbuf.data() + r * L + c + j * 16, cbuf + j * 256 + r * 16, 64);
      }
      // softmax rows: masked keys get probability 0; P rounded to bf16, the sum kept in fp32
      const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (int64_t r = 0; r < 16; ++r) {
        uint16_t* pr = pbuf.data() + r * L;
        if (r >= rows) { std::memset(pr, 0, L * 2); sums[r] = 1.f; continue; }
        const int64_t i = q_start + i0 + r;  // the query's position
        const float* sr = sbuf.data() + r * L;
        auto visible = [&](int64_t c) -> __mmask16 {
          const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j_lo + c)), lane);
          const __m512i j = _mm512_mask_add_epi32(idx, _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(
              static_cast<int>(sink_keys))), idx, _mm512_set1_epi32(static_cast<int>(shift)));  // positions
          __mmask16 m = _mm512_cmple_epi32_mask(j, _mm512_set1_epi32(static_cast<int>(i)));
          if (window >= 0)
            m &= _mm512_cmpgt_epi32_mask(j, _mm512_set1_epi32(static_cast<int>(i - window))) |
                 _mm512_cmplt_epi32_mask(j, _mm512_set1_epi32(static_cast<int>(sinks)));
          return m;
        };
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t c = 0; c < L; c += 16)
          mx = _mm512_mask_max_ps(mx, visible(c), mx, _mm512_mul_ps(_mm512_loadu_ps(sr + c), _mm512_set1_ps(sc)));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < L; c += 16) {
          const __m512 e = _mm512_maskz_mov_ps(visible(c), exp512(_mm512_sub_ps(
              _mm512_mul_ps(_mm512_loadu_ps(sr + c), _mm512_set1_ps(sc)), m)));
          sum = _mm512_add_ps(sum, e);
          const __m256bh pb = _mm512_cvtneps_pbh(e);
          std::memcpy(pr + c, &pb, 32);
        }
        sums[r] = _mm512_reduce_add_ps(sum);
      }
      // out = P . V over the same key chunks, up to 64 output columns per tile group
      const uint16_t* vg = vp.data() + g * NDB * NKC * 512 + (j_lo / 32) * 512;
      for (int64_t d0 = 0; d0 < NDB; d0 += 4) {
        const int gcount = static_cast<int>(std::min<int64_t>(4, NDB - d0));
        const uint16_t* b = vg + d0 * NKC * 512;
        switch (gcount) {
          case 4: amx_group<4>(pbuf.data(), L * 2, b, L / 32, cbuf, NKC * 512); break;
          case 3: amx_group<3>(pbuf.data(), L * 2, b, L / 32, cbuf, NKC * 512); break;
          case 2: amx_group<2>(pbuf.data(), L * 2, b, L / 32, cbuf, NKC * 512); break;
          default: amx_group<1>(pbuf.data(), L * 2, b, L / 32, cbuf, NKC * 512); break;
        }
        for (int64_t r = 0; r < rows; ++r) {
          const __m512 inv = _mm512_set1_ps(1.f / sums[r]);
          for (int j = 0; j < gcount; ++j) {
            const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(cbuf + j * 256 + r * 16), inv));
            std::memcpy(ob + ((i0 + r) * Hq + h) * D + (d0 + j) * 16, &o, 32);
          }
        }
      }
    }
    _tile_release();
  }
  return out;
}
#endif


#ifdef TOKENMILL_AVX512_BF16
// y = x @ (q * scales)^T (+ bias) for int8 weights q [N, K] (one float32 scale per output): the streaming kernel
// for up to 16 rows, AMX tiles for more where the CPU has them (the widening is paid once per call). Every row count
// up to 16 computes a row the same way, so speculative verification rows reproduce plain decoding bit for bit.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  check_int8_linear_args(x, q, scales);
  at::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) { b = bias->to(at::kFloat).contiguous(); bp = b.data_ptr<float>(); }
  const float* sp = scales.data_ptr<float>();
#ifdef TOKENMILL_AMX
  if (x.size(0) > 16 && q.size(0) % 16 == 0 && amx_permitted()) return amx_int8_linear(x, q, sp, bp);
#endif
  return int8_rows_linear(x, q, sp, bp);
}
#endif

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t window,
                        double scale, int64_t sinks) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B,Hq,D], cache [blocks,block_size,Hkv,D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  auto bt = block_tables.to(at::kLong).contiguous();
  auto lens = context_lens.to(at::kLong).contiguous();
  auto out = at::empty_like(q);
#ifdef TOKENMILL_AVX512_BF16
  const int64_t D = q.size(2);
  if (q.scalar_type() == at::kBFloat16 && (D == 32 || D == 64 || D == 128 || D == 256) &&
      (k_cache.size(1) & (k_cache.size(1) - 1)) == 0) {
    decode_bf16_avx512(q, k_cache, v_cache, bt, lens, out, window, sinks, scale);
    return out;
  }
#endif
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), RD = Hkv * q.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const DenseRows<scalar_t> kr{k_cache.data_ptr<scalar_t>(), RD}, vr{v_cache.data_ptr<scalar_t>(), RD};
    decode_impl<scalar_t>(q, kr, vr, bs, Hkv, bt, lens, out, window, sinks, scale);
  });
  return out;
}

// Decode over an int8 cache [blocks, block_size, Hkv, D] with float16 scales [blocks, block_size, Hkv] (one per
// token per KV head): rows are dequantised as they are read; q and the output keep q's dtype.
at::Tensor paged_decode_int8(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& k_scales, const at::Tensor& v_scales, const at::Tensor& block_tables,
                             const at::Tensor& context_lens, int64_t window, double scale, int64_t sinks) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_scales.dim() == 3,
              "q [B,Hq,D], cache [blocks,block_size,Hkv,D], scales [blocks,block_size,Hkv]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && k_scales.is_contiguous() &&
              v_scales.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar &&
              k_scales.scalar_type() == at::kHalf && v_scales.scalar_type() == at::kHalf,
              "int8 caches with float16 scales");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && k_scales.size(2) == k_cache.size(2), "head_dim / KV heads differ");
  auto bt = block_tables.to(at::kLong).contiguous();
  auto lens = context_lens.to(at::kLong).contiguous();
  auto out = at::empty_like(q);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), D = q.size(2);
#ifdef TOKENMILL_AVX512_BF16
  if ((D == 32 || D == 64 || D == 128 || D == 256) && (bs & (bs - 1)) == 0 &&
      (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat)) {
    const int64_t shift = __builtin_ctzll(bs);
    const I8Cache kc{k_cache.data_ptr<int8_t>(), k_scales.data_ptr<at::Half>(), nullptr, shift, bs - 1, bs, Hkv};
    const I8Cache vc{v_cache.data_ptr<int8_t>(), v_scales.data_ptr<at::Half>(), nullptr, shift, bs - 1, bs, Hkv};
    const int64_t* btp = bt.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    if (q.scalar_type() == at::kBFloat16)
      decode_i8_avx512<at::BFloat16>(q, kc, vc, bt.size(1), btp, lp, out, window, sinks, scale);
    else
      decode_i8_avx512<float>(q, kc, vc, bt.size(1), btp, lp, out, window, sinks, scale);
    return out;
  }
#endif
  const Int8Rows kr{k_cache.data_ptr<int8_t>(), k_scales.data_ptr<at::Half>(), Hkv, D};
  const Int8Rows vr{v_cache.data_ptr<int8_t>(), v_scales.data_ptr<at::Half>(), Hkv, D};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_int8", [&] {
    decode_impl<scalar_t>(q, kr, vr, bs, Hkv, bt, lens, out, window, sinks, scale);
  });
  return out;
}


// ---------------------------------------------------------------------------------------------- element-wise

// out = w * norm(res [+ x]); with add, res is updated in place (residual stream), like HF's bf16 add.
template <typename T>
static void rms_impl(T* res, int64_t res_stride, const T* x, int64_t x_stride, const T* w, T* out, int64_t rows,
                     int64_t H, float eps, bool add) {
  // grains keep decode-sized batches on the calling thread: waking the OpenMP team costs more than the work
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / H), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(H);
    for (int64_t r = r0; r < r1; ++r) {
      T* rr = res + r * res_stride;
      const T* xr = add ? x + r * x_stride : nullptr;
      float ss = 0.f;
      for (int64_t j = 0; j < H; ++j) {
        float v = to_f<T>(rr[j]);
        if (add) { v = round_t<T>(v + to_f<T>(xr[j])); }
        buf[j] = v; ss += v * v;
      }
      if (add) for (int64_t j = 0; j < H; ++j) rr[j] = from_f<T>(buf[j]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
      T* o = out + r * H;
      for (int64_t j = 0; j < H; ++j) o[j] = from_f<T>(to_f<T>(w[j]) * round_t<T>(buf[j] * inv));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "rms_norm: x [T, H] with unit stride, weight of x's dtype");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_impl<scalar_t>(const_cast<scalar_t*>(x.data_ptr<scalar_t>()), x.stride(0), nullptr, 0,
                       w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1), (float)eps, false);
  });
  return out;
}

at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(residual.dim() == 2 && x.sizes() == residual.sizes() && residual.stride(1) == 1 && x.stride(1) == 1,
              "add_rms_norm: residual and x [T, H] with unit stride");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && w.scalar_type() == x.scalar_type() && w.is_contiguous(),
              "add_rms_norm: one dtype");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    rms_impl<scalar_t>(residual.data_ptr<scalar_t>(), residual.stride(0), x.data_ptr<scalar_t>(), x.stride(0),
                       w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1), (float)eps, true);
  });
  return out;
}

// [T, 2I] (gate | up) -> [T, I]: silu(gate) * up, rounding after the activation as HF's eager code does.
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "silu_and_mul: x [T, 2I] with unit stride");
  const int64_t T = x.size(0), I = x.size(1) / 2, xs = x.stride(0);
  auto out = at::empty({T, I}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 32768 / I), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* g = xp + r * xs; const scalar_t* u = g + I; scalar_t* o = op + r * I;
        int64_t j = 0;
#ifdef TOKENMILL_AVX512_BF16
        // bf16: 16 at a time with the polynomial exp (std::exp stays scalar here; 128 rows x 1536: 73 -> 45 us)
        if (std::is_same_v<scalar_t, at::BFloat16>) {
          const at::BFloat16* gb = reinterpret_cast<const at::BFloat16*>(g);
          const at::BFloat16* ub = reinterpret_cast<const at::BFloat16*>(u);
          const __m512 one = _mm512_set1_ps(1.f);
          for (; j + 16 <= I; j += 16) {
            const __m512 gv = load_bf16x16(gb + j);
            // gate / (1 + exp(-gate)) with a refined reciprocal: vdivps is the slowest step here
            const __m512 den = _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
            __m512 inv = _mm512_rcp14_ps(den);
            inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(den, inv, _mm512_set1_ps(2.f)));
            const __m512 sv = _mm512_mul_ps(gv, inv);
            const __m512 rounded = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(sv));
            const __m256bh r = _mm512_cvtneps_pbh(_mm512_mul_ps(rounded, load_bf16x16(ub + j)));
            std::memcpy(o + j, &r, 32);
          }
        }
#endif
        for (; j < I; ++j) {
          const float gv = to_f<scalar_t>(g[j]);
          o[j] = from_f<scalar_t>(round_t<scalar_t>(gv / (1.f + std::exp(-gv))) * to_f<scalar_t>(u[j]));
        }
      }
    });
  });
  return out;
}

// RoPE (rotate-half layout) on the q and k heads of a fused QKV output, in place; then store(slot, k row, v row)
// writes k and v to their cache slot. cos/sin: float32 tables [max_pos, D/2].
template <typename T, typename Store>
static void rotary_store_impl(at::Tensor& qkv, const at::Tensor& pos, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& slots, int64_t hq, int64_t hkv, int64_t D, const Store& store) {
  const int64_t ntok = qkv.size(0), rs = qkv.stride(0), half = D / 2;
  T* base = qkv.data_ptr<T>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  at::parallel_for(0, ntok, std::max<int64_t>(1, 32768 / ((hq + 2 * hkv) * D)), [&](int64_t t0, int64_t t1) {
    std::vector<float> c(half), s(half);
    for (int64_t t = t0; t < t1; ++t) {
      const float* cr = cp + pp[t] * half; const float* sr = snp + pp[t] * half;
      for (int64_t j = 0; j < half; ++j) { c[j] = round_t<T>(cr[j]); s[j] = round_t<T>(sr[j]); }
      T* row = base + t * rs;
      for (int64_t h = 0; h < hq + hkv; ++h) {
        T* x = row + h * D;
        for (int64_t j = 0; j < half; ++j) {
          const float a = to_f<T>(x[j]), b = to_f<T>(x[j + half]);
          x[j] = from_f<T>(a * c[j] - b * s[j]);
          x[j + half] = from_f<T>(b * c[j] + a * s[j]);
        }
      }
      store(sp[t], row + hq * D, row + (hq + hkv) * D);
    }
  });
}

// Symmetric int8 of each of hkv heads of D values: scale = absmax / 127 stored as float16; the values are divided
// by the stored (rounded) scale so that q * scale is the dequantised value.
template <typename T>
static inline void quantize_heads(const T* x, int8_t* dst, at::Half* scales, int64_t hkv, int64_t D) {
  for (int64_t h = 0; h < hkv; ++h) {
    const T* xh = x + h * D;
    float amax = 0.f;
    for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(to_f<T>(xh[d])));
    const at::Half sh(amax / 127.f);
    const float sf = static_cast<float>(sh);
    const float inv = sf > 0.f ? 1.f / sf : 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = std::nearbyint(to_f<T>(xh[d]) * inv);
      dst[h * D + d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    }
    scales[h] = sh;
  }
}

static void check_rotary_args(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                              const at::Tensor& sin, const at::Tensor& slot_mapping, int64_t num_heads,
                              int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "rotary_store: qkv [T, (Hq + 2 Hkv) D] with unit stride");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong &&
              positions.is_contiguous() && slot_mapping.is_contiguous(), "rotary_store: int64 positions and slots");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
              cos.size(1) * 2 == head_dim, "rotary_store: float32 cos/sin tables [max_pos, D/2]");
}

void rotary_store(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                  at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t num_heads,
                  int64_t num_kv_heads, int64_t head_dim) {
  check_rotary_args(qkv, positions, cos, sin, slot_mapping, num_heads, num_kv_heads, head_dim);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == qkv.scalar_type() &&
              v_cache.scalar_type() == qkv.scalar_type(), "rotary_store: contiguous caches of qkv's dtype");
  const int64_t RD = num_kv_heads * head_dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotary_store", [&] {
    scalar_t* kp = k_cache.data_ptr<scalar_t>();
    scalar_t* vp = v_cache.data_ptr<scalar_t>();
    rotary_store_impl<scalar_t>(qkv, positions, cos, sin, slot_mapping, num_heads, num_kv_heads, head_dim,
                                [&](int64_t slot, const scalar_t* k, const scalar_t* v) {
                                  std::memcpy(kp + slot * RD, k, sizeof(scalar_t) * RD);
                                  std::memcpy(vp + slot * RD, v, sizeof(scalar_t) * RD);
                                });
  });
}

// rotary_store into an int8 cache [blocks, block_size, Hkv, D] with float16 scales [blocks, block_size, Hkv].
void rotary_store_int8(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                       at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& k_scales, at::Tensor& v_scales,
                       const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  check_rotary_args(qkv, positions, cos, sin, slot_mapping, num_heads, num_kv_heads, head_dim);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_scales.is_contiguous() &&
              v_scales.is_contiguous() && k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar &&
              k_scales.scalar_type() == at::kHalf && v_scales.scalar_type() == at::kHalf,
              "rotary_store_int8: contiguous int8 caches and float16 scales");
  const int64_t RD = num_kv_heads * head_dim;
  int8_t* kp = k_cache.data_ptr<int8_t>();
  int8_t* vp = v_cache.data_ptr<int8_t>();
  at::Half* ksp = k_scales.data_ptr<at::Half>();
  at::Half* vsp = v_scales.data_ptr<at::Half>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotary_store_int8", [&] {
    rotary_store_impl<scalar_t>(qkv, positions, cos, sin, slot_mapping, num_heads, num_kv_heads, head_dim,
                                [&](int64_t slot, const scalar_t* k, const scalar_t* v) {
                                  quantize_heads<scalar_t>(k, kp + slot * RD, ksp + slot * num_kv_heads,
                                                           num_kv_heads, head_dim);
                                  quantize_heads<scalar_t>(v, vp + slot * RD, vsp + slot * num_kv_heads,
                                                           num_kv_heads, head_dim);
                                });
  });
}

#ifdef TOKENMILL_AVX512_BF16
// ------------------------------------------------------------------------------------------ fused decode layers
// Every decoder layer of a Llama-family model over a decode-only batch, in one call: the kernels above in the order
// of llama.py's layer loop, bit for bit, without its ~9 Python-level op dispatches and 8 module calls per layer
// (batch 1 on SmolLM2: ~3 ms of a ~14 ms step). Linear weights are AMX tiles (amx_pack) or dense for
// small_m_linear, or int8 rows for int8_linear with their scales; per layer: weights [in_norm, qkv, o, post_norm,
// gate_up, down], biases and scales [qkv, o, gate_up, down] (scales undefined for bf16 weights).
// kv_caches: one [2, blocks, block_size, Hkv, D] tensor per layer; an int8 cache (kv_cache.py) comes with kv_scales,
// one float16 [2, blocks, block_size, Hkv] tensor per layer (empty for a cache in the model dtype).
// `residual` comes in as the embeddings and leaves as the residual stream; returns the last layer's MLP output.
static at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                                  const c10::optional<at::Tensor>& scale) {
  if (scale.has_value() && scale->defined()) return int8_linear(x, w, *scale, b);
#ifdef TOKENMILL_AMX
  if (w.dim() == 4) return amx_linear(x, w, b, false);
#endif
  return small_m_linear(x, w, b);
}

at::Tensor decode_layers(
    at::Tensor& residual, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& context_lens,
    at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& biases,
    const c10::List<c10::optional<at::Tensor>>& scales, at::TensorList kv_caches,
    at::TensorList kv_scales, at::IntArrayRef windows, at::IntArrayRef sinks, int64_t num_heads, int64_t num_kv_heads,
    int64_t head_dim, double eps, double scale) {
  const int64_t L = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(weights.size()) == 6 * L &&
              static_cast<int64_t>(biases.size()) == 4 * L && static_cast<int64_t>(scales.size()) == 4 * L &&
              static_cast<int64_t>(windows.size()) == L &&
              static_cast<int64_t>(sinks.size()) == L,
              "decode_layers: per layer 6 weights, 4 biases, 4 scales, a KV cache, a window and a sink count");
  const bool int8_kv = !kv_scales.empty();
  TORCH_CHECK(!int8_kv || static_cast<int64_t>(kv_scales.size()) == L, "decode_layers: KV scales for every layer");
  TORCH_CHECK(residual.dim() == 2 && residual.size(0) == block_tables.size(0) &&
              residual.size(0) == context_lens.size(0), "decode_layers: one row per decoding sequence");
  const int64_t T = residual.size(0), qd = num_heads * head_dim;
  at::Tensor h, x;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + 6 * l;
    auto bias = [&](int i) { return biases.get(4 * l + i); };
    auto wscale = [&](int i) { return scales.get(4 * l + i); };
    at::Tensor kc = kv_caches[l].select(0, 0), vc = kv_caches[l].select(0, 1);
    x = l == 0 ? rms_norm(residual, w[0], eps) : add_rms_norm(residual, h, w[0], eps);
    at::Tensor qkv = few_rows_linear(x, w[1], bias(0), wscale(0));
    at::Tensor q = qkv.narrow(1, 0, qd).view({T, num_heads, head_dim});
    at::Tensor o;
    if (int8_kv) {
      at::Tensor ks = kv_scales[l].select(0, 0), vs = kv_scales[l].select(0, 1);
      rotary_store_int8(qkv, positions, cos, sin, kc, vc, ks, vs, slot_mapping, num_heads, num_kv_heads, head_dim);
      o = paged_decode_int8(q.contiguous(), kc, vc, ks, vs, block_tables, context_lens, windows[l], scale, sinks[l]);
    } else {
      rotary_store(qkv, positions, cos, sin, kc, vc, slot_mapping, num_heads, num_kv_heads, head_dim);
      o = paged_decode(q.contiguous(), kc, vc, block_tables, context_lens, windows[l], scale, sinks[l]);
    }
    h = few_rows_linear(o.view({T, qd}), w[2], bias(1), wscale(1));
    x = add_rms_norm(residual, h, w[3], eps);
    h = few_rows_linear(silu_and_mul(few_rows_linear(x, w[4], bias(2), wscale(2))), w[5], bias(3), wscale(3));
  }
  return h;
}
#endif

TORCH_LIBRARY(tokenmill_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, int window, float scale, int sinks=0) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
  m.def("paged_decode_int8(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scales, Tensor v_scales, Tensor block_tables, Tensor context_lens, int window, float scale, int sinks=0) -> Tensor");
  m.impl("paged_decode_int8", c10::DispatchKey::CPU, TORCH_FN(paged_decode_int8));
#ifdef TOKENMILL_AVX512_BF16
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.impl("argmax_rows", c10::DispatchKey::CPU, TORCH_FN(argmax_rows));
  m.def("small_m_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("small_m_linear", c10::DispatchKey::CPU, TORCH_FN(small_m_linear));
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.impl("int8_linear", c10::DispatchKey::CPU, TORCH_FN(int8_linear));
  m.def("decode_layers(Tensor(a!) residual, Tensor positions, Tensor cos, Tensor sin, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, Tensor[] weights, Tensor?[] biases, Tensor?[] scales, Tensor(b!)[] kv_caches, Tensor(c!)[] kv_scales, int[] windows, int[] sinks, int num_heads, int num_kv_heads, int head_dim, float eps, float scale) -> Tensor");
  m.impl("decode_layers", c10::DispatchKey::CPU, TORCH_FN(decode_layers));
#endif
#ifdef TOKENMILL_AMX
  m.def("amx_available() -> bool");
  m.impl("amx_available", c10::DispatchKey::CatchAll, TORCH_FN(amx_available));
  m.def("amx_pack(Tensor weight) -> Tensor");
  m.impl("amx_pack", c10::DispatchKey::CPU, TORCH_FN(amx_pack));
  m.def("amx_linear(Tensor x, Tensor packed_weight, Tensor? bias, bool float_out=False) -> Tensor");
  m.impl("amx_linear", c10::DispatchKey::CPU, TORCH_FN(amx_linear));
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, int window, int sinks, float scale, int q_start=0, int sink_keys=0, int key_start=0) -> Tensor");
  m.impl("prefill_attention", c10::DispatchKey::CPU, TORCH_FN(prefill_attention));
#endif
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.def("add_rms_norm(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.impl("silu_and_mul", c10::DispatchKey::CPU, TORCH_FN(silu_and_mul));
  m.def("rotary_store(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping, int num_heads, int num_kv_heads, int head_dim) -> ()");
  m.impl("rotary_store", c10::DispatchKey::CPU, TORCH_FN(rotary_store));
  m.def("rotary_store_int8(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor(d!) k_scales, Tensor(e!) v_scales, Tensor slot_mapping, int num_heads, int num_kv_heads, int head_dim) -> ()");
  m.impl("rotary_store_int8", c10::DispatchKey::CPU, TORCH_FN(rotary_store_int8));
}
"""

_lock = threading.Lock()
_built: dict[str, object] = {}


def build_cpu_extension(name: str, source: str, namespace: str, probe_op: str):
    """Compiles `source` (once per process; torch caches the build on disk) and returns torch.ops.<namespace>, or
    None when it cannot be built here or does not define `probe_op` (e.g. the CPU lacks the instructions it
    needs). TOKENMILL_CPU_KERNELS=0 turns every extension off."""
    with _lock:
        if name in _built:
            return _built[name]
        ops = None
        if os.environ.get("TOKENMILL_CPU_KERNELS", "1") != "0":
            try:
                from torch.utils.cpp_extension import load_inline

                load_inline(
                    name=name,
                    cpp_sources=[source],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                    verbose=False,
                )
                ops = getattr(torch.ops, namespace)
                if not hasattr(ops, probe_op):
                    logger.info("%s: %s is not available on this CPU", name, probe_op)
                    ops = None
                else:
                    logger.info("CPU kernels %s ready", name)
            except Exception as e:  # no compiler, no ninja, ...: the PyTorch paths still work
                logger.warning("CPU kernels %s unavailable (%s); using the PyTorch paths", name, e)
        _built[name] = ops
        return ops


_ops: object = None
_loaded = False


def cpu_ops():
    """The compiled ops namespace (torch.ops.tokenmill_cpu), or None when it cannot be built here.
    TOKENMILL_CPU_KERNELS=0 turns it off (read once, at the first call)."""
    global _ops, _loaded
    if not _loaded:
        _ops = build_cpu_extension("tokenmill_cpu_kernels", _SOURCE, "tokenmill_cpu", "paged_decode")
        _loaded = True
    return _ops
