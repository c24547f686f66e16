// The row path: block rows one output high (BR == 1), i.e. unstructured masks ([1, 1]) and row
// vectors ([1, 8], [1, 16], ...). The block path vectorises over the BR outputs of a block row, so
// one output would fill 1 of 16 lanes. Here the lanes run over the rows m of X instead, 16 rows at
// a time, a "slice" of X (AVX2 takes each slice as two halves of 8 lanes):
//
//   XS = X^T by slices: slice s, rows [16 s, 16 s + 16) of X (zero past M), is [K][16] floats,
//        each input's 16 rows side by side; written once per call by 16 x 16 (AVX2: 8 x 8)
//        register transposes;
//   y[16 s .. 16 s + 16, n] = bias[n] + sum over the kept k of row n of  W[n, k] * XS_s[k]
//
// so every kept weight costs one broadcast, one load of 16 rows and one multiply-add (two with
// AVX2), whatever the pattern: a CSR product with the slice as the dense operand. A slice of
// K = 768 inputs is 48 KB, mostly in L1, where passes over 128 rows of X^T (393 KB, L2) read every
// weight's 512 bytes from L2 (Zen 4, 2 threads: one 768 x 3072 layer 0.73-0.93x the time, BERT-base
// with [1, 16] or unstructured masks 0.95-0.96x). Each output keeps four running sums (its weights
// taken in turn), so that the multiply-adds do not wait on each other. The sums of 16 consecutive
// outputs are then transposed in registers into rows of Y, where the epilogue (activation,
// residual) runs on them; LayerNorm follows over whole rows.
#include <algorithm>
#include <thread>

#include "block_sparse_internal.h"

namespace sparsec {
namespace detail {

bool row_path(const PackedWeight& w, Isa isa) {
  return w.BR == 1 && (isa == Isa::kAvx512 || isa == Isa::kAvx2);
}

}  // namespace detail

#if SPARSEC_X86
namespace {

using namespace detail;  // NOLINT: the shared helpers of block_sparse_internal.h

constexpr int64_t kSerialMacs = 1 << 20;  // as the block path: below this, no threads

struct RowJob {
  const PackedWeight* w;
  const float* xs;  // the slices of X^T
  Epilogue ep;
  float* y;
  int64_t M;
  std::vector<int64_t> group_start;  // [groups + 1] output boundaries (one output per block row)
};

struct TransposeJob {
  const float* x;
  int64_t M, K;
  float* xs;
};

// Task t: slice t (rows [16 t, 16 t + 16) of X, zeros past M) as [K][16].
SPARSEC_AVX512 void transpose_task(void* data, size_t t) {
  const TransposeJob& job = *static_cast<const TransposeJob*>(data);
  const int64_t m0 = static_cast<int64_t>(t) * 16;
  const int64_t rows = std::min<int64_t>(16, job.M - m0);
  float* xs = job.xs + static_cast<int64_t>(t) * job.K * 16;
  for (int64_t k0 = 0; k0 < job.K; k0 += 16) {
    const __mmask16 cols = lane_mask16(job.K - k0);
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      r[i] = i < rows ? _mm512_maskz_loadu_ps(cols, job.x + (m0 + i) * job.K + k0) : _mm512_setzero_ps();
    }
    transpose16(r);
    const int64_t kn = std::min<int64_t>(16, job.K - k0);
    for (int64_t j = 0; j < kn; ++j) _mm512_store_ps(xs + (k0 + j) * 16, r[j]);
  }
}

// Outputs [n0, n0 + count) (count <= 16) on one slice xs: output i's 16 sums (bias included) at
// strip + 16 i.
SPARSEC_AVX512 void outputs_avx512(const PackedWeight& w, int64_t n0, int64_t count, const float* xs,
                                   const float* bias, float* strip) {
  const int64_t K = w.K, BC = w.BC;
  const int64_t* cols = w.cols.data();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = n0 + i;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t b = w.row_start[n];
    const int64_t end = w.row_start[n + 1];
    if (BC == 1) {  // unstructured: block b is the single weight blocks[b]
      const float* v = w.blocks.get();
      for (; b + 4 <= end; b += 4) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(v[b]), _mm512_load_ps(xs + cols[b] * 16), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(v[b + 1]), _mm512_load_ps(xs + cols[b + 1] * 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(v[b + 2]), _mm512_load_ps(xs + cols[b + 2] * 16), a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(v[b + 3]), _mm512_load_ps(xs + cols[b + 3] * 16), a3);
      }
      for (; b < end; ++b) a0 = _mm512_fmadd_ps(_mm512_set1_ps(v[b]), _mm512_load_ps(xs + cols[b] * 16), a0);
    } else {
      for (; b < end; ++b) {
        const float* wb = w.block(b);
        const float* xk = xs + cols[b] * 16;
        const int64_t jn = std::min(BC, K - cols[b]);
        int64_t j = 0;
        for (; j + 4 <= jn; j += 4) {
          a0 = _mm512_fmadd_ps(_mm512_set1_ps(wb[j]), _mm512_load_ps(xk + j * 16), a0);
          a1 = _mm512_fmadd_ps(_mm512_set1_ps(wb[j + 1]), _mm512_load_ps(xk + j * 16 + 16), a1);
          a2 = _mm512_fmadd_ps(_mm512_set1_ps(wb[j + 2]), _mm512_load_ps(xk + j * 16 + 32), a2);
          a3 = _mm512_fmadd_ps(_mm512_set1_ps(wb[j + 3]), _mm512_load_ps(xk + j * 16 + 48), a3);
        }
        for (; j < jn; ++j) a0 = _mm512_fmadd_ps(_mm512_set1_ps(wb[j]), _mm512_load_ps(xk + j * 16), a0);
      }
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    _mm512_store_ps(strip + 16 * i, _mm512_add_ps(sum, _mm512_set1_ps(bias ? bias[n] : 0.0f)));
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2: the same slices, each as two halves of 8 lanes.

// r[i] (8 lanes each) becomes its transpose.
SPARSEC_AVX2 SPARSEC_INLINE void transpose8(__m256 (&r)[8]) {
  __m256 t[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {  // u[4i + c], 128-bit lane L: rows 4i..4i+3 of column 4L + c
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

SPARSEC_AVX2 SPARSEC_INLINE __m256i lanes8(int64_t n) {
  const int32_t k = static_cast<int32_t>(std::max<int64_t>(0, std::min<int64_t>(8, n)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Task t: slice t (rows [16 t, 16 t + 16) of X, zeros past M) as [K][16], by 8 x 8 transposes.
SPARSEC_AVX2 void transpose_task_avx2(void* data, size_t t) {
  const TransposeJob& job = *static_cast<const TransposeJob*>(data);
  float* xs = job.xs + static_cast<int64_t>(t) * job.K * 16;
  for (int64_t h = 0; h < 2; ++h) {
    const int64_t m0 = static_cast<int64_t>(t) * 16 + 8 * h;
    const int64_t rows = std::min<int64_t>(8, job.M - m0);
    for (int64_t k0 = 0; k0 < job.K; k0 += 8) {
      const __m256i cols = lanes8(job.K - k0);
      __m256 r[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        r[i] = i < rows ? _mm256_maskload_ps(job.x + (m0 + i) * job.K + k0, cols) : _mm256_setzero_ps();
      }
      transpose8(r);
      const int64_t kn = std::min<int64_t>(8, job.K - k0);
      for (int64_t j = 0; j < kn; ++j) _mm256_store_ps(xs + (k0 + j) * 16 + 8 * h, r[j]);
    }
  }
}

// One weight times its input's 16 rows of the slice, into the two halves' sums.
SPARSEC_AVX2 SPARSEC_INLINE void add(const float* wv, const float* xk, __m256& lo, __m256& hi) {
  const __m256 v = _mm256_broadcast_ss(wv);
  lo = _mm256_fmadd_ps(v, _mm256_load_ps(xk), lo);
  hi = _mm256_fmadd_ps(v, _mm256_load_ps(xk + 8), hi);
}

// As outputs_avx512, each slice row of 16 as two halves of 8: two running sums per half.
SPARSEC_AVX2 void outputs_avx2(const PackedWeight& w, int64_t n0, int64_t count, const float* xs, const float* bias,
                               float* strip) {
  const int64_t K = w.K, BC = w.BC;
  const int64_t* cols = w.cols.data();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = n0 + i;
    __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
    int64_t b = w.row_start[n];
    const int64_t end = w.row_start[n + 1];
    if (BC == 1) {
      const float* v = w.blocks.get();
      for (; b + 2 <= end; b += 2) {
        add(v + b, xs + cols[b] * 16, lo0, hi0);
        add(v + b + 1, xs + cols[b + 1] * 16, lo1, hi1);
      }
      if (b < end) add(v + b, xs + cols[b] * 16, lo0, hi0);
    } else {
      for (; b < end; ++b) {
        const float* wb = w.block(b);
        const float* xk = xs + cols[b] * 16;
        const int64_t jn = std::min(BC, K - cols[b]);
        int64_t j = 0;
        for (; j + 2 <= jn; j += 2) {
          add(wb + j, xk + j * 16, lo0, hi0);
          add(wb + j + 1, xk + j * 16 + 16, lo1, hi1);
        }
        if (j < jn) add(wb + j, xk + j * 16, lo0, hi0);
      }
    }
    const __m256 bv = _mm256_set1_ps(bias ? bias[n] : 0.0f);
    _mm256_store_ps(strip + 16 * i, _mm256_add_ps(_mm256_add_ps(lo0, lo1), bv));
    _mm256_store_ps(strip + 16 * i + 8, _mm256_add_ps(_mm256_add_ps(hi0, hi1), bv));
  }
}

// ------------------------------------------------------------------------------------------------
// One task of either instruction set: one slice of rows, one group of outputs in strips of L.

struct Avx512Rows {
  static void outputs(const PackedWeight& w, int64_t n0, int64_t count, const float* xs, const float* bias,
                      float* strip) {
    outputs_avx512(w, n0, count, xs, bias, strip);
  }
  static void store(const float* strip, int64_t n0, int64_t count, int64_t rows, int64_t N, const Epilogue& ep,
                    float* y) {
    store_strip_avx512(strip, 1, n0, count, rows, N, ep, y);
  }
};

struct Avx2Rows {
  static void outputs(const PackedWeight& w, int64_t n0, int64_t count, const float* xs, const float* bias,
                      float* strip) {
    outputs_avx2(w, n0, count, xs, bias, strip);
  }
  static void store(const float* strip, int64_t n0, int64_t count, int64_t rows, int64_t N, const Epilogue& ep,
                    float* y) {
    for (int64_t h = 0; h < count; h += 8) {  // 8 outputs at a time (8 x 8 transposes)
      store_strip_avx2(strip + h * 16, 2, n0 + h, std::min<int64_t>(8, count - h), rows, N, ep, y);
    }
  }
};

constexpr int64_t L = 16;  // rows of X per slice

// Task t = slice * groups + group (TaskSpan with one slice of rows per task).
template <class Path>
void row_task(void* data, size_t t) {
  const RowJob& job = *static_cast<const RowJob*>(data);
  const TaskSpan span(job.group_start, L, job.M, t);
  if (span.empty()) return;
  const PackedWeight& w = *job.w;
  alignas(64) float strip[L * L];
  const float* xs = job.xs + span.m0 * w.K;  // slice span.m0 / L
  float* y = job.y + span.m0 * w.N;
  for (int64_t n0 = span.r0; n0 < span.r1; n0 += L) {
    const int64_t count = std::min(L, span.r1 - n0);
    Path::outputs(w, n0, count, xs, job.ep.bias, strip);
    Path::store(strip, n0, count, span.rows, w.N, job.ep, y);
  }
}

}  // namespace
#endif  // SPARSEC_X86

namespace detail {

#if SPARSEC_X86
SPARSEC_AVX512 void store_strip_avx512(const float* strip, int64_t nv, int64_t n0, int64_t count, int64_t rows,
                                       int64_t N, const Epilogue& ep, float* y) {
  const __mmask16 outs = lane_mask16(count);
  // Locals, not reads through ep: the intrinsic stores may alias anything, and would make the
  // compiler reload them for every vector.
  const float* res = ep.residual ? ep.residual + (y - ep.y) : nullptr;
  const Activation act = ep.act;
  for (int64_t v = 0; v < nv; ++v) {
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      r[i] = i < count ? _mm512_load_ps(strip + i * 16 * nv + 16 * v) : _mm512_setzero_ps();
    }
    transpose16(r);  // r[l]: outputs n0.. of row 16 v + l
    const int64_t valid = std::min<int64_t>(16, rows - 16 * v);
#pragma GCC unroll 16
    for (int l = 0; l < 16; ++l) {  // constant indices: r stays in registers
      if (l >= valid) break;
      const int64_t at = (16 * v + l) * N + n0;
      __m512 out = activate512(r[l], act);
      if (res != nullptr) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(outs, res + at));
      _mm512_mask_storeu_ps(y + at, outs, out);
    }
  }
}
SPARSEC_AVX2 void store_strip_avx2(const float* strip, int64_t nv, int64_t n0, int64_t count, int64_t rows,
                                   int64_t N, const Epilogue& ep, float* y) {
  const __m256i outs = lanes8(count);
  for (int64_t v = 0; v < nv; ++v) {
    __m256 r[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) r[i] = i < count ? _mm256_load_ps(strip + i * 8 * nv + 8 * v) : _mm256_setzero_ps();
    transpose8(r);
    const int64_t valid = std::min<int64_t>(8, rows - 8 * v);
    for (int64_t l = 0; l < valid; ++l) _mm256_maskstore_ps(y + (8 * v + l) * N + n0, outs, r[l]);
    if (valid > 0) finish_tile_scalar(ep, y + 8 * v * N + n0, valid, count, N);
  }
}
#endif

void block_sparse_rows(const PackedWeight& w, const float* x, const Epilogue& epilogue, float* y, int64_t M,
                       Isa isa, ParallelFor parallel_for, void* runner_state) {
#if SPARSEC_X86
  const bool avx512 = isa == Isa::kAvx512;
  const int64_t slices = ceil_div(M, L);
  // X^T lives in a buffer of the calling thread, reused across calls; pool threads only read it.
  thread_local AlignedScratch<float> xs_buffer;
  float* xs = xs_buffer.reserve(static_cast<size_t>(slices * L * w.K));
  TransposeJob tjob{x, M, w.K, xs};
  const int64_t macs = M * w.row_start[w.R] * w.BC;
  const bool threads = parallel_for != nullptr && macs >= kSerialMacs;
  void (*transpose)(void*, size_t) = avx512 ? transpose_task : transpose_task_avx2;
  if (threads && slices > 1) {
    parallel_for(runner_state, transpose, static_cast<size_t>(slices), &tjob);
  } else {
    for (int64_t t = 0; t < slices; ++t) transpose(&tjob, static_cast<size_t>(t));
  }
  static const int64_t target_tasks = kTasksPerCore * std::max<int64_t>(2, std::thread::hardware_concurrency());
  const int64_t groups = std::min(w.R, std::max<int64_t>(1, ceil_div(target_tasks, slices)));
  Epilogue ep = epilogue;
  ep.y = y;
  RowJob job{&w, xs, ep, y, M, balanced_groups(w.row_start, groups)};
  void (*task)(void*, size_t) = avx512 ? row_task<Avx512Rows> : row_task<Avx2Rows>;
  const size_t total = static_cast<size_t>(slices * (static_cast<int64_t>(job.group_start.size()) - 1));
  if (total == 1 || !threads) {
    for (size_t t = 0; t < total; ++t) task(&job, t);
  } else {
    parallel_for(runner_state, task, total, &job);
  }
#else
  (void)w, (void)x, (void)epilogue, (void)y, (void)M, (void)isa, (void)parallel_for, (void)runner_state;
#endif
}

}  // namespace detail
}  // namespace sparsec
