// INT8 compute for blocks one output high (BR == 1: unstructured masks, [1, BC] row vectors): the
// row path of block_sparse_rows.cc with VNNI. (On VNNI, row vectors [1, 4 j] are repacked for the
// column path, block_sparse_int8_columns.cc, which reuses this file's windows and XW.) The block
// path vectorises over 16 outputs of a block row, so one output would fill 1 of 16 lanes (a [1, 16]
// BERT-base ran at 1.1x dense). Here:
//
// Weights as windows. Each output row n keeps its weights as 4-byte windows: a window is a group of
// 4 columns k..k+3 with k a multiple of 4 that holds a kept weight, W[n, k..k+3] (zero where not
// kept), one 32-bit lane of vpdpbusd. A [1, 16] or [1, 8] block is exactly 4 or 2 windows, and
// unstructured weights share a window when they fall in the same group (at density 0.1: 1.16
// weights a window, where windows laid from any kept column held 1.2).
//
// Inputs as windows. X is quantized per row as for the block path (xq, rows ld bytes apart, zero
// padded past K), then transposed into XW [ceil(K / 4)][Mp] int32: XW[j][m] = the 4 bytes
// xq[m, 4j..4j+3], X's bytes in place read as int32 and transposed by 16 x 16 register transposes
// (a quarter of the bytes, and a quarter of the work, that windows at any column needed). A window
// at column 4j is then one aligned load of 16 rows.
//
//   acc[m] = sum over the windows (n, k) of dot4(XW[k / 4][m], window)  (vpdpbusd, u8 x s8, exact)
//   Y[m, n] = sx[m] * sw[n] * (acc[m] - zx[m] * colsum[n]) + bias[n]
//
// with the lanes over 16 rows of X and up to 8 vectors (128 rows) per pass; 16 outputs at a time
// are transposed into rows of Y (store_strip_avx512), where the fp32 epilogue runs. The sums are
// those of the block path: the window bytes past a row's kept weights are zero weights, and
// |acc| <= 255 * 128 * K < 2^31 for K <= kMaxInt8K.
//
// AVX2 has no vpdpbusd, and vpmaddubsw adds two u8 x s8 products into an int16 with saturation.
// Instead the 4 input bytes of a lane are split into two int16 pairs, (x0, x2) by a mask and
// (x1, x3) by a shift, and vpmaddwd multiplies each by the matching pair of weights and adds the two
// products into an int32 (at most 2 * 255 * 128: exact); 8 rows per vector, 64 per pass, the scalar
// epilogue. That costs about what fp32's AVX2 row path costs per weight: exactness, not speed, is
// what it buys over the fp32 file there. CPUs without AVX2 run the scalar loop.
#include <algorithm>
#include <cstring>
#include <thread>

#include "block_sparse.h"
#include "block_sparse_internal.h"

namespace sparsec {
namespace detail {

std::string pack_windows_int8(const BlockInputs& in, int64_t N, int64_t K, PackedInt8& out) {
  // Dense scratch of one output row: its weights and which columns are kept.
  std::vector<int8_t> row(static_cast<size_t>(K) + 4, 0);
  std::vector<uint8_t> kept(static_cast<size_t>(K) + 4, 0);
  const int8_t* vq = static_cast<const int8_t*>(in.values);
  std::vector<int64_t> starts;
  std::vector<int32_t> windows;
  out.row_start.assign(static_cast<size_t>(N + 1), 0);
  for (int64_t n = 0; n < N; ++n) {
    int64_t first = K, last = -1;
    for (int64_t s = 0; s < in.row_nnz[n]; ++s) {
      const int64_t k0 = in.block_cols[n * in.S + s] * in.BC;
      const int64_t jn = std::min(in.BC, K - k0);
      for (int64_t j = 0; j < jn; ++j) {
        row[k0 + j] = vq[(n * in.S + s) * in.BC + j];
        kept[k0 + j] = 1;
      }
      if (jn > 0) first = std::min(first, k0), last = std::max(last, k0 + jn - 1);
    }
    int32_t colsum = 0;
    const int64_t begin = first / 4 * 4;
    for (int64_t k = begin; k <= last; k += 4) {
      if (!(kept[k] || kept[k + 1] || kept[k + 2] || kept[k + 3])) continue;
      int8_t bytes[4] = {row[k], row[k + 1], row[k + 2], row[k + 3]};  // zero past K (scratch padding)
      int32_t window = 0;
      std::memcpy(&window, bytes, 4);
      starts.push_back(k);
      windows.push_back(window);
      for (int t = 0; t < 4; ++t) colsum += bytes[t];
    }
    for (int64_t k = std::max<int64_t>(begin, 0); k <= last; ++k) row[k] = 0, kept[k] = 0;
    out.row_start[n + 1] = static_cast<int64_t>(starts.size());
    out.colsum[n] = colsum;
  }
  const int64_t count = static_cast<int64_t>(windows.size());
  const size_t alloc = static_cast<size_t>((std::max<int64_t>(count * 4, 1) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, alloc);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, alloc);
  if (count > 0) std::memcpy(p, windows.data(), static_cast<size_t>(count) * 4);
  out.blocks = ByteBuffer(static_cast<int8_t*>(p));
  out.counted = PackedBytes(static_cast<int64_t>(alloc + starts.size() * sizeof(int64_t)));
  out.cols = std::move(starts);
  return {};
}

// The scalar loop over windows: CPUs without AVX2, and the reference the SIMD paths follow.
void windows_scalar(const PackedInt8& w, const QuantizedX& xq, int64_t M, const Epilogue& ep, float* y,
                    int32_t* raw) {
  const int32_t* win = reinterpret_cast<const int32_t*>(w.blocks.get());
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* xm = xq.data + m * xq.ld;
    for (int64_t n = 0; n < w.N; ++n) {
      int32_t acc = 0;
      for (int64_t g = w.row_start[n]; g < w.row_start[n + 1]; ++g) {
        int8_t bytes[4];
        std::memcpy(bytes, win + g, 4);
        const uint8_t* xk = xm + w.cols[g];
        for (int t = 0; t < 4; ++t) acc += static_cast<int32_t>(xk[t]) * bytes[t];
      }
      acc -= xq.zero[m] * w.colsum[n];
      if (raw != nullptr) {
        raw[m * w.N + n] = acc;
        continue;
      }
      y[m * w.N + n] = static_cast<float>(acc) * (xq.scale[m] * w.scales[n]) + (ep.bias ? ep.bias[n] : 0.0f);
    }
    if (raw == nullptr) finish_tile_scalar(ep, y + m * w.N, 1, w.N, w.N);
  }
}

#if SPARSEC_X86
namespace {

constexpr int kMaxVectors = 8;  // vectors of 16 rows of X per pass: 128 rows

struct WindowJob {
  const uint8_t* q;  // quantized X, rows ld bytes apart, zero past K, 64 bytes of slack after the last
  int64_t M, ld;
  int64_t J;         // windows per row of XW
  int64_t js, ss;    // int32 between windows j and j + 1 of a row, between slices of 16 rows
  int32_t* xw;
};

// Task t: rows [16 t, 16 t + 16) of the quantized X into XW. One 64-byte load of a row at column k0
// (a multiple of 64), read as 16 int32, is its windows at k0 + 4 i; the 16 rows' loads transposed
// are 16 rows of XW.
SPARSEC_VNNI void windows_task(void* data, size_t t) {
  const WindowJob& job = *static_cast<const WindowJob*>(data);
  const int64_t m0 = static_cast<int64_t>(t) * 16;
  const int64_t rows = std::min<int64_t>(16, job.M - m0);
  int32_t* xw = job.xw + static_cast<int64_t>(t) * job.ss;
  for (int64_t k0 = 0; k0 < 4 * job.J; k0 += 64) {
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      r[i] = i < rows ? _mm512_castsi512_ps(_mm512_loadu_si512(job.q + (m0 + i) * job.ld + k0)) : _mm512_setzero_ps();
    }
    transpose16(r);  // r[i]: the window at k0 + 4 i of the 16 rows
    for (int64_t i = 0; i < 16 && k0 / 4 + i < job.J; ++i) {
      _mm512_store_si512(xw + (k0 / 4 + i) * job.js, _mm512_castps_si512(r[i]));
    }
  }
}

// The same XW without AVX-512: one 4-byte load per window and row.
void windows_task_scalar(void* data, size_t t) {
  const WindowJob& job = *static_cast<const WindowJob*>(data);
  const int64_t m0 = static_cast<int64_t>(t) * 16;
  for (int64_t j = 0; j < job.J; ++j) {
    int32_t* out = job.xw + static_cast<int64_t>(t) * job.ss + j * job.js;
    for (int64_t i = 0; i < 16; ++i) {
      int32_t v = 0;
      if (m0 + i < job.M) std::memcpy(&v, job.q + (m0 + i) * job.ld + 4 * j, 4);
      out[i] = v;
    }
  }
}

struct RowJob {
  const PackedInt8* w;
  const int32_t* xw;
  int64_t Mp;
  QuantizedX xq;  // scales and zero points padded to Mp (scale 0, zero 0)
  Epilogue ep;
  float* y;
  int32_t* raw;
  int64_t M;
  int64_t rows_per_task;
  std::vector<int64_t> group_start;  // [groups + 1] output boundaries
};

// The exact sums of output n for the rows [m, m + width) that are below `end` into raw [M, N] (tests).
inline void store_raw(const RowJob& job, const int32_t* lanes, int64_t width, int64_t m, int64_t end, int64_t n) {
  for (int64_t l = 0; l < width && m + l < end; ++l) job.raw[(m + l) * job.w->N + n] = lanes[l];
}

// Outputs [n0, n0 + count) (count <= 16) for the rows [m0, m0 + rows): the exact sums of each output
// over NV vectors of rows, dequantized into `strip` (or copied into raw), then stored as rows of Y.
template <int NV>
SPARSEC_VNNI void strip_vnni(const RowJob& job, int64_t m0, int64_t rows, int64_t n0, int64_t count,
                             float* strip) {
  const PackedInt8& w = *job.w;
  const int32_t* win = reinterpret_cast<const int32_t*>(w.blocks.get());
  const int32_t* xw = job.xw + m0;
  __m512i zero[NV];
  __m512 scale[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    zero[v] = _mm512_loadu_si512(job.xq.zero + m0 + 16 * v);
    scale[v] = _mm512_loadu_ps(job.xq.scale + m0 + 16 * v);
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = n0 + i;
    __m512i acc[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_si512();
    for (int64_t g = w.row_start[n]; g < w.row_start[n + 1]; ++g) {
      const __m512i wv = _mm512_set1_epi32(win[g]);
      const int32_t* xk = xw + (w.cols[g] >> 2) * job.Mp;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = _mm512_dpbusd_epi32(acc[v], _mm512_load_si512(xk + 16 * v), wv);
    }
    const __m512i colsum = _mm512_set1_epi32(w.colsum[n]);
    const __m512 sw = _mm512_set1_ps(w.scales[n]);
    const __m512 bias = _mm512_set1_ps(job.ep.bias ? job.ep.bias[n] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __m512i exact = _mm512_sub_epi32(acc[v], _mm512_mullo_epi32(zero[v], colsum));
      if (job.raw != nullptr) {
        alignas(64) int32_t lanes[16];
        _mm512_store_si512(lanes, exact);
        store_raw(job, lanes, 16, m0 + 16 * v, m0 + rows, n);
        continue;
      }
      _mm512_store_ps(strip + i * 16 * NV + 16 * v,
                      _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_mul_ps(scale[v], sw), bias));
    }
  }
  if (job.raw == nullptr) store_strip_avx512(strip, NV, n0, count, rows, w.N, job.ep, job.y + m0 * w.N);
}

// The AVX2 strip: 8 rows per vector (see the file's comment for the arithmetic).
template <int NV>
SPARSEC_AVX2 void strip_avx2(const RowJob& job, int64_t m0, int64_t rows, int64_t n0, int64_t count, float* strip) {
  const PackedInt8& w = *job.w;
  const int32_t* win = reinterpret_cast<const int32_t*>(w.blocks.get());
  const int32_t* xw = job.xw + m0;
  const __m256i low_bytes = _mm256_set1_epi32(0x00FF00FF);
  __m256i zero[NV];
  __m256 scale[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    zero[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(job.xq.zero + m0 + 8 * v));
    scale[v] = _mm256_loadu_ps(job.xq.scale + m0 + 8 * v);
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = n0 + i;
    __m256i acc[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_si256();
    for (int64_t g = w.row_start[n]; g < w.row_start[n + 1]; ++g) {
      int8_t b[4];
      std::memcpy(b, win + g, 4);
      // int16 pairs (w0, w2) and (w1, w3), sign-extended, each pair one 32-bit lane.
      const __m256i w02 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(b[0]) |
                                                                 (static_cast<uint32_t>(static_cast<uint16_t>(b[2])) << 16)));
      const __m256i w13 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(b[1]) |
                                                                 (static_cast<uint32_t>(static_cast<uint16_t>(b[3])) << 16)));
      const int32_t* xk = xw + (w.cols[g] >> 2) * job.Mp;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xk + 8 * v));
        const __m256i even = _mm256_and_si256(x, low_bytes);  // (x0, x2) as int16
        const __m256i odd = _mm256_srli_epi16(x, 8);          // (x1, x3)
        acc[v] = _mm256_add_epi32(acc[v], _mm256_add_epi32(_mm256_madd_epi16(even, w02), _mm256_madd_epi16(odd, w13)));
      }
    }
    const __m256i colsum = _mm256_set1_epi32(w.colsum[n]);
    const __m256 sw = _mm256_set1_ps(w.scales[n]);
    const __m256 bias = _mm256_set1_ps(job.ep.bias ? job.ep.bias[n] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __m256i exact = _mm256_sub_epi32(acc[v], _mm256_mullo_epi32(zero[v], colsum));
      if (job.raw != nullptr) {
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), exact);
        store_raw(job, lanes, 8, m0 + 8 * v, m0 + rows, n);
        continue;
      }
      _mm256_store_ps(strip + i * 8 * NV + 8 * v,
                      _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), _mm256_mul_ps(scale[v], sw), bias));
    }
  }
  if (job.raw == nullptr) store_strip_avx2(strip, NV, n0, count, rows, w.N, job.ep, job.y + m0 * w.N);
}

// One task of either instruction set: its outputs in strips of kLanes, its rows in vectors.
template <bool kVnni>
void row_task(void* data, size_t t) {
  constexpr int64_t L = kVnni ? 16 : 8;
  const RowJob& job = *static_cast<const RowJob*>(data);
  const TaskSpan span(job.group_start, job.rows_per_task, job.M, t);
  if (span.empty()) return;
  alignas(64) float strip[16 * 16 * kMaxVectors];
  const int64_t nv = ceil_div(span.rows, L);
  for (int64_t n0 = span.r0; n0 < span.r1; n0 += L) {
    const int64_t count = std::min<int64_t>(L, span.r1 - n0);
    const auto run = [&](auto vectors) {
      if constexpr (kVnni) {
        strip_vnni<decltype(vectors)::value>(job, span.m0, span.rows, n0, count, strip);
      } else {
        strip_avx2<decltype(vectors)::value>(job, span.m0, span.rows, n0, count, strip);
      }
    };
    with_vectors(nv, run);
  }
}

}  // namespace

const int32_t* transpose_windows(const QuantizedX& xq, int64_t M, int64_t Mp, int64_t J, bool slices, bool vnni,
                                 bool threads, ParallelFor parallel_for, void* runner_state) {
  thread_local AlignedScratch<int32_t> xw_buffer;  // reused across calls
  int32_t* xw = xw_buffer.reserve(static_cast<size_t>(J * Mp));
  WindowJob job{xq.data, M, xq.ld, J, slices ? 16 : Mp, slices ? 16 * J : 16, xw};
  const size_t transposes = static_cast<size_t>(Mp / 16);
  void (*build)(void*, size_t) = vnni ? windows_task : windows_task_scalar;
  if (threads && transposes > 1) {
    parallel_for(runner_state, build, transposes, &job);
  } else {
    for (size_t t = 0; t < transposes; ++t) build(&job, t);
  }
  return xw;
}

QuantizedX padded_row_parameters(const QuantizedX& xq, int64_t M, int64_t Mp) {
  thread_local AlignedScratch<float> scale_buffer;  // reused across calls
  thread_local AlignedScratch<int32_t> zero_buffer;
  float* scale = scale_buffer.reserve(static_cast<size_t>(Mp));
  int32_t* zero = zero_buffer.reserve(static_cast<size_t>(Mp));
  std::copy(xq.scale, xq.scale + M, scale);
  std::copy(xq.zero, xq.zero + M, zero);
  std::fill(scale + M, scale + Mp, 0.0f);
  std::fill(zero + M, zero + Mp, 0);
  return QuantizedX{xq.data, xq.ld, scale, zero};
}

void windows_simd(const PackedInt8& w, const QuantizedX& xq, int64_t M, const Epilogue& ep, float* y, int32_t* raw,
                  Isa isa, bool threads, ParallelFor parallel_for, void* runner_state) {
  const bool vnni = isa == Isa::kAvx512;
  const int64_t Mp = ceil_div(M, 16) * 16;
  const int32_t* xw = transpose_windows(xq, M, Mp, ceil_div(w.K, 4), false, vnni, threads, parallel_for, runner_state);
  const int64_t rows_per_task = (vnni ? 16 : 8) * kMaxVectors;
  const int64_t row_tasks = ceil_div(M, rows_per_task);
  static const int64_t target_tasks = kTasksPerCore * std::max<int64_t>(2, std::thread::hardware_concurrency());
  const int64_t groups = std::min(w.N, std::max<int64_t>(1, ceil_div(target_tasks, row_tasks)));
  Epilogue e = ep;
  e.y = y;
  RowJob job{&w, xw, Mp, padded_row_parameters(xq, M, Mp), e, y, raw, M, rows_per_task,
             balanced_groups(w.row_start, groups)};
  const size_t total = static_cast<size_t>(row_tasks * (static_cast<int64_t>(job.group_start.size()) - 1));
  void (*task)(void*, size_t) = vnni ? row_task<true> : row_task<false>;
  if (total == 1 || !threads) {
    for (size_t t = 0; t < total; ++t) task(&job, t);
  } else {
    parallel_for(runner_state, task, total, &job);
  }
}
#endif  // SPARSEC_X86

}  // namespace detail
}  // namespace sparsec
