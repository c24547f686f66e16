// The row path: block rows one output high (BR == 1), i.e. unstructured masks ([1, 1]) and row
// vectors ([1, 8], [1, 16], ...). The block path vectorises over the BR outputs of a block row, so
// one output would fill 1 of 16 lanes. Here the lanes run over the rows m of X instead:
//
//   XT = X^T, [K][Mp] (Mp = M rounded up to 16, zero padded), written once per call;
//   acc[v] = bias[n] + sum over the kept k of row n of  W[n, k] * XT[k, m0 + 16 v ..+16]
//
// so every kept weight costs one broadcast and NV loads and multiply-adds (NV = up to 8 vectors of
// 16 rows), whatever the pattern: a CSR product with X^T as the dense operand. The accumulators of
// 16 consecutive outputs are then transposed in registers into rows of Y, where the epilogue
// (activation, residual) runs 16 outputs at a time; LayerNorm follows over whole rows. AVX2 does
// the same with 8 lanes (8 x 8 transposes, up to 64 rows per pass, the scalar epilogue as its
// block path).
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

constexpr int64_t kSerialMacs = 1 << 20;      // as the block path: below this, no threads
constexpr int kMaxVectors = 8;                 // vectors of rows of X per pass (AVX-512: 128 rows)

struct RowJob {
  const PackedWeight* w;
  const float* xt;
  int64_t Mp;
  Epilogue ep;
  float* y;
  int64_t M;
  int64_t rows_per_task;
  std::vector<int64_t> group_start;  // [groups + 1] output boundaries (one output per block row)
};

struct TransposeJob {
  const float* x;
  int64_t M, K, Mp;
  float* xt;
};

// Task t: the 16 rows [16 t, 16 t + 16) of X into columns of XT (rows past M are zeros).
SPARSEC_AVX512 void transpose_task(void* data, size_t t) {
  const TransposeJob& job = *static_cast<const TransposeJob*>(data);
  const int64_t m0 = static_cast<int64_t>(t) * 16;
  const int64_t rows = std::min<int64_t>(16, job.M - m0);
  for (int64_t k0 = 0; k0 < job.K; k0 += 16) {
    const __mmask16 cols = lane_mask16(job.K - k0);
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      r[i] = i < rows ? _mm512_maskz_loadu_ps(cols, job.x + (m0 + i) * job.K + k0) : _mm512_setzero_ps();
    }
    transpose16(r);
    const int64_t kn = std::min<int64_t>(16, job.K - k0);
    for (int64_t j = 0; j < kn; ++j) _mm512_store_ps(job.xt + (k0 + j) * job.Mp + m0, r[j]);
  }
}

// One output n over NV vectors of rows: the dot products of W's row n with XT's columns.
template <int NV>
SPARSEC_AVX512 SPARSEC_INLINE void output_avx512(const PackedWeight& w, int64_t n, const float* xt, int64_t Mp,
                                                 float bias, float* out) {
  __m512 acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = _mm512_set1_ps(bias);
  const int64_t K = w.K, BC = w.BC;
  for (int64_t b = w.row_start[n]; b < w.row_start[n + 1]; ++b) {
    const int64_t k0 = w.cols[b];
    const int64_t jn = std::min(BC, K - k0);
    const float* wb = w.block(b);
    const float* xk = xt + k0 * Mp;
    for (int64_t j = 0; j < jn; ++j) {
      const __m512 wv = _mm512_set1_ps(wb[j]);
      const float* xj = xk + j * Mp;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(wv, _mm512_load_ps(xj + 16 * v), acc[v]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) _mm512_store_ps(out + 16 * v, acc[v]);
}

// Outputs [n0, n0 + count) (count <= 16) for the rows [m0, m0 + rows) of the call: each output's
// column of results into `strip` ([16][16 NV]), then 16 x 16 transposes into rows of Y.
template <int NV>
SPARSEC_AVX512 void strip_avx512(const PackedWeight& w, int64_t n0, int64_t count, const float* xt, int64_t Mp,
                                 int64_t rows, const Epilogue& ep, float* y, float* strip) {
  for (int64_t i = 0; i < count; ++i) {
    output_avx512<NV>(w, n0 + i, xt, Mp, ep.bias ? ep.bias[n0 + i] : 0.0f, strip + i * 16 * NV);
  }
  store_strip_avx512(strip, NV, n0, count, rows, w.N, ep, y);
}

// ------------------------------------------------------------------------------------------------
// AVX2: 8 lanes, the same structure.

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

SPARSEC_AVX2 void transpose_task_avx2(void* data, size_t t) {
  const TransposeJob& job = *static_cast<const TransposeJob*>(data);
  for (int64_t m0 = static_cast<int64_t>(t) * 16; m0 < static_cast<int64_t>(t) * 16 + 16; m0 += 8) {
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
      for (int64_t j = 0; j < kn; ++j) _mm256_store_ps(job.xt + (k0 + j) * job.Mp + m0, r[j]);
    }
  }
}

template <int NV>
SPARSEC_AVX2 SPARSEC_INLINE void output_avx2(const PackedWeight& w, int64_t n, const float* xt, int64_t Mp,
                                             float bias, float* out) {
  __m256 acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_set1_ps(bias);
  const int64_t K = w.K, BC = w.BC;
  for (int64_t b = w.row_start[n]; b < w.row_start[n + 1]; ++b) {
    const int64_t k0 = w.cols[b];
    const int64_t jn = std::min(BC, K - k0);
    const float* wb = w.block(b);
    const float* xk = xt + k0 * Mp;
    for (int64_t j = 0; j < jn; ++j) {
      const __m256 wv = _mm256_broadcast_ss(wb + j);
      const float* xj = xk + j * Mp;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(wv, _mm256_load_ps(xj + 8 * v), acc[v]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) _mm256_store_ps(out + 8 * v, acc[v]);
}

template <int NV>
SPARSEC_AVX2 void strip_avx2(const PackedWeight& w, int64_t n0, int64_t count, const float* xt, int64_t Mp,
                             int64_t rows, const Epilogue& ep, float* y, float* strip) {
  for (int64_t i = 0; i < count; ++i) {
    output_avx2<NV>(w, n0 + i, xt, Mp, ep.bias ? ep.bias[n0 + i] : 0.0f, strip + i * 8 * NV);
  }
  store_strip_avx2(strip, NV, n0, count, rows, w.N, ep, y);
}

// ------------------------------------------------------------------------------------------------
// One task of either instruction set: its outputs in strips of `kLanes`, its rows in vectors.

struct Avx512Rows {
  static constexpr int kLanes = 16;
  template <int NV>
  static void strip(const PackedWeight& w, int64_t n0, int64_t count, const float* xt, int64_t Mp, int64_t rows,
                    const Epilogue& ep, float* y, float* buffer) {
    strip_avx512<NV>(w, n0, count, xt, Mp, rows, ep, y, buffer);
  }
};

struct Avx2Rows {
  static constexpr int kLanes = 8;
  template <int NV>
  static void strip(const PackedWeight& w, int64_t n0, int64_t count, const float* xt, int64_t Mp, int64_t rows,
                    const Epilogue& ep, float* y, float* buffer) {
    strip_avx2<NV>(w, n0, count, xt, Mp, rows, ep, y, buffer);
  }
};

template <class Path>
void row_task(void* data, size_t t) {
  constexpr int64_t L = Path::kLanes;
  const RowJob& job = *static_cast<const RowJob*>(data);
  const TaskSpan span(job.group_start, job.rows_per_task, job.M, t);
  if (span.empty()) return;
  const PackedWeight& w = *job.w;
  alignas(64) float buffer[L * L * kMaxVectors];
  const float* xt = job.xt + span.m0;
  float* y = job.y + span.m0 * w.N;
  const int64_t nv = ceil_div(span.rows, L);
  for (int64_t n0 = span.r0; n0 < span.r1; n0 += L) {
    const int64_t count = std::min(L, span.r1 - n0);
    const auto run = [&](auto vectors) {
      Path::template strip<decltype(vectors)::value>(w, n0, count, xt, job.Mp, span.rows, job.ep, y, buffer);
    };
    with_vectors(nv, run);
  }
}

}  // namespace
#endif  // SPARSEC_X86

namespace detail {

#if SPARSEC_X86
SPARSEC_AVX512 void store_strip_avx512(const float* strip, int64_t nv, int64_t n0, int64_t count, int64_t rows,
                                       int64_t N, const Epilogue& ep, float* y) {
  const __mmask16 outs = lane_mask16(count);
  const float* res = ep.residual ? ep.residual + (y - ep.y) : nullptr;
  for (int64_t v = 0; v < nv; ++v) {
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      r[i] = i < count ? _mm512_load_ps(strip + i * 16 * nv + 16 * v) : _mm512_setzero_ps();
    }
    transpose16(r);  // r[l]: outputs n0.. of row 16 v + l
    const int64_t valid = std::min<int64_t>(16, rows - 16 * v);
    for (int64_t l = 0; l < valid; ++l) {
      const int64_t at = (16 * v + l) * N + n0;
      __m512 out = activate512(r[l], ep.act);
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
  const int64_t Mp = ceil_div(M, 16) * 16;
  // X^T lives in a buffer of the calling thread, reused across calls; pool threads only read it.
  thread_local AlignedScratch<float> xt_buffer;
  float* xt = xt_buffer.reserve(static_cast<size_t>(w.K * Mp));
  TransposeJob tjob{x, M, w.K, Mp, xt};
  const int64_t macs = M * w.row_start[w.R] * w.BC;
  const bool threads = parallel_for != nullptr && macs >= kSerialMacs;
  const size_t transposes = static_cast<size_t>(Mp / 16);
  void (*transpose)(void*, size_t) = avx512 ? transpose_task : transpose_task_avx2;
  if (threads && transposes > 1) {
    parallel_for(runner_state, transpose, transposes, &tjob);
  } else {
    for (size_t t = 0; t < transposes; ++t) transpose(&tjob, t);
  }
  const int64_t rows_per_task = (avx512 ? 16 : 8) * kMaxVectors;
  const int64_t row_tasks = ceil_div(M, rows_per_task);
  static const int64_t target_tasks = kTasksPerCore * std::max<int64_t>(2, std::thread::hardware_concurrency());
  const int64_t groups = std::min(w.R, std::max<int64_t>(1, ceil_div(target_tasks, row_tasks)));
  Epilogue ep = epilogue;
  ep.y = y;
  RowJob job{&w, xt, Mp, ep, y, M, rows_per_task, balanced_groups(w.row_start, groups)};
  void (*task)(void*, size_t) = avx512 ? row_task<Avx512Rows> : row_task<Avx2Rows>;
  const size_t total = static_cast<size_t>(row_tasks * (static_cast<int64_t>(job.group_start.size()) - 1));
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
