// The row path: block rows one output high (BR == 1), i.e. unstructured masks ([1, 1]) and row
// vectors ([1, 8], [1, 16], ...; on AVX-512 those 4 j wide were repacked for the column path,
// block_sparse_columns.cc, which block_sparse_rows hands them to). The block path vectorises over the BR outputs of a block row, so
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
//
// Three choices measured on AMD Zen 5 (bench/kernel_ab.py, density 0.1):
// - Unstructured masks on AVX-512 take two slices per pass of rows: each kept weight (its value and
//   its column, 12 bytes) is read once for 32 rows, two multiply-adds for four loads where one
//   slice had one for three (one thread: 768 x 3072 0.85x the time, 3072 x 768 0.92x). Three or
//   four slices, or two sums per slice, were no better; [1, 16] vectors, whose inputs are
//   contiguous already, measured 0.98-1.10x, so they keep one slice. AVX2 (AMD Zen 3) takes two
//   slices where both fit in 256 KiB (K <= 2048), with two sums per half slice, 8 accumulators:
//   one thread 3072 x 768 0.94x, BERT-base unstructured on two threads 0.91-0.95x; at K = 3072
//   (two slices 384 KiB of a 512 KiB L2) 1.00-1.05x, so one slice there, with four sums per half
//   (8 accumulators, as every AVX2 choice here; two sums: 4 chains of FMAs at 4 cycles of latency,
//   768 x 3072 on 2 threads 0.96-0.99x, BERT-base 0.98-0.99x). Four slices (one sum
//   per half) where they fit in 256 KiB (K <= 1024): 0.97-0.98x more. Narrow slices of 8 rows
//   ([K][8], 24 KiB at K = 768, in L1) ran 1.2-1.34x slower: the weights are read twice as often.
// - Where all of X^T fits in half of a 1 MiB L2 (128 rows at K = 768: 393 KB), a task is one group
//   of outputs over every pass, so that the group's weights come from memory once per call and
//   from L2 for the other passes; otherwise a task is one pass and one group, and the pass's slices
//   are shared by the groups. This pays where the weights come cold from memory, as in a whole
//   model (BERT-base unstructured, about 100 MB of values and columns: 0.93-0.95x with 16 groups;
//   [1, 16] 0.97-1.03x; AVX2 unstructured 0.95-0.99x), and not on a single layer, whose weights
//   stay in L3 between calls (0.99-1.03x). Every pass inside the tasks at K = 3072 as well: 0.99x.
// - Unstructured weights give each weight's input as a 32-bit offset into the slice (16 * k,
//   PackedWeight::slice_at) instead of the 64-bit column: 8 bytes a weight instead of 12, and no
//   shift (BERT-base unstructured 0.88x; single layers 0.94-0.96x; 16-bit columns, 6 bytes a
//   weight with a shift back, no better: 0.98-1.04x).
// The first two together, BERT-base unstructured on two threads: 0.87x; all three: about 0.77x.
#include <algorithm>
#include <thread>

#include "block_sparse_internal.h"

namespace sparsec {
namespace detail {

bool row_path(const PackedWeight& w, Isa isa) {
  // Unstructured weights need their inputs' offsets in 32 bits (K < 2^27); beyond, the scalar path.
  return w.BR == 1 && (w.BC > 1 || slice_offsets_fit(w.K)) && (isa == Isa::kAvx512 || isa == Isa::kAvx2);
}

}  // namespace detail

#if SPARSEC_X86
namespace {

using namespace detail;  // NOLINT: the shared helpers of block_sparse_internal.h

constexpr int64_t kAllPassesBytes = 512 * 1024;  // X^T up to this: every pass inside each task

struct RowJob {
  const PackedWeight* w;
  const float* xs;  // the slices of X^T
  Epilogue ep;
  float* y;
  int64_t M;
  int64_t slices;  // per pass of rows: slices_per_pass
  bool all_passes;  // a task runs its group over every pass (else over one)
  std::vector<int64_t> group_start;  // [groups + 1] output boundaries (one output per block row)
};

struct TransposeJob {
  const float* x;
  int64_t M, K, Kp;
  float* xs;
};

// Rows [K, Kp) of a slice: zeros.
void zero_tail(const TransposeJob& job, float* xs) {
  std::fill(xs + job.K * 16, xs + job.Kp * 16, 0.0f);
}

// Task t: slice t (rows [16 t, 16 t + 16) of X, zeros past M) as [Kp][16].
SPARSEC_AVX512 void transpose_task(void* data, size_t t) {
  const TransposeJob& job = *static_cast<const TransposeJob*>(data);
  const int64_t m0 = static_cast<int64_t>(t) * 16;
  const int64_t rows = std::min<int64_t>(16, job.M - m0);
  float* xs = job.xs + static_cast<int64_t>(t) * job.Kp * 16;
  zero_tail(job, xs);
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

// Sum a of every slice += weight * its input's 16 rows in that slice (xk: the input in the first).
template <int S, int A>
SPARSEC_AVX512 SPARSEC_INLINE void add_slices(__m512 (&acc)[S][A], int a, float weight, const float* xk,
                                              int64_t slice) {
  const __m512 wv = _mm512_set1_ps(weight);
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) acc[s][a] = _mm512_fmadd_ps(wv, _mm512_load_ps(xk + s * slice), acc[s][a]);
}

// Outputs [n0, n0 + count) (count <= 16) on S consecutive slices from xs (each K x 16 floats):
// output i's 16 sums of slice s (bias included) at strip + 16 (S i + s), the layout that
// store_strip_avx512 reads with nv = S. Each slice keeps four running sums.
template <int S>
SPARSEC_AVX512 void outputs_avx512(const PackedWeight& w, int64_t n0, int64_t count, const float* xs,
                                   const float* bias, float* strip) {
  constexpr int A = 4;
  const int64_t K = w.K, BC = w.BC;
  const int64_t* cols = w.cols.data();
  const int64_t slice = K * 16;
  const int32_t* at = w.slice_at.data();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = n0 + i;
    __m512 acc[S][A];
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) acc[s][a] = _mm512_setzero_ps();
    }
    int64_t b = w.row_start[n];
    const int64_t end = w.row_start[n + 1];
    if (BC == 1) {  // unstructured: block b is the single weight blocks[b], its input at xs + at[b]
      const float* v = w.blocks.get();
      for (; b + A <= end; b += A) {
#pragma GCC unroll 4
        for (int a = 0; a < A; ++a) add_slices(acc, a, v[b + a], xs + at[b + a], slice);
      }
      for (; b < end; ++b) add_slices(acc, 0, v[b], xs + at[b], slice);
    } else {
      for (; b < end; ++b) {
        const float* wb = w.block(b);
        const float* xk = xs + cols[b] * 16;
        const int64_t jn = std::min(BC, K - cols[b]);
        int64_t j = 0;
        for (; j + A <= jn; j += A) {
#pragma GCC unroll 4
          for (int a = 0; a < A; ++a) add_slices(acc, a, wb[j + a], xk + (j + a) * 16, slice);
        }
        for (; j < jn; ++j) add_slices(acc, 0, wb[j], xk + j * 16, slice);
      }
    }
    const __m512 bv = _mm512_set1_ps(bias ? bias[n] : 0.0f);
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[s][0], acc[s][1]), _mm512_add_ps(acc[s][2], acc[s][3]));
      _mm512_store_ps(strip + 16 * (S * i + s), _mm512_add_ps(sum, bv));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2: the same slices, each as two halves of 8 lanes.

// Task t: slice t (rows [16 t, 16 t + 16) of X, zeros past M) as [Kp][16], by 8 x 8 transposes.
SPARSEC_AVX2 void transpose_task_avx2(void* data, size_t t) {
  const TransposeJob& job = *static_cast<const TransposeJob*>(data);
  float* xs = job.xs + static_cast<int64_t>(t) * job.Kp * 16;
  zero_tail(job, xs);
  for (int64_t h = 0; h < 2; ++h) {
    const int64_t m0 = static_cast<int64_t>(t) * 16 + 8 * h;
    const int64_t rows = std::min<int64_t>(8, job.M - m0);
    for (int64_t k0 = 0; k0 < job.K; k0 += 8) {
      const __m256i cols = lane_mask8(job.K - k0);
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

// Sums a of every slice's two halves += the weight at wv times its input's 16 rows in that slice
// (xk: the input in the first).
template <int S, int A>
SPARSEC_AVX2 SPARSEC_INLINE void add_slices_avx2(__m256 (&lo)[S][A], __m256 (&hi)[S][A], int a, const float* wv,
                                                 const float* xk, int64_t slice) {
  const __m256 v = _mm256_broadcast_ss(wv);
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s) {
    lo[s][a] = _mm256_fmadd_ps(v, _mm256_load_ps(xk + s * slice), lo[s][a]);
    hi[s][a] = _mm256_fmadd_ps(v, _mm256_load_ps(xk + s * slice + 8), hi[s][a]);
  }
}

// Unstructured weights on S consecutive slices, each slice's 16 rows as two halves of 8 with A
// running sums per half (2 S A accumulators): output i's sums of slice s at strip + 16 (S i + s).
template <int S, int A>
SPARSEC_AVX2 void unstructured_avx2(const PackedWeight& w, int64_t n0, int64_t count, const float* xs,
                                    const float* bias, float* strip) {
  const int64_t slice = w.K * 16;
  const float* v = w.blocks.get();
  const int32_t* at = w.slice_at.data();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = n0 + i;
    __m256 lo[S][A], hi[S][A];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) lo[s][a] = hi[s][a] = _mm256_setzero_ps();
    }
    int64_t b = w.row_start[n];
    const int64_t end = w.row_start[n + 1];
    for (; b + A <= end; b += A) {
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) add_slices_avx2(lo, hi, a, v + b + a, xs + at[b + a], slice);
    }
    for (; b < end; ++b) add_slices_avx2(lo, hi, 0, v + b, xs + at[b], slice);
    const __m256 bv = _mm256_set1_ps(bias ? bias[n] : 0.0f);
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      __m256 l = bv, h = bv;
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) l = _mm256_add_ps(l, lo[s][a]), h = _mm256_add_ps(h, hi[s][a]);
      _mm256_store_ps(strip + 16 * (S * i + s), l);
      _mm256_store_ps(strip + 16 * (S * i + s) + 8, h);
    }
  }
}

// Blocks of a row vector [1, BC] (those not repacked for the column path) on one slice, each slice
// row of 16 as two halves of 8: two running sums per half.
SPARSEC_AVX2 void vectors_avx2(const PackedWeight& w, int64_t n0, int64_t count, const float* xs, const float* bias,
                               float* strip) {
  const int64_t K = w.K, BC = w.BC;
  const int64_t* cols = w.cols.data();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = n0 + i;
    __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
    for (int64_t b = w.row_start[n]; b < w.row_start[n + 1]; ++b) {
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
    const __m256 bv = _mm256_set1_ps(bias ? bias[n] : 0.0f);
    _mm256_store_ps(strip + 16 * i, _mm256_add_ps(_mm256_add_ps(lo0, lo1), bv));
    _mm256_store_ps(strip + 16 * i + 8, _mm256_add_ps(_mm256_add_ps(hi0, hi1), bv));
  }
}

// ------------------------------------------------------------------------------------------------
// One task of either instruction set: one group of outputs, in strips of L, over one pass of rows
// or over every pass.

constexpr int64_t L = 16;  // rows of X per slice

// The slices of one pass of rows: 2 for unstructured masks on AVX-512; on AVX2 as many of 4, 2 or
// 1 as fit in 256 KiB (4 up to K = 1024, 2 up to 2048; see the top). Vectors: 1.
constexpr int64_t kAvx2PassBytes = 256 * 1024;
int64_t slices_per_pass(const PackedWeight& w, bool avx512) {
  if (w.BC > 1) return 1;
  if (avx512) return 2;
  const int64_t slice_bytes = w.K * L * static_cast<int64_t>(sizeof(float));
  return 4 * slice_bytes <= kAvx2PassBytes ? 4 : 2 * slice_bytes <= kAvx2PassBytes ? 2 : 1;
}

// `slices`: the task's slices that hold rows (1 or 2 on AVX-512), which is the strip's vector count.
struct Avx512Rows {
  static void outputs(const PackedWeight& w, int64_t n0, int64_t count, const float* xs, const float* bias,
                      float* strip, int64_t slices) {
    if (slices == 2) {
      outputs_avx512<2>(w, n0, count, xs, bias, strip);
    } else {
      outputs_avx512<1>(w, n0, count, xs, bias, strip);
    }
  }
  static void store(const float* strip, int64_t n0, int64_t count, int64_t rows, int64_t N, const Epilogue& ep,
                    float* y, int64_t slices) {
    store_strip_avx512(strip, slices, n0, count, rows, N, ep, y);
  }
};

struct Avx2Rows {
  static void outputs(const PackedWeight& w, int64_t n0, int64_t count, const float* xs, const float* bias,
                      float* strip, int64_t slices) {
    if (w.BC > 1) {
      vectors_avx2(w, n0, count, xs, bias, strip);
    } else if (slices == 4) {
      unstructured_avx2<4, 1>(w, n0, count, xs, bias, strip);
    } else if (slices == 3) {
      unstructured_avx2<3, 1>(w, n0, count, xs, bias, strip);
    } else if (slices == 2) {
      unstructured_avx2<2, 2>(w, n0, count, xs, bias, strip);
    } else {
      unstructured_avx2<1, 4>(w, n0, count, xs, bias, strip);
    }
  }
  static void store(const float* strip, int64_t n0, int64_t count, int64_t rows, int64_t N, const Epilogue& ep,
                    float* y, int64_t slices) {
    for (int64_t h = 0; h < count; h += 8) {  // 8 outputs at a time (8 x 8 transposes)
      store_strip_avx2(strip + h * 16 * slices, 2 * slices, n0 + h, std::min<int64_t>(8, count - h), rows, N, ep, y);
    }
  }
};

// Task t: group t % groups, over every pass of job.slices slices of rows, or (all_passes false)
// over pass t / groups only.
template <class Path>
void row_task(void* data, size_t t) {
  const RowJob& job = *static_cast<const RowJob*>(data);
  const int64_t groups = static_cast<int64_t>(job.group_start.size()) - 1;
  const int64_t g = static_cast<int64_t>(t) % groups;
  const int64_t r0 = job.group_start[g], r1 = job.group_start[g + 1];
  const int64_t pass_rows = L * job.slices;
  const int64_t first = job.all_passes ? 0 : (static_cast<int64_t>(t) / groups) * pass_rows;
  const int64_t last = job.all_passes ? job.M : std::min(job.M, first + pass_rows);
  const PackedWeight& w = *job.w;
  alignas(64) float strip[L * L * 4];
  for (int64_t m0 = first; m0 < last; m0 += pass_rows) {
    const int64_t rows = std::min(pass_rows, job.M - m0);
    const int64_t slices = ceil_div(rows, L);  // the last pass may hold one slice where two were asked
    const float* xs = job.xs + m0 * w.K;  // slice m0 / L
    float* y = job.y + m0 * w.N;
    for (int64_t n0 = r0; n0 < r1; n0 += L) {
      const int64_t count = std::min(L, r1 - n0);
      Path::outputs(w, n0, count, xs, job.ep.bias, strip, slices);
      Path::store(strip, n0, count, rows, w.N, job.ep, y, slices);
    }
  }
}

}  // namespace
#endif  // SPARSEC_X86

namespace detail {

const float* transpose_slices(const float* x, int64_t M, int64_t K, int64_t Kp, bool avx512, bool threads,
                              ParallelFor parallel_for, void* runner_state) {
#if SPARSEC_X86
  const int64_t slices = ceil_div(M, L);
  // X^T lives in a buffer of the calling thread, reused across calls; pool threads only read it.
  thread_local AlignedScratch<float> xs_buffer;
  float* xs = xs_buffer.reserve(static_cast<size_t>(slices * L * Kp));
  TransposeJob job{x, M, K, Kp, xs};
  void (*transpose)(void*, size_t) = avx512 ? transpose_task : transpose_task_avx2;
  if (threads && slices > 1) {
    parallel_for(runner_state, transpose, static_cast<size_t>(slices), &job);
  } else {
    for (int64_t t = 0; t < slices; ++t) transpose(&job, static_cast<size_t>(t));
  }
  return xs;
#else
  (void)x, (void)M, (void)K, (void)Kp, (void)avx512, (void)threads, (void)parallel_for, (void)runner_state;
  return nullptr;
#endif
}

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
  const float* res = ep.residual ? ep.residual + (y - ep.y) : nullptr;  // locals: see store_strip_avx512
  const Activation act = ep.act;
  for (int64_t v = 0; v < nv; ++v) {
    __m256 r[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) r[i] = i < count ? _mm256_load_ps(strip + i * 8 * nv + 8 * v) : _mm256_setzero_ps();
    transpose8(r);  // r[l]: outputs n0.. of row 8 v + l
    const int64_t valid = std::min<int64_t>(8, rows - 8 * v);
#pragma GCC unroll 8
    for (int l = 0; l < 8; ++l) {  // constant indices: r stays in registers
      if (l >= valid) break;
      const int64_t at = (8 * v + l) * N + n0;
      __m256 out = activate256(r[l], act);
      if (res != nullptr) out = _mm256_add_ps(out, load8(res + at, count));
      store8(y + at, count, out);
    }
  }
}
#endif

void block_sparse_rows(const PackedWeight& w, const float* x, const Epilogue& epilogue, float* y, int64_t M,
                       Isa isa, ParallelFor parallel_for, void* runner_state) {
#if SPARSEC_X86
  if (w.columns.active()) {
    block_sparse_columns(w, x, epilogue, y, M, parallel_for, runner_state);
    return;
  }
  const bool avx512 = isa == Isa::kAvx512;
  const int64_t slices = ceil_div(M, L);
  const int64_t macs = M * w.row_start[w.R] * w.BC;
  const bool threads = parallel_for != nullptr && macs >= kSerialMacs;
  const float* xs = transpose_slices(x, M, w.K, w.K, avx512, threads, parallel_for, runner_state);
  static const int64_t target_tasks = kTasksPerCore * std::max<int64_t>(2, std::thread::hardware_concurrency());
  const int64_t per_pass = slices_per_pass(w, avx512);
  const int64_t passes = ceil_div(slices, per_pass);
  const bool all_passes = slices * L * w.K * static_cast<int64_t>(sizeof(float)) <= kAllPassesBytes;
  const int64_t groups =
      std::min(w.R, std::max<int64_t>(1, all_passes ? 2 * target_tasks : ceil_div(target_tasks, passes)));
  Epilogue ep = epilogue;
  ep.y = y;
  RowJob job{&w, xs, ep, y, M, per_pass, all_passes, balanced_groups(w.row_start, groups)};
  void (*task)(void*, size_t) = avx512 ? row_task<Avx512Rows> : row_task<Avx2Rows>;
  const size_t total =
      static_cast<size_t>((all_passes ? 1 : passes) * (static_cast<int64_t>(job.group_start.size()) - 1));
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
