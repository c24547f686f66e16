// Internal to the kernel sources (not the ORT glue's business): instruction-set macros, the AVX-512
// epilogue helpers and the pieces of block_sparse.cc that the INT8 path (block_sparse_int8.cc) reuses.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <new>
#include <vector>

#include "block_sparse.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPARSEC_X86 1
#define SPARSEC_AVX512 __attribute__((target("avx512f,fma")))
#define SPARSEC_AVX2 __attribute__((target("avx2,fma")))
#define SPARSEC_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#define SPARSEC_INLINE inline __attribute__((always_inline))
#else
#define SPARSEC_X86 0
#endif

namespace sparsec {
namespace detail {

// Work on a shared item done exactly once by whichever thread claims it first: `state` goes 0 (not
// started) -> 1 (claimed, `work` running) -> 2 (done); a thread that finds it claimed waits for 2.
// The X panel's tiles (block_sparse.cc) and the INT8 path's quantized row tiles use it.
template <typename Work>
void do_once(std::atomic<int>& state, Work&& work) {
  if (state.load(std::memory_order_acquire) == 2) return;
  int expected = 0;
  if (state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
    work();
    state.store(2, std::memory_order_release);
    return;
  }
  while (state.load(std::memory_order_acquire) != 2) {
#if SPARSEC_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
}

// n floats, zeroed, 64-byte aligned.
FloatBuffer zeroed_floats(size_t n);

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b near INT64_MAX.
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// A per-thread scratch buffer that grows and never shrinks, 64-byte aligned (one cache line, one
// AVX-512 register): a std::vector's storage is only 16-byte aligned, so its 64-byte loads may
// each straddle two cache lines, and whether they do changes with where malloc placed it (one
// process fast, the next slow). Contents are not preserved when it grows.
template <typename T>
class AlignedScratch {
 public:
  T* reserve(size_t n) {
    if (n > capacity_) {
      const size_t bytes = (std::max<size_t>(n, 1) * sizeof(T) + 63) / 64 * 64;
      void* p = std::aligned_alloc(64, bytes);
      if (p == nullptr) throw std::bad_alloc();
      data_.reset(static_cast<T*>(p));
      capacity_ = bytes / sizeof(T);
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T[], Free> data_;
  size_t capacity_ = 0;
};

// One task of a call: rows [m0, m0 + rows) of X against the block rows [r0, r1) of a group.
// Tasks are numbered row-chunk-major: t = chunk * groups + group. `empty()` when there is nothing
// to do (a short last chunk, an empty group).
struct TaskSpan {
  int64_t m0, rows, r0, r1;
  TaskSpan(const std::vector<int64_t>& group_start, int64_t rows_per_task, int64_t M, size_t t) {
    const int64_t groups = static_cast<int64_t>(group_start.size()) - 1;
    const int64_t g = static_cast<int64_t>(t) % groups;
    m0 = (static_cast<int64_t>(t) / groups) * rows_per_task;
    rows = std::min(rows_per_task, M - m0);
    r0 = group_start[g];
    r1 = group_start[g + 1];
  }
  bool empty() const { return rows <= 0 || r0 >= r1; }
};

// a * b, or -1 when either is negative or the product does not fit an int64.
inline int64_t checked_mul(int64_t a, int64_t b) {
  int64_t out = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &out)) return -1;
  return out;
}

// Boundaries splitting block rows into `groups` runs of about equal cost; block row r costs its
// kept blocks (row_start[r + 1] - row_start[r]) plus one (the epilogue).
std::vector<int64_t> balanced_groups(const std::vector<int64_t>& row_start, int64_t groups);

// The row paths' passes hold up to 8 vectors of rows: calls run(std::integral_constant<int, V>{})
// with V = nv (8 for more), so that the vector count is a template argument.
template <class Run>
void with_vectors(int64_t nv, Run&& run) {
  switch (nv) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    case 6: run(std::integral_constant<int, 6>{}); break;
    case 7: run(std::integral_constant<int, 7>{}); break;
    default: run(std::integral_constant<int, 8>{}); break;
  }
}

// Below about 1M multiply-adds (~5 us on one core) an fp32 call runs on the calling thread: waking
// the pool costs more than the work (every fp32 path: block, row, column, convolution).
constexpr int64_t kSerialMacs = 1 << 20;

// Tasks per call: 4 per core (BERT-base on 2 cores: 8 tasks 8.69 ms, 16 8.85, 24 8.90, 2 9.07),
// enough to balance the pool, few enough for long runs per task.
constexpr int64_t kTasksPerCore = 4;

// The fewest rows per core for which the INT8 block paths (VNNI and AMX, both quantizing X inside
// their tasks) give each core one range of rows (row tasks of about M / cores rows) instead of
// letting every thread work on every row tile. Then the quantized rows a thread reads were mostly
// written by itself and fewer cache lines travel between the cores; where a LayerNorm follows, a
// task takes all the outputs of its rows and normalizes them, with no pass of its own after a barrier.
// BERT-base INT8 (docs/BENCHMARKS.md, "Rows per core"): on Intel Emerald Rapids, where a cache line
// takes 120-190 ns from one vCPU to the other and back, AMX 8.3 -> 6.95 ms in fresh processes (6.7
// ms with X quantized inside the tasks), VNNI 0.93x in one process, the LayerNorm in the tasks
// 0.88-0.90x with pools that sleep between calls (equal with spinning ones); on AMD Zen 4, equal
// while the round trip was 65 ns, 17 -> 12-13 ms in the periods when the host placed the vCPUs
// 330 ns apart. The fp32 path, whose packed X panel is shared the same way, measured 1.02-1.04x
// slower split and keeps its tasks.
constexpr int64_t kSplitRows = 32;

// The row path (block_sparse_rows.cc): blocks one output high (unstructured, [1, BC] vectors) on
// AVX-512 and AVX2, with the lanes over the rows of X. `row_path` says whether a weight takes it;
// such a weight is packed without row padding (BRp = 1), so the scalar ISA uses the scalar path.
bool row_path(const PackedWeight& w, Isa isa);
// X^T by slices of 16 rows of X (zeros past M), each [Kp][16] (rows K..Kp zero), into a buffer of the
// calling thread (valid until its next call), on the pool when `threads`. AVX-512 or AVX2.
const float* transpose_slices(const float* x, int64_t M, int64_t K, int64_t Kp, bool avx512, bool threads,
                              ParallelFor parallel_for, void* runner_state);
// The column packs (block_sparse_columns.cc, block_sparse_int8_columns.cc). W: inputs per column,
// the widest of 16, 12, 8 and 4 that divides a row vector's width BC (0: none); on AVX2 (16 ymm
// registers: W of X^T's vectors and the accumulators) of 8 and 4.
int64_t column_width(int64_t BC, Isa isa = Isa::kAvx512);
// Sets W, ncols = ceil(K / W) and the bands (the outputs split by the cost of `row_start`, about
// kBandOutputs each) of `ci`.
void begin_columns(ColumnIndex& ci, int64_t W, int64_t K, const std::vector<int64_t>& row_start);
// Task t of a column path: the slice of 16 rows of X from m0 = 16 (t / bands), band t % bands
// (outputs [first, last)).
struct ColumnSlot {
  int64_t band, m0, first, last;
};
inline ColumnSlot column_slot(const ColumnIndex& ci, size_t t) {
  const int64_t bands = ci.bands(), band = static_cast<int64_t>(t) % bands;
  return {band, static_cast<int64_t>(t) / bands * 16, ci.band_start[band], ci.band_start[band + 1]};
}
// Lays out the entries that each_entry(visit) reports by visit(slot, n, source), band by band and
// output by output (slot = band * ncols + column): counts them, calls allocate(entries), then
// place(e, slot, source) for each. ci.out[e] is where entry e's output n keeps its sums in its band's
// buffer of 16 rows per output: 16 (n - the band's first output). Outputs ascend within a slot.
template <class EachEntry, class Allocate, class Place>
void lay_out_columns(ColumnIndex& ci, EachEntry&& each_entry, Allocate&& allocate, Place&& place) {
  ci.col_start.assign(static_cast<size_t>(ci.bands() * ci.ncols + 1), 0);
  each_entry([&](int64_t slot, int64_t, const auto&) { ++ci.col_start[static_cast<size_t>(slot + 1)]; });
  for (size_t i = 1; i < ci.col_start.size(); ++i) ci.col_start[i] += ci.col_start[i - 1];
  const int64_t entries = ci.col_start.back();
  ci.out.assign(static_cast<size_t>(entries), 0);
  allocate(entries);
  std::vector<int64_t> next(ci.col_start.begin(), ci.col_start.end() - 1);
  each_entry([&](int64_t slot, int64_t n, const auto& source) {
    const int64_t e = next[static_cast<size_t>(slot)]++;
    ci.out[static_cast<size_t>(e)] = static_cast<int32_t>((n - ci.band_start[slot / ci.ncols]) * 16);
    place(e, slot, source);
  });
}
// The column path (block_sparse_columns.cc): weights that pack_columns repacked, on the
// instruction set they were packed for (w.columns.isa).
void block_sparse_columns(const PackedWeight& w, const float* x, const Epilogue& epilogue, float* y, int64_t M,
                          ParallelFor parallel_for, void* runner_state);
void block_sparse_rows(const PackedWeight& w, const float* x, const Epilogue& epilogue, float* y, int64_t M,
                       Isa isa, ParallelFor parallel_for, void* runner_state);

// X quantized per row for INT8 compute (block_sparse_int8.cc): u8 rows `ld` bytes apart, zero past K.
struct QuantizedX {
  const uint8_t* data = nullptr;
  int64_t ld = 0;  // bytes between rows
  const float* scale = nullptr;
  const int32_t* zero = nullptr;
};

// INT8 compute for blocks one output high (block_sparse_int8_rows.cc): the weights packed as 4-byte
// windows per output row (PackedInt8::windows), computed by the VNNI or AVX2 row path or the scalar
// loop.
std::string pack_windows_int8(const BlockInputs& in, int64_t N, int64_t K, PackedInt8& out);
void windows_scalar(const PackedInt8& w, const QuantizedX& xq, int64_t M, const Epilogue& ep, float* y,
                    int32_t* raw);
#if SPARSEC_X86
// The quantized X as windows XW, int32, XW[j][m] = the bytes xq[m, 4 j .. 4 j + 3] for j < J (zero
// past K), in a buffer of the calling thread (valid until its next call), on the pool when `threads`:
// window-major ([J][Mp], the row path) or by slices of 16 rows ([Mp / 16][J][16], the column path).
// Mp >= M, a multiple of 16; rows past M are zero. VNNI transposes 16 x 16, else one load per window.
const int32_t* transpose_windows(const QuantizedX& xq, int64_t M, int64_t Mp, int64_t J, bool slices, bool vnni,
                                 bool threads, ParallelFor parallel_for, void* runner_state);
// The rows' scales and zero points copied into buffers of the calling thread padded to Mp (scale 0,
// zero 0 past M), for vector loads; `data` and `ld` as in xq.
QuantizedX padded_row_parameters(const QuantizedX& xq, int64_t M, int64_t Mp);
// isa: kAvx512 (VNNI) or kAvx2.
void windows_simd(const PackedInt8& w, const QuantizedX& xq, int64_t M, const Epilogue& ep, float* y, int32_t* raw,
                  Isa isa, bool threads, ParallelFor parallel_for, void* runner_state);
// The INT8 column path (block_sparse_int8_columns.cc), VNNI: weights that pack_columns_int8 repacked.
void windows_columns(const PackedInt8& w, const QuantizedX& xq, int64_t M, const Epilogue& ep, float* y,
                     int32_t* raw, bool threads, ParallelFor parallel_for, void* runner_state);
#endif

float activate_scalar(float v, Activation act);
// Activation and residual over a stored tile of `rows` x `ncols` at y (row stride ldy).
void finish_tile_scalar(const Epilogue& ep, float* y, int64_t rows, int64_t ncols, int64_t ldy);
// LayerNorm of each finished row of Y [M, N] in place (ep.ln_scale set), possibly in parallel.
void layer_norm_rows(const Epilogue& ep, float* y, int64_t M, int64_t N, Isa isa, ParallelFor parallel_for,
                     void* runner_state);

#if SPARSEC_X86
// ------------------------------------------------------------------------------------------------
// AVX-512: a tile is MR rows x NV zmm (16 floats each) of one block row, NV <= 4.

SPARSEC_AVX512 SPARSEC_INLINE __mmask16 lane_mask16(int64_t n) {
  if (n >= 16) return static_cast<__mmask16>(0xFFFF);
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1u);
}

// exp(x): x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error
// below 2e-7), times 2^n. Inputs are clamped to where float neither overflows nor flushes.
// exp512_in_range takes x already in [-87, 88].
SPARSEC_AVX512 SPARSEC_INLINE __m512 exp512_in_range(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 = hi + lo
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
SPARSEC_AVX512 SPARSEC_INLINE __m512 exp512(__m512 x) {
  return exp512_in_range(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f)));
}

// gelu(v) = v Phi(v) = max(v, 0) + h(|v|), h(a) = -a Phi(-a) = -a erfc(a / sqrt(2)) / 2, an even
// correction that falls to 0 at both ends (h(8) = -5e-15) and has no 1 - erf cancellation in the
// negative tail. h on [0, 8] is a table of 32 quartics, one per interval of width 1/4 in the offset
// r in [0, 1) (kGeluTable, built at load in double precision: interpolation at the interval's five
// Chebyshev-Lobatto points, so the pieces meet and h(0) = 0 exactly); |v| >= 8 takes h(8). The
// coefficients are picked per lane by vpermt2ps from two registers of 16: five permutes and four
// multiply-adds against the 14 multiplies of a rational erfc, 0.65x the time, and a smaller error
// (|error| <= 2.4e-7 over [-10, 10], relative <= 2.9e-6 where |gelu| > 1e-3).
struct GeluTable {
  alignas(64) float c[5][32];  // c[d][i]: the coefficient of r^d on interval i
};
extern const GeluTable kGeluTable;

SPARSEC_AVX512 SPARSEC_INLINE __m512 gelu_coef(int d, __m512i interval) {
  return _mm512_permutex2var_ps(_mm512_load_ps(kGeluTable.c[d]), interval, _mm512_load_ps(kGeluTable.c[d] + 16));
}

SPARSEC_AVX512 SPARSEC_INLINE __m512 gelu512(__m512 v) {
  // min(C, 4 |v|) and not min(4 |v|, C): vminps returns its second operand when either is NaN.
  const __m512 u = _mm512_min_ps(_mm512_set1_ps(31.999998f), _mm512_mul_ps(_mm512_abs_ps(v), _mm512_set1_ps(4.0f)));
  const __m512i i = _mm512_cvttps_epi32(u);  // the interval; vpermt2ps reads its low 5 bits
  const __m512 r = _mm512_sub_ps(u, _mm512_cvtepi32_ps(i));
  __m512 p = gelu_coef(4, i);
  p = _mm512_fmadd_ps(p, r, gelu_coef(3, i));
  p = _mm512_fmadd_ps(p, r, gelu_coef(2, i));
  p = _mm512_fmadd_ps(p, r, gelu_coef(1, i));
  p = _mm512_fmadd_ps(p, r, gelu_coef(0, i));
  return _mm512_add_ps(_mm512_max_ps(v, _mm512_setzero_ps()), p);  // a NaN v is NaN in p
}

// gelu_tanh(v) = v * (1 + tanh(u)) / 2 = v / (1 + exp(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3).
SPARSEC_AVX512 SPARSEC_INLINE __m512 gelu_tanh512(__m512 v) {
  const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
  const __m512 u = _mm512_mul_ps(_mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v), _mm512_set1_ps(-1.5957691216057308f));
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(u)));
}

// r[i] (16 lanes each) becomes its transpose: afterwards lane j of r[i] is lane i of the old r[j].
SPARSEC_AVX512 SPARSEC_INLINE void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // within each 128-bit lane: (a0 b0 a1 b1), (a2 b2 a3 b3)
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // u[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {  // gather lane L of the four row groups: column 4L + c
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}

// A strip of the row path: `count` (<= 16) outputs from n0, each a column of results over the rows,
// strip[i * 16 nv + m] for output n0 + i and row m < 16 nv, transposed 16 x 16 into the rows of Y
// [rows, N] (y at the strip's first row) with the activation and residual of `ep`.
void store_strip_avx512(const float* strip, int64_t nv, int64_t n0, int64_t count, int64_t rows, int64_t N,
                        const Epilogue& ep, float* y);
// The same for the AVX2 row paths: 8 rows per vector, strip[i * 8 nv + m], the scalar epilogue.
void store_strip_avx2(const float* strip, int64_t nv, int64_t n0, int64_t count, int64_t rows, int64_t N,
                      const Epilogue& ep, float* y);

SPARSEC_AVX512 SPARSEC_INLINE __m512 activate512(__m512 v, Activation act) {
  if (act == Activation::kGelu) return gelu512(v);
  if (act == Activation::kGeluTanh) return gelu_tanh512(v);
  if (act == Activation::kRelu) return _mm512_max_ps(_mm512_setzero_ps(), v);  // max(0, NaN) = NaN: the 2nd operand
  return v;
}
// The INT8 block paths' store of 16 outputs of one row of X (VNNI and AMX): exact = sums - zero *
// colsum in int32, then either those integers into raw_at (tests), or Y = exact * (xscale * wscale)
// + bias with the activation and residual, `mask` lanes at y_at.
SPARSEC_AVX512 SPARSEC_INLINE void store_sums16(__m512i sums, __mmask16 mask, __m512i colsum, __m512 wscale,
                                                __m512 bias, int32_t zero, float xscale, const Epilogue& ep,
                                                float* y_at, int32_t* raw_at) {
  const __m512i exact = _mm512_sub_epi32(sums, _mm512_mullo_epi32(_mm512_set1_epi32(zero), colsum));
  if (raw_at != nullptr) {
    _mm512_mask_storeu_epi32(raw_at, mask, exact);
    return;
  }
  __m512 out = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_mul_ps(_mm512_set1_ps(xscale), wscale), bias);
  out = activate512(out, ep.act);
  if (ep.residual != nullptr) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mask, ep.residual + (y_at - ep.y)));
  _mm512_mask_storeu_ps(y_at, mask, out);
}

// ------------------------------------------------------------------------------------------------
// AVX2: the same epilogue on 8 lanes.

// Lanes [0, n) of 8 (n clamped to [0, 8]), for vmaskmovps.
SPARSEC_AVX2 SPARSEC_INLINE __m256i lane_mask8(int64_t n) {
  const int32_t k = static_cast<int32_t>(std::max<int64_t>(0, std::min<int64_t>(8, n)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The first n lanes (n clamped to [0, 8]) at p, the others zero; masked moves only where fewer than
// 8 lanes are inside: on AMD Zen 3 a masked store costs several plain ones (a 1x1 convolution's
// stores alone 0.57x the time as plain stores).
SPARSEC_AVX2 SPARSEC_INLINE __m256 load8(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask8(n));
}
SPARSEC_AVX2 SPARSEC_INLINE void store8(float* p, int64_t n, __m256 v) {
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, lane_mask8(n), v);
  }
}

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

// The sum and the maximum of the 8 lanes.
SPARSEC_AVX2 SPARSEC_INLINE float reduce_add8(__m256 v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
SPARSEC_AVX2 SPARSEC_INLINE float reduce_max8(__m256 v) {
  const __m128 q = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_max_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_max_ss(d, _mm_movehdup_ps(d)));
}

// exp(x) as exp512, with 2^n put into the exponent bits (AVX2 has no vscalefps): x clamped to
// [-87, 88] keeps n in [-126, 127], a normal float.
SPARSEC_AVX2 SPARSEC_INLINE __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// gelu(v) = max(v, 0) + h(|v|), h(a) = -a erfc(a / sqrt(2)) / 2 as in gelu512, with a table that
// an in-lane vpermilps reads (4 floats per 128-bit half; gelu512's vpermt2ps reads 32): h on [0, 6]
// is 4 polynomials of degree 9, one per interval of width 3/2 (kGeluTable4, built at load like
// kGeluTable); |v| >= 6 takes h(6) = -5.9e-9. Ten in-lane permutes and nine multiply-adds, no
// division. Measured on Zen 3, 3072 x 768 at density 0.1: GELU adds 25-37% to the layer; the
// rational erfc with exp it replaces (Numerical Recipes' erfcc) added 73-84%, and 8 intervals of
// degree 6 picked by the cross-lane vpermps 27-40%.
struct GeluTable4 {
  alignas(32) float c[10][8];  // c[d][i] = c[d][4 + i]: the coefficient of r^d on interval i
};
extern const GeluTable4 kGeluTable4;

SPARSEC_AVX2 SPARSEC_INLINE __m256 gelu256(__m256 v) {
  // min(C, u) and not min(u, C): vminps returns its second operand when either is NaN.
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
  const __m256 u = _mm256_min_ps(_mm256_set1_ps(3.9999998f), _mm256_mul_ps(a, _mm256_set1_ps(2.0f / 3.0f)));
  const __m256i i = _mm256_cvttps_epi32(u);  // the interval; vpermilps reads its low 2 bits
  const __m256 r = _mm256_sub_ps(u, _mm256_cvtepi32_ps(i));
  __m256 p = _mm256_permutevar_ps(_mm256_load_ps(kGeluTable4.c[9]), i);
#pragma GCC unroll 9
  for (int d = 8; d >= 0; --d) {
    p = _mm256_fmadd_ps(p, r, _mm256_permutevar_ps(_mm256_load_ps(kGeluTable4.c[d]), i));
  }
  return _mm256_add_ps(_mm256_max_ps(v, _mm256_setzero_ps()), p);  // a NaN v is NaN in p
}

// gelu_tanh(v) = v / (1 + exp(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3), as gelu_tanh512.
SPARSEC_AVX2 SPARSEC_INLINE __m256 gelu_tanh256(__m256 v) {
  const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
  const __m256 u = _mm256_mul_ps(_mm256_fmadd_ps(v3, _mm256_set1_ps(0.044715f), v), _mm256_set1_ps(-1.5957691216057308f));
  return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(u)));
}

SPARSEC_AVX2 SPARSEC_INLINE __m256 activate256(__m256 v, Activation act) {
  if (act == Activation::kGelu) return gelu256(v);
  if (act == Activation::kGeluTanh) return gelu_tanh256(v);
  if (act == Activation::kRelu) return _mm256_max_ps(_mm256_setzero_ps(), v);  // max(0, NaN) = NaN
  return v;
}

// finish_tile_scalar on 8 lanes: the activation, then the residual, over a stored tile.
void finish_tile_avx2(const Epilogue& ep, float* y, int64_t rows, int64_t ncols, int64_t ldy);
#endif  // SPARSEC_X86

// Rows of X quantized on demand (block_sparse_int8.cc): ensure_tile makes tile t ready, quantizing it
// unless another thread has (or is about to: then it waits).
struct LazyRows;
void ensure_tile(const LazyRows& lazy, int64_t t);

// INT8 compute on AMX tiles (block_sparse_int8_amx.cc) for the block path: whether this CPU and OS
// allow it (asks the OS for the tile state once), whether a weight's blocks suit it, and the passes
// of kAmxPassRows rows over block rows [r0, r1) for `rows` rows of xq, whose buffer holds 32 readable
// rows past them. With `lazy`, the passes start at pass `start` (wrapping) and each first makes its
// rows ready: lazy tile (m0 + m) / kAmxPassRows, m0 the task's first row, a multiple of kAmxPassRows.
constexpr int64_t kAmxPassRows = 32;  // two 16-row A tiles
bool amx_int8_ready();
bool amx_takes(const PackedInt8& w);
void block_rows_amx(const PackedInt8& w, int64_t r0, int64_t r1, const QuantizedX& xq, int64_t rows,
                    const Epilogue& ep, float* y, int32_t* raw, const LazyRows* lazy = nullptr, int64_t m0 = 0,
                    int64_t start = 0);

}  // namespace detail
}  // namespace sparsec
