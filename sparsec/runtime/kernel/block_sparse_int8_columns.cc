// The INT8 column path (AVX-512 VNNI): row vectors [1, 4 j] of INT8 compute taken column by column,
// as the fp32 column path (block_sparse_columns.cc) takes them.
//
// The row path (block_sparse_int8_rows.cc) runs one vpdpbusd per 4-byte window of weights and
// vector of 16 rows, whose second operand is a 64-byte load of XW (the quantized X as windows):
// every instruction reads a full vector, from L2 in BERT-base's layers, the form that ran fp32's row
// path at 2.2-2.7 cycles per FMA on AMD Zen 4 where a register and a broadcast ran at 1.1-1.2.
//
// A vector's windows are contiguous, so with columns of W inputs (V = W / 4 windows: 4, 3, 2 or 1)
// the V vectors of XW a column needs stay in registers while every output with a vector there runs:
//
//   for each slice of 16 rows of X, each band of outputs, each column c (windows [V c, V c + V)):
//     x[j] = XW[V c + j] (16 rows, int32 lanes of 4 bytes), j < V                  V loads
//     for each output n of the band with a vector at column c, eight at a time:
//       acc[n] (16 rows, int32, in L1) += sum over j of dot4(x[j], window[n, V c + j])
//                                              V vpdpbusd, each with a broadcast window
//
// The sums are exact (u8 x s8 products added into int32, no saturation), the same integers as the
// row path's and the block path's, and |acc| <= 255 * 128 * K < 2^31 for K <= kMaxInt8K. Once a
// band's columns are done, 16 outputs at a time are dequantized,
//   Y[m, n] = sx[m] * sw[n] * (acc[m, n] - zx[m] * colsum[n]) + bias[n],
// and transposed into rows of Y with the fp32 epilogue (store_strip_avx512).
//
// XW is built by slices of 16 rows ([Mp / 16][ncols V][16], transpose_windows) so that a task reads
// its slice as one stream. The weights are repacked once, when the kernel is created, from the row
// path's windows into (band, column) order: per entry, the output's index and its V windows (zero
// where the vector has none, or past K), and the row path's windows are released.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "block_sparse_internal.h"

namespace sparsec {

using namespace detail;  // NOLINT: the shared helpers of block_sparse_internal.h

bool columns_pay_int8(const PackedInt8& w, Isa isa) {
  return (isa == Isa::kAvx512 || isa == Isa::kAmx) && w.windows && column_width(w.BC) > 0 && w.N <= INT32_MAX / 16 &&
         w.blocks != nullptr && !w.columns.active();
}

void pack_columns_int8(PackedInt8& w) {
  ColumnIndex& ci = w.columns;
  begin_columns(ci, column_width(w.BC), w.K, w.row_start);  // BR == 1: one output per row
  const int64_t V = ci.W / 4, ncols = ci.ncols;
  const int32_t* windows = reinterpret_cast<const int32_t*>(w.blocks.get());
  // An entry: the run of output n's windows [g0, g1) in one column (its windows ascend by column).
  struct Run {
    int64_t g0, g1;
  };
  auto each_run = [&](auto&& visit) {
    for (int64_t b = 0; b < ci.bands(); ++b) {
      for (int64_t n = ci.band_start[b]; n < ci.band_start[b + 1]; ++n) {
        for (int64_t g = w.row_start[n]; g < w.row_start[n + 1];) {
          const int64_t c = w.cols[g] / 4 / V;
          int64_t end = g + 1;
          while (end < w.row_start[n + 1] && w.cols[end] / 4 / V == c) ++end;
          visit(b * ncols + c, n, Run{g, end});
          g = end;
        }
      }
    }
  };
  int32_t* packed = nullptr;
  ByteBuffer bytes;
  const auto allocate = [&](int64_t entries) {
    const size_t size = static_cast<size_t>((std::max<int64_t>(entries * V * 4, 1) + 63) / 64 * 64);
    void* p = std::aligned_alloc(64, size);
    if (p == nullptr) throw std::bad_alloc();
    std::memset(p, 0, size);
    bytes = ByteBuffer(static_cast<int8_t*>(p));
    packed = static_cast<int32_t*>(p);
  };
  const auto place = [&](int64_t e, int64_t, const Run& run) {
    // Windows start below K (the row path keeps none past it) and hold zeros at columns >= K.
    for (int64_t g = run.g0; g < run.g1; ++g) packed[e * V + (w.cols[g] / 4) % V] = windows[g];
  };
  lay_out_columns(ci, each_run, allocate, place);
  w.blocks = std::move(bytes);  // the column pack replaces the row path's windows
  w.cols.clear();
  w.cols.shrink_to_fit();
  w.counted = PackedBytes(static_cast<int64_t>(ci.out.size()) * (V * 4 + 4));
}

#if SPARSEC_X86
namespace {

struct ColumnJob {
  const PackedInt8* w;
  const int32_t* xw;  // slice s of 16 rows at xw + s * J * 16, window j of it at + j * 16
  int64_t J;          // ncols * V
  QuantizedX xq;      // scales and zero points padded to a multiple of 16 rows
  Epilogue ep;
  float* y;
  int32_t* raw;
  int64_t M;
};

// acc[i] += sum over j < V of dot4(x[j], window[i][j]) for G entries (their sums at sums + out[i];
// band-local offsets measured 0.95-0.98x the time of output indices less the band's first).
template <int V, int G>
SPARSEC_VNNI SPARSEC_INLINE void add_entries(const int32_t* windows, const int32_t* out, const __m512i (&x)[V],
                                             int32_t* sums) {
  __m512i acc[G];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) acc[i] = _mm512_load_si512(sums + out[i]);
#pragma GCC unroll 4
  for (int j = 0; j < V; ++j) {
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], x[j], _mm512_set1_epi32(windows[i * V + j]));
  }
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) _mm512_store_si512(sums + out[i], acc[i]);
}

// Task t: slice t / bands (16 rows of X), band t % bands.
template <int V>
SPARSEC_VNNI void column_task(void* data, size_t t) {
  const ColumnJob& job = *static_cast<const ColumnJob*>(data);
  const PackedInt8& w = *job.w;
  const ColumnIndex& ci = w.columns;
  const int64_t ncols = ci.ncols;
  const auto [band, m0, first, last] = column_slot(ci, t);
  if (first == last) return;
  const int32_t* xs = job.xw + m0 * job.J;  // slice m0 / 16
  const int32_t* windows = reinterpret_cast<const int32_t*>(w.blocks.get());
  // The band's sums, [output][16 rows], in a buffer of the thread running the task.
  thread_local AlignedScratch<int32_t> sums_buffer;
  int32_t* sums = sums_buffer.reserve(static_cast<size_t>((last - first) * 16));
  std::memset(sums, 0, static_cast<size_t>((last - first) * 16) * sizeof(int32_t));
  const int64_t* col_start = ci.col_start.data() + band * ncols;
  for (int64_t c = 0; c < ncols; ++c) {
    int64_t e = col_start[c];
    const int64_t end = col_start[c + 1];
    if (e == end) continue;
    __m512i x[V];
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) x[j] = _mm512_load_si512(xs + (c * V + j) * 16);
    for (; e + 8 <= end; e += 8) add_entries<V, 8>(windows + e * V, ci.out.data() + e, x, sums);
    if (e + 4 <= end) {
      add_entries<V, 4>(windows + e * V, ci.out.data() + e, x, sums);
      e += 4;
    }
    for (; e < end; ++e) add_entries<V, 1>(windows + e * V, ci.out.data() + e, x, sums);
  }
  const int64_t rows = std::min<int64_t>(16, job.M - m0);
  const __m512i zero = _mm512_loadu_si512(job.xq.zero + m0);
  const __m512 scale = _mm512_loadu_ps(job.xq.scale + m0);
  alignas(64) float strip[16 * 16];
  for (int64_t n0 = first; n0 < last; n0 += 16) {
    const int64_t count = std::min<int64_t>(16, last - n0);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n = n0 + i;
      const __m512i exact = _mm512_sub_epi32(_mm512_load_si512(sums + 16 * (n - first)),
                                             _mm512_mullo_epi32(zero, _mm512_set1_epi32(w.colsum[n])));
      if (job.raw != nullptr) {
        alignas(64) int32_t lanes[16];
        _mm512_store_si512(lanes, exact);
        for (int64_t l = 0; l < rows; ++l) job.raw[(m0 + l) * w.N + n] = lanes[l];
        continue;
      }
      const __m512 bias = _mm512_set1_ps(job.ep.bias != nullptr ? job.ep.bias[n] : 0.0f);
      _mm512_store_ps(strip + i * 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact),
                                                      _mm512_mul_ps(scale, _mm512_set1_ps(w.scales[n])), bias));
    }
    if (job.raw == nullptr) store_strip_avx512(strip, 1, n0, count, rows, w.N, job.ep, job.y + m0 * w.N);
  }
}

}  // namespace

namespace detail {

void windows_columns(const PackedInt8& w, const QuantizedX& xq, int64_t M, const Epilogue& ep, float* y,
                     int32_t* raw, bool threads, ParallelFor parallel_for, void* runner_state) {
  const ColumnIndex& ci = w.columns;
  const int64_t V = ci.W / 4, J = ci.ncols * V;
  const int64_t Mp = ceil_div(M, 16) * 16;
  const int32_t* xw = transpose_windows(xq, M, Mp, J, true, true, threads, parallel_for, runner_state);
  Epilogue e = ep;
  e.y = y;
  ColumnJob job{&w, xw, J, padded_row_parameters(xq, M, Mp), e, y, raw, M};
  void (*task)(void*, size_t) = V == 4 ? column_task<4> : V == 3 ? column_task<3> : V == 2 ? column_task<2>
                                                                                         : column_task<1>;
  const size_t total = static_cast<size_t>(ceil_div(M, 16) * ci.bands());
  if (total == 1 || !threads) {
    for (size_t t = 0; t < total; ++t) task(&job, t);
  } else {
    parallel_for(runner_state, task, total, &job);
  }
}

}  // namespace detail
#endif  // SPARSEC_X86

}  // namespace sparsec
