// The column path (AVX-512, and AVX2 below): row vectors [1, 4 j] taken column by column.
//
// The row path (block_sparse_rows.cc) multiplies each kept weight, broadcast, by a 64-byte vector of
// X^T (16 rows of X at the weight's input): every multiply-add also loads a full vector, and on AMD
// Zen 4 such a loop runs at about 1.6 cycles per FMA even from L1 (2.2-2.7 in BERT-base's layers,
// X^T coming from L2), against 1.1-1.2 for a loop whose FMAs take one register operand and a
// broadcast scalar, as the block path's [16, 1] tiles do.
//
// A vector's inputs are contiguous, so the vectors of X^T it needs can stay in registers while every
// output that keeps a vector at those inputs is done. With columns of W inputs (16, 12, 8 or 4: the
// widest that divides the vector's width):
//
//   for each slice of 16 rows of X, each band of outputs, each column c (inputs [W c, W c + W)):
//     x[j] = X^T[W c + j] (16 rows), j < W                                   W loads
//     for each output n of the band with a vector at column c, eight at a time:
//       acc[n] (16 rows, in L1) += sum over j of weight[n, W c + j] * x[j]    W FMAs, W broadcasts
//
// so each FMA reads one broadcast weight and a register, and each output's 16 sums are loaded and
// stored once per column it keeps. Eight outputs at a time give eight independent chains of W FMAs.
// Zen 4, 10% density, 2 threads: [1, 16] layers 0.52-0.63x the row path's time, [1, 4] 0.61,
// [1, 12] 0.57-0.60 (with columns of 4 instead: 0.71-0.73).
// The weights are repacked once (pack_columns) into that order: per band and column, the outputs'
// indices and their W weights; a [1, 32] vector is two such entries. The bands split the outputs by
// kept weights, so that a task (one slice, one band) keeps its band's sums in L1 (384 outputs x 64
// bytes = 24 KB at N = 3072) and the tasks are many enough for the pool.
#include <algorithm>
#include <cstdint>
#include <thread>

#include "block_sparse_internal.h"

namespace sparsec {

using namespace detail;  // NOLINT: the shared helpers of block_sparse_internal.h

namespace {

constexpr int64_t kBandOutputs = 384;     // outputs per band, about (24 KB of sums in L1)
constexpr int64_t kMaxBands = 64;

}  // namespace

namespace detail {

int64_t column_width(int64_t BC, Isa isa) {
  for (const int64_t width : {16, 12, 8, 4}) {
    if (isa == Isa::kAvx2 && width > 8) continue;
    if (BC % width == 0) return width;
  }
  return 0;
}

void begin_columns(ColumnIndex& ci, int64_t W, int64_t K, const std::vector<int64_t>& row_start) {
  ci.W = W;
  ci.ncols = ceil_div(K, W);
  const int64_t outputs = static_cast<int64_t>(row_start.size()) - 1;
  ci.band_start = balanced_groups(row_start, std::clamp<int64_t>(outputs / kBandOutputs, 1, kMaxBands));
}

}  // namespace detail

bool columns_pay(const PackedWeight& w, Isa isa) {
  return (isa == Isa::kAvx512 || isa == Isa::kAvx2) && w.BR == 1 && column_width(w.BC, isa) > 0 &&
         w.N <= INT32_MAX / 16 && w.blocks != nullptr;
}

void pack_columns(PackedWeight& w, Isa isa) {
  ColumnPack& cp = w.columns;
  cp.isa = isa == Isa::kAvx2 ? Isa::kAvx2 : Isa::kAvx512;
  begin_columns(cp, column_width(w.BC, cp.isa), w.K, w.row_start);  // one output per block row
  const int64_t W = cp.W, ncols = cp.ncols, per_block = w.BC / W;
  // Each W-wide part of each kept vector is an entry; parts wholly past K hold nothing and are skipped.
  auto each_part = [&](auto&& visit) {
    for (int64_t b = 0; b < cp.bands(); ++b) {
      for (int64_t n = cp.band_start[b]; n < cp.band_start[b + 1]; ++n) {
        for (int64_t k = w.row_start[n]; k < w.row_start[n + 1]; ++k) {
          for (int64_t s = 0; s < per_block && w.cols[k] / W + s < ncols; ++s) {
            visit(b * ncols + w.cols[k] / W + s, n, w.block(k) + s * W);
          }
        }
      }
    }
  };
  const auto allocate = [&](int64_t entries) { cp.values = zeroed_floats(static_cast<size_t>(entries * W)); };
  const auto place = [&](int64_t e, int64_t slot, const float* part) {
    // Past K the vector holds no weight: zeros, whatever the file says (X^T is zero there too).
    const int64_t valid = std::min(W, w.K - (slot % ncols) * W);
    std::copy(part, part + valid, cp.values.get() + e * W);
  };
  lay_out_columns(cp, each_part, allocate, place);
  w.counted = PackedBytes(static_cast<int64_t>(cp.out.size()) * W * static_cast<int64_t>(sizeof(float)));
  w.blocks.reset();  // the column pack replaces them
}

#if SPARSEC_X86
namespace {

struct ColumnJob {
  const PackedWeight* w;
  const float* xs;  // X^T by slices of 16 rows, each [ncols W][16]
  Epilogue ep;
  float* y;
  int64_t M;
};

// acc[i] += sum over j < W of weight[i][j] * x[j] for G entries from e (their sums at sums + out[i]:
// band-local offsets, one sub and shift fewer per entry than output indices, 0.97-1.0x the time).
template <int W, int G>
SPARSEC_AVX512 SPARSEC_INLINE void add_entries(const ColumnPack& cp, int64_t e, const __m512 (&x)[W], float* sums) {
  const float* v = cp.values.get() + e * W;
  const int32_t* out = cp.out.data() + e;
  __m512 acc[G];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) acc[i] = _mm512_load_ps(sums + out[i]);
#pragma GCC unroll 16
  for (int j = 0; j < W; ++j) {
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(v[i * W + j]), x[j], acc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) _mm512_store_ps(sums + out[i], acc[i]);
}

// Task t: slice t / bands (16 rows of X), band t % bands.
template <int W>
SPARSEC_AVX512 void column_task(void* data, size_t t) {
  const ColumnJob& job = *static_cast<const ColumnJob*>(data);
  const PackedWeight& w = *job.w;
  const ColumnPack& cp = w.columns;
  const int64_t ncols = cp.ncols;
  const auto [band, m0, first, last] = column_slot(cp, t);
  if (first == last) return;
  const float* xs = job.xs + m0 * ncols * W;  // slice m0 / 16
  // The band's sums, [output][16 rows], in a buffer of the thread running the task.
  thread_local AlignedScratch<float> sums_buffer;
  float* sums = sums_buffer.reserve(static_cast<size_t>((last - first) * 16));
  for (int64_t n = first; n < last; ++n) {
    _mm512_store_ps(sums + 16 * (n - first), _mm512_set1_ps(job.ep.bias != nullptr ? job.ep.bias[n] : 0.0f));
  }
  const int64_t* col_start = cp.col_start.data() + band * ncols;
  for (int64_t c = 0; c < ncols; ++c) {
    int64_t e = col_start[c];
    const int64_t end = col_start[c + 1];
    if (e == end) continue;
    __m512 x[W];
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) x[j] = _mm512_load_ps(xs + (c * W + j) * 16);
    for (; e + 8 <= end; e += 8) add_entries<W, 8>(cp, e, x, sums);
    if (e + 4 <= end) {
      add_entries<W, 4>(cp, e, x, sums);
      e += 4;
    }
    for (; e < end; ++e) add_entries<W, 1>(cp, e, x, sums);
  }
  const int64_t rows = std::min<int64_t>(16, job.M - m0);
  float* y = job.y + m0 * w.N;
  for (int64_t n0 = first; n0 < last; n0 += 16) {
    store_strip_avx512(sums + 16 * (n0 - first), 1, n0, std::min<int64_t>(16, last - n0), rows, w.N, job.ep, y);
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2: columns of W = 8 or 4 inputs, each slice of 16 rows as two halves of 8 (one ymm per input).
// A slice of more than 8 rows takes both halves at once (add_entries_avx2_both): four inputs' x in 8
// registers, three entries' 6 sums, so that each broadcast weight feeds two FMAs (7 loads per 8 FMAs
// instead of 10, one pass over the entries instead of two). AMD Zen 3, density 0.1, 128 rows, against
// one half at a time: [1, 16] layers 0.80-0.87x the time, [1, 8] 0.84-0.86x, [1, 4] 0.72x, [1, 12]
// 0.70x, [1, 32] 0.82x; BERT-base [1, 16] on two threads 0.85-0.87x. Columns of 4 throughout would
// lose 15% on a slice of 8 rows (fewer inputs per entry) and gain nothing on BERT-base (1.00x).
// A slice of at most 8 rows: one half, six entries at a time (W + 6 + 1 of the 16 ymm registers).

template <int W, int G>
SPARSEC_AVX2 SPARSEC_INLINE void add_entries_avx2(const ColumnPack& cp, int64_t e, const __m256 (&x)[W],
                                                  float* sums) {
  const float* v = cp.values.get() + e * W;
  const int32_t* out = cp.out.data() + e;
  __m256 acc[G];
#pragma GCC unroll 6
  for (int i = 0; i < G; ++i) acc[i] = _mm256_load_ps(sums + out[i]);
#pragma GCC unroll 8
  for (int j = 0; j < W; ++j) {
#pragma GCC unroll 6
    for (int i = 0; i < G; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(v + i * W + j), x[j], acc[i]);
  }
#pragma GCC unroll 6
  for (int i = 0; i < G; ++i) _mm256_store_ps(sums + out[i], acc[i]);
}

// Both halves of the slice at once, four inputs at a time: x[h][j] = X^T[W c + 4 s + j], rows 8 h to
// 8 h + 8 (8 registers), G entries with two sums each (acc); every broadcast weight feeds two FMAs.
// v: the entries' weights for these four inputs, entry i's at v + i * W.
template <int W, int G>
SPARSEC_AVX2 SPARSEC_INLINE void step_both_avx2(__m256 (&acc)[G][2], const float* v, const __m256 (&x)[2][4]) {
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
#pragma GCC unroll 3
    for (int i = 0; i < G; ++i) {
      const __m256 b = _mm256_broadcast_ss(v + i * W + j);
      acc[i][0] = _mm256_fmadd_ps(b, x[0][j], acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(b, x[1][j], acc[i][1]);
    }
  }
}

// G entries from e: their sums loaded, W / 4 steps (x given for W = 4; for W = 8 loaded from the
// column's X^T xc at each step, from L1, the sums staying in registers), the sums stored.
template <int W, int G>
SPARSEC_AVX2 SPARSEC_INLINE void add_entries_avx2_both(const float* __restrict v, const int32_t* __restrict out,
                                                       const __m256 (&x4)[2][4], const float* __restrict xc,
                                                       float* __restrict sums) {
  __m256 acc[G][2];
#pragma GCC unroll 3
  for (int i = 0; i < G; ++i) {
    acc[i][0] = _mm256_load_ps(sums + out[i]);
    acc[i][1] = _mm256_load_ps(sums + out[i] + 8);
  }
  if (W == 4) {
    step_both_avx2<W, G>(acc, v, x4);
  } else {
#pragma GCC unroll 2
    for (int s = 0; s < W / 4; ++s) {
      __m256 x[2][4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        x[0][j] = _mm256_load_ps(xc + (4 * s + j) * 16);
        x[1][j] = _mm256_load_ps(xc + (4 * s + j) * 16 + 8);
      }
      step_both_avx2<W, G>(acc, v + 4 * s, x);
    }
  }
#pragma GCC unroll 3
  for (int i = 0; i < G; ++i) {
    _mm256_store_ps(sums + out[i], acc[i][0]);
    _mm256_store_ps(sums + out[i] + 8, acc[i][1]);
  }
}

template <int W>
SPARSEC_AVX2 void column_task_avx2(void* data, size_t t) {
  const ColumnJob& job = *static_cast<const ColumnJob*>(data);
  const PackedWeight& w = *job.w;
  const ColumnPack& cp = w.columns;
  const int64_t ncols = cp.ncols;
  const auto [band, m0, first, last] = column_slot(cp, t);
  if (first == last) return;
  const float* xs = job.xs + m0 * ncols * W;
  thread_local AlignedScratch<float> sums_buffer;
  float* sums = sums_buffer.reserve(static_cast<size_t>((last - first) * 16));
  for (int64_t n = first; n < last; ++n) {
    const __m256 b = _mm256_set1_ps(job.ep.bias != nullptr ? job.ep.bias[n] : 0.0f);
    _mm256_store_ps(sums + 16 * (n - first), b);
    _mm256_store_ps(sums + 16 * (n - first) + 8, b);
  }
  const int64_t rows = std::min<int64_t>(16, job.M - m0);
  const int64_t* col_start = cp.col_start.data() + band * ncols;
  const float* values = cp.values.get();
  const int32_t* out = cp.out.data();
  for (int64_t c = 0; c < ncols; ++c) {
    int64_t e = col_start[c];
    const int64_t end = col_start[c + 1];
    if (e == end) continue;
    const float* xc = xs + c * W * 16;
    if (rows > 8) {
      __m256 x[2][4];  // columns of 4: their X^T, loaded once for the column
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        x[0][j] = W == 4 ? _mm256_load_ps(xc + j * 16) : _mm256_setzero_ps();
        x[1][j] = W == 4 ? _mm256_load_ps(xc + j * 16 + 8) : _mm256_setzero_ps();
      }
      for (; e + 3 <= end; e += 3) add_entries_avx2_both<W, 3>(values + e * W, out + e, x, xc, sums);
      for (; e < end; ++e) add_entries_avx2_both<W, 1>(values + e * W, out + e, x, xc, sums);
    } else {
      __m256 x[W];
#pragma GCC unroll 8
      for (int j = 0; j < W; ++j) x[j] = _mm256_load_ps(xc + j * 16);
      for (; e + 6 <= end; e += 6) add_entries_avx2<W, 6>(cp, e, x, sums);
      if (e + 3 <= end) {
        add_entries_avx2<W, 3>(cp, e, x, sums);
        e += 3;
      }
      for (; e < end; ++e) add_entries_avx2<W, 1>(cp, e, x, sums);
    }
  }
  float* y = job.y + m0 * w.N;
  for (int64_t n0 = first; n0 < last; n0 += 8) {
    store_strip_avx2(sums + 16 * (n0 - first), 2, n0, std::min<int64_t>(8, last - n0), rows, w.N, job.ep, y);
  }
}

}  // namespace
#endif  // SPARSEC_X86

namespace detail {

void block_sparse_columns(const PackedWeight& w, const float* x, const Epilogue& epilogue, float* y, int64_t M,
                          ParallelFor parallel_for, void* runner_state) {
#if SPARSEC_X86
  const ColumnPack& cp = w.columns;
  const int64_t macs = M * w.row_start[w.R] * w.BC;
  const bool threads = parallel_for != nullptr && macs >= kSerialMacs;
  const bool avx512 = cp.isa == Isa::kAvx512;
  const float* xs = transpose_slices(x, M, w.K, cp.ncols * cp.W, avx512, threads, parallel_for, runner_state);
  Epilogue ep = epilogue;
  ep.y = y;
  ColumnJob job{&w, xs, ep, y, M};
  void (*task)(void*, size_t) = !avx512      ? (cp.W == 8 ? column_task_avx2<8> : column_task_avx2<4>)
                                : cp.W == 16 ? column_task<16>
                                : cp.W == 12 ? column_task<12>
                                : cp.W == 8  ? column_task<8>
                                             : column_task<4>;
  const size_t total = static_cast<size_t>(ceil_div(M, 16) * cp.bands());
  if (total == 1 || !threads) {
    for (size_t t = 0; t < total; ++t) task(&job, t);
  } else {
    parallel_for(runner_state, task, total, &job);
  }
#else
  (void)w, (void)x, (void)epilogue, (void)y, (void)M, (void)parallel_for, (void)runner_state;
#endif
}

}  // namespace detail
}  // namespace sparsec
