"""CPU paged-decode attention kernel (C++, compiled on first use with torch's cpp_extension).

Pure-PyTorch decode attention on a paged cache has to gather every sequence's blocks into a padded tensor first;
on a CPU that copy (and the padding to the longest context) costs more than the attention itself. This kernel
reads K/V straight from the blocks: one pass per (sequence, KV head), all query heads of the group at once, fp32
accumulation, OpenMP over the batch. If no compiler is available the engine falls back to the PyTorch path.
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

// One task per sequence: each cache row (all KV heads of one token) is read once, contiguously.
template <typename T>
static void decode_impl(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt,
                        const at::Tensor& lens, at::Tensor& out, int64_t window, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = kc.size(1), Hkv = kc.size(2);
  const int64_t G = Hq / Hkv, maxb = bt.size(1), RD = Hkv * D;
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
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
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - start;
      load_row<T>(qp + b * Hq * D, qf.data(), Hq * D);
      for (int64_t j = 0; j < Hq * D; ++j) qf[j] *= sc;
      scores.resize(Hq * n);
      std::fill(mx.begin(), mx.end(), -INFINITY);
      for (int64_t t = start; t < len; ++t) {
        const int64_t blk = btp[b * maxb + t / bs];
        load_row<T>(kp + (blk * bs + t % bs) * RD, row.data(), RD);
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const float s = dot(qf.data() + hq * D, row.data() + (hq / G) * D, D);
          scores[hq * n + (t - start)] = s;
          mx[hq] = std::max(mx[hq], s);
        }
      }
      for (int64_t hq = 0; hq < Hq; ++hq) {
        float* sg = scores.data() + hq * n;
        float total = 0.f;
        for (int64_t j = 0; j < n; ++j) { sg[j] = std::exp(sg[j] - mx[hq]); total += sg[j]; }
        sum[hq] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = start; t < len; ++t) {
        const int64_t blk = btp[b * maxb + t / bs];
        load_row<T>(vp + (blk * bs + t % bs) * RD, row.data(), RD);
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const float p = scores[hq * n + (t - start)];
          axpy(p, row.data() + (hq / G) * D, acc.data() + hq * D, D);
        }
      }
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const float inv = 1.f / sum[hq];
        T* o = op + (b * Hq + hq) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[hq * D + d] * inv);
      }
    }
  }
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t window,
                        double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B,Hq,D], cache [blocks,block_size,Hkv,D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  auto bt = block_tables.to(at::kLong).contiguous();
  auto lens = context_lens.to(at::kLong).contiguous();
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_impl<scalar_t>(q, k_cache, v_cache, bt, lens, out, window, scale);
  });
  return out;
}

TORCH_LIBRARY(tokenmill_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, int window, float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
}
"""

_lock = threading.Lock()
_state: dict[str, object] = {}


def paged_decode_kernel():
    """The compiled op (torch.ops.tokenmill_cpu.paged_decode), or None when it cannot be built here.
    TOKENMILL_CPU_KERNELS=0 turns it off."""
    with _lock:
        if "op" in _state:
            return _state["op"]
        op = None
        if os.environ.get("TOKENMILL_CPU_KERNELS", "1") != "0":
            try:
                from torch.utils.cpp_extension import load_inline

                load_inline(
                    name="tokenmill_cpu_kernels",
                    cpp_sources=[_SOURCE],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                    verbose=False,
                )
                op = torch.ops.tokenmill_cpu.paged_decode
                logger.info("CPU paged-decode kernel ready")
            except Exception as e:  # no compiler, no ninja, ...: the PyTorch path still works
                logger.warning("CPU paged-decode kernel unavailable (%s); using the PyTorch gather path", e)
        _state["op"] = op
        return op
